"""`closeproxy service install | print | uninstall` (SPEC §13): a systemd user unit."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import ServeProcess, cli_env, run_cli, seed_tokens

from closeproxy.service import UNIT_NAME
from closeproxy.sim import RunningSim


def write_config(tmp_path: Path, text: str = "port = 0\n") -> Path:
    config = tmp_path / "conf dir" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return config


def service(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **env}, "service", *args)


def exec_start(unit: str) -> list[str]:
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    # The unit's quoting of these plain paths (space included) is also a shell's.
    return shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_service_print_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = service(tmp_path, "print", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    unit = tmp_path / UNIT_NAME
    unit.write_text(result.stdout)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify only warns about most mistakes: a clean unit gives no output at all
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    assert exec_start(result.stdout) == [
        sys.executable,
        "-m",
        "closeproxy",
        "serve",
        "--config",
        str(config.resolve()),
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_systemd_analyze_verify_catches_a_broken_unit_as_the_test_above_relies_on(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    text = service(tmp_path, "print", "--config", str(config)).stdout
    unit = tmp_path / UNIT_NAME
    unit.write_text(text.replace("Type=exec", "Type=bogus"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "bogus" in verify.stderr


def test_install_writes_the_unit_under_xdg_config_home_and_uninstall_removes_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    unit = tmp_path / "xdg" / "systemd" / "user" / UNIT_NAME
    installed = service(tmp_path, "install", "--config", str(config))
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.splitlines() == [
        f"wrote {unit}; enable and start it with:",
        "  systemctl --user daemon-reload",
        f"  systemctl --user enable --now {UNIT_NAME}",
    ]
    printed = service(tmp_path, "print", "--config", str(config)).stdout
    assert unit.read_text() == printed
    assert unit.stat().st_mode & 0o777 == 0o644
    if not Path("/run/systemd/system").is_dir():
        assert "systemd is not running on this machine" in installed.stderr
    again = service(tmp_path, "install", "--config", str(config))
    assert again.stdout.startswith(f"replaced {unit}")
    # as enabled by systemctl: the uninstall takes the wants link along
    wants = unit.parent / "default.target.wants" / UNIT_NAME
    wants.parent.mkdir()
    wants.symlink_to(unit)
    removed = service(tmp_path, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines()[0] == f"removed {unit}"
    assert not unit.exists() and not wants.is_symlink()
    nothing = service(tmp_path, "uninstall")
    assert (nothing.returncode, nothing.stdout.strip()) == (
        0,
        f"nothing to uninstall: {unit} does not exist",
    )


def test_uninstall_leaves_a_unit_it_did_not_write(tmp_path: Path) -> None:
    unit = tmp_path / "xdg" / "systemd" / "user" / UNIT_NAME
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    result = service(tmp_path, "uninstall")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "was not written by `closeproxy service install`" in line
    assert unit.exists()


def test_install_refuses_settings_serve_would_refuse_and_notes_what_the_service_misses(
    tmp_path: Path,
) -> None:
    bad = write_config(tmp_path, 'host = "0.0.0.0"\n')
    result = service(tmp_path, "install", "--config", str(bad))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "proxy key" in line
    assert not (tmp_path / "xdg" / "systemd").exists()
    good = write_config(tmp_path)
    noted = service(tmp_path, "print", "--config", str(good), CLOSEPROXY_LOG_LEVEL="debug")
    assert noted.returncode == 0
    assert "log_level (from environment variable CLOSEPROXY_LOG_LEVEL)" in noted.stderr
    assert "CLOSEPROXY_LOG_LEVEL" not in noted.stdout


async def test_the_units_command_serves_with_the_config_file(
    sim: RunningSim, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens.json"
    seed_tokens(sim, token_file)
    config = write_config(
        tmp_path,
        f'port = 0\napi_url = "{sim.url}"\ntoken_file = "{token_file}"\n',
    )
    printed = service(tmp_path, "print", "--config", str(config))
    # run it the way systemd would: the unit's command line, none of this shell's settings
    process = subprocess.Popen(
        exec_start(printed.stdout),
        env={**cli_env({}), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ServeProcess(process)
    try:
        await asyncio.to_thread(server.wait_ready, 20)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/api/v1/me/") as resp:
                assert resp.status == 200
                assert (await resp.json())["id"] == sim.state.config.user_id
    finally:
        assert await asyncio.to_thread(server.stop) == 0
