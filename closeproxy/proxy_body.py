"""The client's request body: kept in memory when small enough to replay, else streamed once.

A body up to REPLAY_LIMIT is read before the first attempt, so that the request can be
sent again after a refresh; a larger one (or one whose length is announced larger) is
streamed to Close as it arrives, and a 401 to it goes to the client unreplayed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from .pacing import Pacer

# Bodies up to this size are kept so that the request can be replayed after a refresh.
REPLAY_LIMIT: Final = 1024 * 1024


class BodyTooLarge(Exception):
    """The client's body is larger than --max-body-size allows."""


class RequestBody:
    """The client's body: kept in memory when small enough to replay, else streamed once."""

    def __init__(self, request: web.Request, limit: int | None, pacer: Pacer) -> None:
        self._request = request
        self._pacer = pacer
        self._limit = limit
        self._size = 0
        self.too_large = False
        self.buffered: bytes | None = None
        self._prefix = b""
        self._streamed = False

    @classmethod
    async def read(cls, request: web.Request, limit: int | None, pacer: Pacer) -> RequestBody:
        body = cls(request, limit, pacer)
        if not request.body_exists:
            body.buffered = b""
            return body
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise BodyTooLarge()
        if length is not None and length > REPLAY_LIMIT:
            return body
        # Unknown (chunked) or small: read up to the limit; EOF before it means replayable.
        chunks: list[bytes] = []
        size = 0
        content = request.content
        while size <= REPLAY_LIMIT:
            chunk = await pacer.read(content)
            if not chunk:
                body.buffered = b"".join(chunks)
                return body
            body._count(chunk)
            chunks.append(chunk)
            size += len(chunk)
        body._prefix = b"".join(chunks)
        return body

    def _count(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._limit is not None and self._size > self._limit:
            self.too_large = True
            raise BodyTooLarge()

    @property
    def replayable(self) -> bool:
        return self.buffered is not None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.buffered is not None:
            return self.buffered if self.buffered or self._request.body_exists else None
        if self._streamed:
            raise RuntimeError("a streamed request body can be sent only once")
        self._streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._prefix:
            yield self._prefix
            self._prefix = b""
        content = self._request.content
        while chunk := await self._pacer.read(content):
            self._count(chunk)
            yield chunk
