"""A Close look-alike on a real port, for tests, the benchmark, ``closeproxy demo`` and
offline development (``python -m closeproxy.sim --seed 500 --data DIR``).

Layout, arrows pointing one way:

- ``config``: ``SimConfig`` and knob parsers; ``state``: tokens, counters, knobs, logs.
- ``oauth``: /oauth2/ authorize, token (strict rotation), revoke.
- ``gate``: what every /api/v1/ call passes (log, auth, forced 401s, ``ratelimit``).
- ``rest``/``validate``/``query``: Close's error shapes, paging, payload checks, search.
- ``org``: the organization's collections, event log and persistence; ``seed``: its data.
- one module per resource family: ``users``, ``leads`` (and contacts), ``statuses``,
  ``custom_fields``, ``opportunities``, ``tasks``, ``activities``, ``events``.
- ``testing``: /api/v1/_sim/ helpers; ``control``: /_sim/ routes; ``payloads``: bodies.
"""

from closeproxy.sim.app import (
    SIM_STATE,
    RecordedRequest,
    RunningSim,
    SimConfig,
    SimState,
    create_sim_app,
    run_sim,
)
from closeproxy.sim.org import DataFileError
from closeproxy.sim.payloads import download_sha256

__all__ = [
    "SIM_STATE",
    "DataFileError",
    "RecordedRequest",
    "RunningSim",
    "SimConfig",
    "SimState",
    "create_sim_app",
    "download_sha256",
    "run_sim",
]
