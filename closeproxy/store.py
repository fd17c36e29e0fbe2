"""TokenStore: the token file on disk, written atomically, shared through a lock file.

The file is the single source of truth between processes. Close rotates refresh
tokens, so a refresh token that reached Close but not the disk is a forced re-login:
every write is temp file + fsync + rename + fsync of the directory, and refreshes happen
only while holding the lock file beside the token file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

from .errors import TokenStoreError
from .grant import FILE_VERSION, LOCK_TIMEOUT, TokenSet

__all__ = ["FILE_VERSION", "LOCK_TIMEOUT", "Fingerprint", "TokenSet", "TokenStore"]


class Fingerprint(NamedTuple):
    """Identity of one version of the token file; a rename always changes the inode."""

    device: int
    inode: int
    mtime_ns: int
    size: int


class TokenStore:
    """Load, save, clear and lock one token file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r})"

    # --- reading ---------------------------------------------------------------------

    def fingerprint(self) -> Fingerprint | None:
        """Cheap check for a replaced file: one stat call, no read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(self._os_message("read", exc)) from None
        return Fingerprint(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> TokenSet | None:
        """The stored tokens, or None when there is no token file."""
        return self.load_with_fingerprint()[0]

    def load_with_fingerprint(self) -> tuple[TokenSet | None, Fingerprint | None]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise TokenStoreError(self._os_message("read", exc)) from None
        fingerprint = Fingerprint(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            tokens = TokenSet.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            # Never echo the content: it may be a half-pasted token.
            raise TokenStoreError(
                f"token file {self.path} is not a valid closeproxy token file ({exc}): "
                "run `closeproxy login` to replace it"
            ) from None
        return tokens, fingerprint

    # --- writing ---------------------------------------------------------------------

    def ensure_directory(self) -> None:
        directory = self.path.parent
        if directory.is_dir():
            return
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise TokenStoreError(
                f"cannot create the token directory {directory}: {exc.strerror}; "
                "choose another place with --token-file"
            ) from None

    def save(self, tokens: TokenSet) -> Fingerprint:
        """Atomically replace the token file; a crash leaves the old or the new file."""
        self.ensure_directory()
        data = json.dumps(tokens.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        try:
            # No inodes, no quota, no permission, no file descriptors: all a TokenStoreError.
            fd, tmp_name = tempfile.mkstemp(prefix=self._temp_prefix, suffix=".tmp", dir=directory)
        except OSError as exc:
            raise TokenStoreError(self._os_message("write", exc)) from None
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp_name, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise TokenStoreError(self._os_message("write", exc)) from None
        self._fsync_directory()
        return Fingerprint(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def _temp_prefix(self) -> str:
        return f".{self.path.name}."

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a crashed save left behind; call only with the lock held.

        Every save runs under the lock, so with the lock held no temp file belongs to a
        save in progress. They hold refresh tokens, so they must not linger.
        """
        removed = 0
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return 0
        for name in names:
            if name.startswith(self._temp_prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(self.path.parent / name)
                    removed += 1
        return removed

    def clear(self) -> bool:
        """Delete the token file; True when there was one."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TokenStoreError(self._os_message("delete", exc)) from None
        self._fsync_directory()
        return True

    def _fsync_directory(self) -> None:
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some filesystems cannot fsync a directory; the rename is still atomic
        finally:
            os.close(dir_fd)

    # --- the cross-process lock -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, wait: float = LOCK_TIMEOUT) -> AsyncIterator[None]:
        """Hold the lock file beside the token file.

        Polls a non-blocking flock so that waiting never ties up a thread and a
        cancelled waiter leaves nothing behind. The kernel drops the lock when the
        holder dies, kill -9 included.
        """
        self.ensure_directory()
        deadline = time.monotonic() + wait
        while True:
            fd = self._open_lock()
            try:
                await self._flock(fd, deadline, wait)
                if self._lock_is_current(fd):
                    break
                # The lock file was deleted or replaced while we waited: our lock guards
                # nothing another process can see. Lock whatever is at the path now.
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            # The directory too: a lock file deleted while held would let a newcomer lock a
            # fresh file at the same path, but the directory cannot vanish under the token
            # file. Always taken second, so no two processes wait on each other crosswise.
            dir_fd = self._open_directory_lock()
            try:
                if dir_fd is not None:
                    try:
                        await self._flock(dir_fd, deadline, wait)
                    except OSError:  # no flock on directories here: the lock file alone
                        os.close(dir_fd)
                        dir_fd = None
                self.remove_stale_temp_files()
                yield
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)  # closing drops its flock
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _open_directory_lock(self) -> int | None:
        """The token directory, opened for flock; None where the filesystem cannot."""
        try:
            return os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None

    def _open_lock(self) -> int:
        try:
            try:
                return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
                    raise
                # flock needs no write access: an existing lock file still works on a disk
                # that is full or read-only, so a refresh can go on and keep its tokens.
                return os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TokenStoreError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror}"
            ) from None

    async def _flock(self, fd: int, deadline: float, wait: float) -> None:
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TokenStoreError(
                        f"another closeproxy process has held {self.lock_path} for over "
                        f"{wait:g} s: check for a stuck process"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _lock_is_current(self, fd: int) -> bool:
        """True when the locked file is still the one at the lock path (device and inode)."""
        held = os.fstat(fd)
        try:
            at_path = os.stat(self.lock_path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TokenStoreError(
                f"cannot check the lock file {self.lock_path}: {exc.strerror}"
            ) from None
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def _os_message(self, verb: str, exc: OSError) -> str:
        return (
            f"cannot {verb} the token file {self.path}: {exc.strerror or exc}; "
            "check its permissions or choose another place with --token-file"
        )
