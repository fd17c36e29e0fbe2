"""After a command: tokens Close issued but the disk refused, put somewhere safe."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from .config import Settings
from .errors import CloseProxyError
from .file_store import FileGrantStore
from .tokens import TokenProvider


def rescue_unsaved(command: str, settings: Settings, provider: TokenProvider) -> int | None:
    """After a command: if Close issued tokens the disk refused, put them somewhere safe.

    Their predecessors in the token file are spent, so dropping them would force a new
    login. They go to a clearly named file (same format, mode 0600) beside the token
    file, or in a private directory under the system temp dir if that fails too; never to
    stdout, which scripts capture. Returns the exit status, or None when all was saved.
    """
    tokens = provider.unsaved
    if tokens is None:
        return None
    where = provider.store.describe()
    reason = provider.save_error or f"cannot write {where}"
    if isinstance(provider.store, FileGrantStore):
        fix = f"`mv {{candidate}} {settings.token_file}` before any closeproxy refreshes again"
    else:
        # No command writes a file's tokens into Redis: use them from the file meanwhile.
        fix = (
            "`closeproxy login`; until then `--token-store file --token-file {candidate}` "
            "serves with them"
        )
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = f"{settings.token_file.name}.unsaved-{stamp}-{os.getpid()}"
    candidates = [
        settings.token_file.with_name(name),
        Path(tempfile.gettempdir()) / f"closeproxy-{os.getuid()}" / name,
    ]
    for candidate in candidates:
        try:
            FileGrantStore(candidate).write(tokens)
        except CloseProxyError:
            continue
        print(
            f"closeproxy {command}: Close issued new tokens but they could not be saved "
            f"({reason}); they are in {candidate} (readable by you only), and the refresh token in "
            f"{where} is already spent: fix the cause, then run {fix.format(candidate=candidate)}",
            file=sys.stderr,
        )
        return 1
    print(
        f"closeproxy {command}: Close issued new tokens but they could not be saved ({reason}), "
        f"nor written anywhere else, so they are lost and the refresh token in "
        f"{where} is spent: fix the cause, then run `closeproxy login`",
        file=sys.stderr,
    )
    return 1
