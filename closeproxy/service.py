"""`closeproxy service install | print | uninstall`: a systemd user unit for `serve`.

The unit runs this very interpreter (`python -m closeproxy serve`), so a virtualenv or
pipx install keeps working, with the config file of the current settings. Secrets never
go into the unit: a unit file is readable by anyone who can read the directory, and
the service takes every setting from the config file (and the files it names).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import KEY_ENV_PREFIX, Settings
from .errors import CloseProxyError

UNIT_NAME = "closeproxy.service"
MARKER = "# Written by `closeproxy service install`"
# systemd's own test for "booted with systemd" (sd_booted(3)).
SYSTEMD_RUNTIME = Path("/run/systemd/system")
# Longer than the proxy's own drain (server.DRAIN_SECONDS), so systemd never kills a
# drain that would still save a freshly rotated refresh token.
STOP_TIMEOUT = 45


class ServiceFailed(CloseProxyError):
    """The unit file could not be written or removed."""


def unit_dir(environ: Mapping[str, str]) -> Path:
    """Where systemd looks for the user's own units: $XDG_CONFIG_HOME/systemd/user."""
    base = environ.get("XDG_CONFIG_HOME", "")
    config = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return config / "systemd" / "user"


def unit_path(environ: Mapping[str, str]) -> Path:
    return unit_dir(environ) / UNIT_NAME


def systemd_running() -> bool:
    return SYSTEMD_RUNTIME.is_dir()


def _quote(arg: str) -> str:
    """One ExecStart word: % and $ escaped (specifiers, variables), quoted when needed."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start(settings: Settings, python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "closeproxy", "serve"]
    if settings.config_file is not None:
        argv += ["--config", str(settings.config_file.resolve())]
    return argv


def render_unit(settings: Settings, python: str = sys.executable) -> str:
    """The unit file's text."""
    argv = exec_start(settings, python)
    config = (
        f"# Settings come from {settings.config_file.resolve()}."
        if settings.config_file is not None
        else "# No config file was found, so the service runs with the defaults: create "
        "one and run `closeproxy service install` again."
    )
    return "\n".join(
        [
            MARKER,
            "# (closeproxy, a local reverse proxy for the Close API, for this user's session).",
            config,
            "[Unit]",
            "Description=closeproxy: local reverse proxy for the Close API",
            "StartLimitIntervalSec=60",
            "StartLimitBurst=5",
            "",
            "[Service]",
            "Type=exec",
            "ExecStart=" + " ".join(_quote(arg) for arg in argv),
            "Environment=PYTHONUNBUFFERED=1",
            "Restart=on-failure",
            "RestartSec=2",
            "# Exit status 2 is a configuration error: restarting cannot fix it.",
            "RestartPreventExitStatus=2",
            f"TimeoutStopSec={STOP_TIMEOUT}",
            "UMask=0077",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def settings_the_service_misses(settings: Settings) -> list[str]:
    """Settings that come from this shell (variables, flags), which the service won't see."""
    return sorted(
        f"{name} (from {where})"
        for name, where in settings.sources.items()
        if not where.startswith("config file")
    )


@dataclass(frozen=True)
class Outcome:
    """What a service command says: stdout lines and stderr notes."""

    out: Sequence[str]
    notes: Sequence[str] = ()


def install(settings: Settings, environ: Mapping[str, str] = os.environ) -> Outcome:
    settings.check_serve()  # a unit that cannot start is caught now, not at next login
    path = unit_path(environ)
    text = render_unit(settings)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{UNIT_NAME}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(0o644)
        temporary.replace(path)
    except OSError as exc:
        raise ServiceFailed(
            f"cannot write {path}: {exc.strerror}; fix the directory's permissions or set "
            "XDG_CONFIG_HOME"
        ) from None
    notes = shell_notes(settings, environ)
    out = [
        f"{'replaced' if existed else 'wrote'} {path}; enable and start it with:",
        "  systemctl --user daemon-reload",
        f"  systemctl --user enable --now {UNIT_NAME}",
    ]
    if not systemd_running():
        notes.append(
            f"systemd is not running on this machine ({SYSTEMD_RUNTIME} is missing), so the "
            "unit cannot start here: use it on a machine that boots with systemd (under WSL, "
            "turn systemd on in /etc/wsl.conf), or start `closeproxy serve` from your "
            "session's startup instead"
        )
    return Outcome(out, notes)


def uninstall(environ: Mapping[str, str] = os.environ) -> Outcome:
    path = unit_path(environ)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Outcome([f"nothing to uninstall: {path} does not exist"])
    except OSError as exc:
        raise ServiceFailed(f"cannot read {path}: {exc.strerror}") from None
    if not text.startswith(MARKER):
        raise ServiceFailed(
            f"{path} was not written by `closeproxy service install`: remove it yourself "
            "if you mean to"
        )
    wants = path.parent / "default.target.wants" / UNIT_NAME
    try:
        if wants.is_symlink() and Path(os.readlink(wants)) in {path, Path(UNIT_NAME)}:
            wants.unlink()  # what `systemctl --user disable` would remove
        path.unlink()
    except OSError as exc:
        raise ServiceFailed(f"cannot remove {path}: {exc.strerror}") from None
    out = [f"removed {path}"]
    if systemd_running():
        out += [
            "if it is running, stop it and let systemd forget it with:",
            f"  systemctl --user stop {UNIT_NAME}",
            "  systemctl --user daemon-reload",
        ]
    return Outcome(out)


def shell_notes(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    missing = settings_the_service_misses(settings)
    missing += sorted(f"the key in {name}" for name in environ if name.startswith(KEY_ENV_PREFIX))
    if not missing:
        return []
    return [
        "the service reads only the config file, so it will not see "
        + ", ".join(missing)
        + ": put them in the config file (client_secret_file, proxy_key_file and key_file "
        "for secrets)"
    ]
