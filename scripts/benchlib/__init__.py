"""The modes behind scripts/bench.py: closeproxy vs the simulator; figures, never a test.

    python scripts/bench.py stream  [--size 1G] [--chunk 256k] [--json]
    python scripts/bench.py latency [--requests 5000] [--concurrency 10] [--json]
    python scripts/bench.py slow    [--downloads 300] [--uploads 260] [--json]
    python scripts/bench.py ratelimit [--requests 1000] [--limit 20] [--json]
    python scripts/bench.py metrics-cost [--rounds 200000] [--json]
    python scripts/bench.py compare [--duration 5] [--reps 3] [--variant NAME=ARGS] [--json]

Each starts the simulator (`python -m closeproxy.sim`) and `closeproxy serve` as separate
processes on free loopback ports, seeds the proxy's token file from the simulator, and
runs the same calls directly against the simulator and through the proxy in one run, so
the ratio compares like with like on this machine (metrics-cost runs in process).

`stream` is the acceptance run for SPEC §4.1 "bodies stream in both directions": the
proxy's peak RSS during a large download and upload, throughput, and whether the first
byte of a slow download reaches the client long before the upstream has finished. It
prints PASS/FAIL lines and exits 0 only if all pass. `latency` prints figures only.
`ratelimit` (SPEC §9) limits one endpoint group at the simulator and sends sequential,
curl-style requests (a new connection each, no retry of a 429) at three times that
limit, direct and through the proxy: it prints the failures of each and the proxy's total
time against the ideal (requests / limit). `compare` puts closeproxy beside a bare
aiohttp forwarder, nginx and mitmproxy (see its docstring).

Modules: `cli` (the sub-commands), one module per mode (`stream`, `latency`, `slow`,
`ratelimit`, `metrics_cost`, `compare`), and what they share: `common` (units, the
simulator + proxy rig, client sessions), `transfers` (checked downloads and uploads),
`rss` and `procfs` (memory and CPU of the proxy), `load` (wrk or the built-in generator),
`peers` (the targets `compare` starts). Process and token-file helpers shared with the
tests are in closeproxy/testing.py.

Units: sizes in MiB (2**20 bytes); throughput and RSS in MB (10**6 bytes), so the RSS
limit is the stricter reading of "80 MB".
"""
