"""Benchmark closeproxy against the bundled simulator; prints figures, never a test.

    python scripts/bench.py MODE [--help]   (stream, latency, slow, ratelimit, metrics-cost,
                                           compare, fleet, instructions)

The modes live in scripts/benchlib/ (one module each; see its docstring); the process
and token-file helpers they share with the tests are closeproxy.testing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, scripts/ is on the path already; imported (by the tests), it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
