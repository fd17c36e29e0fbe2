"""Deterministic response bodies: the download pattern and the gzip documents.

Nothing here is ever materialised whole: large bodies are produced chunk by chunk
so a 1 GiB transfer costs the simulator a few megabytes at most.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator

# A prime period keeps the content from repeating at any power-of-two chunk size,
# so a proxy that duplicated or reordered whole chunks would change the hash.
PATTERN_PERIOD: int = 1_000_003
MAX_CHUNK: int = 1 << 20
DEFAULT_CHUNK: int = 256 * 1024
EXPORT_BATCH: int = 64 * 1024


@functools.cache
def _pattern_buffer() -> memoryview:
    pattern = hashlib.shake_256(b"closeproxy.sim download").digest(PATTERN_PERIOD)
    # Enough repeats that any chunk up to MAX_CHUNK, from any offset in the period, is one
    # contiguous slice (the period is shorter than MAX_CHUNK).
    repeats = MAX_CHUNK // PATTERN_PERIOD + 2
    return memoryview(pattern * repeats)


def download_chunks(total: int, chunk: int = DEFAULT_CHUNK) -> Iterator[memoryview]:
    """Byte i of the download is ``shake_256(b"closeproxy.sim download")[i % PATTERN_PERIOD]``."""
    if not 0 < chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be between 1 and {MAX_CHUNK}")
    buffer = _pattern_buffer()
    offset = 0
    while offset < total:
        size = min(chunk, total - offset)
        start = offset % PATTERN_PERIOD
        yield buffer[start : start + size]
        offset += size


def download_sha256(total: int) -> str:
    """The sha256 hex digest of ``GET /api/v1/_sim/download?bytes=total``."""
    digest = hashlib.sha256()
    for piece in download_chunks(total, MAX_CHUNK):
        digest.update(piece)
    return digest.hexdigest()


def _gzip_document() -> dict[str, object]:
    return {
        "data": [
            {"id": f"lead_gzip{i:04d}", "display_name": f"Compressed lead {i}", "n": i}
            for i in range(50)
        ],
        "has_more": False,
        "total_results": 50,
    }


# mtime=0 keeps the bytes identical across runs, so tests can compare them exactly.
GZIP_JSON: bytes = json.dumps(_gzip_document()).encode()
GZIP_BODY: bytes = gzip.compress(GZIP_JSON, mtime=0)
GZIP_ETAG: str = '"sim-' + hashlib.sha256(GZIP_BODY).hexdigest()[:16] + '"'


def export_line(index: int) -> bytes:
    """Line ``index`` (0-based) of the export, newline included."""
    record = f'{{"id": "lead_export{index:010d}", "display_name": "Exported lead {index}", '
    return (record + f'"status_label": "Potential", "n": {index}}}\n').encode()


def export_chunks(total: int) -> Iterator[bytes]:
    """Gzip-compressed JSON lines: whole lines until at least ``total`` raw bytes."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    produced = 0
    index = 0
    while produced < total:
        batch: list[bytes] = []
        size = 0
        while size < EXPORT_BATCH and produced + size < total:
            line = export_line(index)
            batch.append(line)
            size += len(line)
            index += 1
        produced += size
        compressed = compressor.compress(b"".join(batch))
        if compressed:
            yield compressed
    yield compressor.flush()
