"""A small Close look-alike on a real port, for tests, the benchmark and ``closeproxy demo``."""

from closeproxy.sim.app import (
    SIM_STATE,
    RecordedRequest,
    RunningSim,
    SimConfig,
    SimState,
    create_sim_app,
    run_sim,
)
from closeproxy.sim.payloads import download_sha256

__all__ = [
    "SIM_STATE",
    "RecordedRequest",
    "RunningSim",
    "SimConfig",
    "SimState",
    "create_sim_app",
    "download_sha256",
    "run_sim",
]
