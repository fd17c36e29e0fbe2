"""signals.on_signals: the callback runs on the loop, and leaving restores what was there."""

from __future__ import annotations

import asyncio
import os
import signal

from closeproxy.signals import on_signals


async def _deliver(signum: signal.Signals) -> None:
    os.kill(os.getpid(), signum)
    await asyncio.sleep(0.05)  # the loop reads the wakeup fd and runs the callback


async def test_the_callback_gets_the_signal_and_nesting_restores_the_outer_one() -> None:
    outer: list[signal.Signals] = []
    inner: list[signal.Signals] = []
    with on_signals((signal.SIGUSR1, signal.SIGUSR2), outer.append):
        with on_signals((signal.SIGUSR1,), inner.append):
            await _deliver(signal.SIGUSR1)
            await _deliver(signal.SIGUSR2)
        await _deliver(signal.SIGUSR1)
    assert inner == [signal.SIGUSR1]
    assert outer == [signal.SIGUSR2, signal.SIGUSR1]


async def test_leaving_puts_back_the_process_handler_from_before() -> None:
    # Under nohup SIGHUP is ignored: a proxy that stopped must not make it fatal again.
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        seen: list[signal.Signals] = []
        with on_signals((signal.SIGUSR1,), seen.append):
            await _deliver(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        await _deliver(signal.SIGUSR1)  # ignored, as before the block
    finally:
        signal.signal(signal.SIGUSR1, previous)


async def test_a_signal_taken_by_another_loop_handler_goes_back_to_its_default() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    try:
        with on_signals((signal.SIGUSR2,), lambda signum: None):
            pass
        # asyncio's placeholder cannot be brought back without its callback: the default.
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
