"""Every mode of scripts/bench.py runs end to end in a tiny configuration (not a timing test).

The modes run side by side as separate processes, each with its own simulator and proxy;
the figures are not checked, only that each mode runs, finishes and says what it found.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import UVLOOP_INSTALLED

from closeproxy.testing import child_env

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

TINY: dict[str, list[str]] = {
    "stream": ["--size", "2M", "--chunk", "64k", "--first-byte-chunks", "4", "--reps", "2"],
    "latency": ["--requests", "60", "--concurrency", "4"],
    "slow": ["--downloads", "3", "--uploads", "3", "--settle", "0.3", "--probes", "2"],
    "ratelimit": ["--requests", "12", "--limit", "40"],
    "metrics-cost": ["--rounds", "200"],
    "fleet": ["--proxies", "2", "--lifetime", "6", "--expiries", "1", "--concurrency", "4"],
    "compare": [
        *(
            "--load",
            "builtin",
            "--duration",
            "0.2",
            "--warmup",
            "0.1",
            "--reps",
            "1",
            "--settle",
            "0.05",
        ),
        *("--only", "direct,bare,closeproxy,nginx,bare-uvloop,closeproxy-uvloop"),
        *("--variant", "extra=--log-level warning"),
    ],
}


@pytest.mark.timeout(60)
def test_every_mode_runs_in_a_tiny_configuration() -> None:
    running = {
        mode: subprocess.Popen(
            [sys.executable, str(BENCH), mode, *args, "--json"],
            env=child_env({}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, args in TINY.items()
    }
    outputs = {mode: process.communicate(timeout=50) for mode, process in running.items()}
    for mode, (out, err) in outputs.items():
        assert running[mode].returncode == 0, (mode, out[-3000:], err[-3000:])
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["bench"] == mode
    assert "PASS  streaming acceptance" in outputs["stream"][0]
    assert "PASS  upload proxy RSS after the last of 2 within 8 MB" in outputs["stream"][0]
    assert "PASS  every ordinary GET answered 200" in outputs["slow"][0]
    (fleet,) = json.loads(outputs["fleet"][0].strip().splitlines()[-1])["results"]
    assert fleet["refreshes"] >= 1 and fleet["max_refreshes_per_expiry"] == 1, fleet
    assert fleet["reuse"] == 0 and fleet["errors"] == 0, fleet
    compare = json.loads(outputs["compare"][0].strip().splitlines()[-1])["samples"]
    expected = {"direct", "bare", "closeproxy", "extra"}
    if Path("/usr/sbin/nginx").exists():
        expected.add("nginx")
    if UVLOOP_INSTALLED:
        expected |= {"bare-uvloop", "closeproxy-uvloop"}
    assert set(compare) == expected
    # Each Python target ran on the loop it is named for, whatever closeproxy's `auto`
    # would pick: a ratio between two loops would measure the loop, not the proxy.
    # ("extra", at --log-level warning, writes no start line to read it from.)
    loops = {name: sample["loop"] for name, (sample,) in compare.items()}
    for name in expected - {"direct", "nginx", "extra"}:
        assert loops[name] == ("uvloop" if name.endswith("-uvloop") else "asyncio"), loops
    for name, (sample,) in compare.items():
        assert sample["busy_rate"] > 0 and sample["errors"] == 0, (name, sample)
        # Every proxy was timed to its first answer and had its memory read.
        assert (sample["start_seconds"] is None) == (name == "direct"), (name, sample)
        assert (sample["idle_rss"] or 0) > 0 or name == "direct", (name, sample)
    table = outputs["compare"][0]
    assert all(f"\n{name} " in table for name in expected), table


def test_every_part_the_instructions_mode_strips_still_exists() -> None:
    # In a child: stripping replaces closeproxy's own functions for the whole process.
    code = "from benchlib.stripped import PARTS, strip; strip(set(PARTS)); print(len(PARTS))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env({"PYTHONPATH": str(BENCH.parent)}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 8


@pytest.mark.timeout(240)
def test_instructions_mode_counts_fewer_with_every_part_stripped() -> None:
    # Instruction counts are deterministic enough to compare (not a timing): a proxy with
    # its request path stripped to the bone must execute fewer than the full one.
    argv = [sys.executable, str(BENCH), "instructions", "--requests", "30", "--concurrency", "4"]
    argv += ["--parts", "all", "--only", "closeproxy,without all", "--json"]
    done = subprocess.run(
        argv,
        env=child_env({}),
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    per_request = summary["per_request"]
    assert set(per_request) == {"closeproxy", "without all"}
    # Log level and metrics alone save about 5 %; the stripped parts about 20 % more.
    assert 0 < per_request["without all"] < 0.9 * per_request["closeproxy"], per_request
    assert "without all" in done.stdout and "every part above off" in done.stdout
