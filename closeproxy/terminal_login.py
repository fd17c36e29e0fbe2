"""`closeproxy login` in a terminal: catch the redirect on loopback, or read a pasted URL."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import webbrowser
from typing import TextIO
from urllib.parse import parse_qs

from aiohttp import web
from yarl import URL

from .config import Settings
from .errors import CloseProxyError, ConfigError, LoginFailed
from .login import (
    Callback,
    LoginResult,
    PendingLogin,
    callback_page,
    check_callback,
    finish_login,
    is_loopback_redirect,
    start_login,
    success_page,
)
from .oauth import OAuthClient
from .store import TokenStore


def can_open_browser() -> bool:
    """Only where a graphical browser can appear: a console browser would take the terminal."""
    return bool(
        os.environ.get("BROWSER")
        or os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or sys.platform in {"darwin", "win32"}
    )


async def open_browser(url: str) -> bool:
    if not can_open_browser():
        return False
    try:
        return await asyncio.to_thread(webbrowser.open, url)
    except webbrowser.Error:
        return False


async def login(
    settings: Settings,
    oauth: OAuthClient,
    store: TokenStore,
    *,
    browser: bool,
    pkce: bool,
    err: TextIO,
) -> LoginResult:
    """Run the whole login; progress goes to `err`, nothing is written unless it succeeds."""
    redirect_uri = settings.redirect_uri
    pending = start_login(settings, redirect_uri=redirect_uri, pkce=pkce)
    if browser and is_loopback_redirect(redirect_uri):
        return await _via_loopback(settings, oauth, store, pending, err)
    return await _via_paste(settings, oauth, store, pending, err, browser=browser)


async def _via_loopback(
    settings: Settings,
    oauth: OAuthClient,
    store: TokenStore,
    pending: PendingLogin,
    err: TextIO,
) -> LoginResult:
    assert pending.redirect_uri is not None
    target = URL(pending.redirect_uri)
    done: asyncio.Future[LoginResult] = asyncio.get_running_loop().create_future()
    claimed = False

    async def callback(request: web.Request) -> web.StreamResponse:
        nonlocal claimed
        if request.path != (target.path or "/"):
            return callback_page(404, "Not found", "This address only takes the login callback.")
        received = Callback.from_query(parse_qs(request.query_string, keep_blank_values=True))
        if claimed:
            # A reload or a second tab: the state is spent the moment the first one came.
            return callback_page(
                400,
                "Login link already used",
                "This login has already been completed or refused; see the terminal.",
            )
        if received.state != pending.state:
            # Not ours (stale tab, another login, a forged link): refuse, keep waiting.
            print(
                "refused a callback whose state does not match this login; still waiting",
                file=err,
                flush=True,
            )
            return callback_page(
                400,
                "Login link not valid",
                "This callback does not belong to the login that is waiting. Start again with "
                "`closeproxy login`.",
            )
        claimed = True  # before any await: a second callback must not exchange the code too
        try:
            code = check_callback(pending, received)
            result = await finish_login(oauth, store, pending, code)
        except CloseProxyError as exc:
            done.set_exception(exc)
            return callback_page(400, "Login failed", str(exc))
        done.set_result(result)
        return success_page(result.tokens, str(store.path))

    app = web.Application()
    app.router.add_get("/{tail:.*}", callback)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    host, port = target.host or "127.0.0.1", target.port or 80
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for the login callback "
                f"({exc.strerror or exc}): free the port or register another redirect URI",
                setting="redirect_uri",
            ) from None
        opened = await open_browser(pending.url)
        print(
            (
                "Opened your browser to log in to Close. If it did not open, visit:\n\n  "
                if opened
                else "Open this URL in a browser to log in to Close:\n\n  "
            )
            + pending.url
            + "\n",
            file=err,
        )
        print(
            f"waiting for the browser… (up to {settings.login_timeout:g} s; Ctrl-C to cancel)",
            file=err,
            flush=True,
        )
        try:
            return await asyncio.wait_for(asyncio.shield(done), settings.login_timeout)
        except TimeoutError:
            raise LoginFailed(
                f"no callback arrived within {settings.login_timeout:g} s: run `closeproxy "
                "login` again (or raise --login-timeout)"
            ) from None
    finally:
        await runner.cleanup()


async def _via_paste(
    settings: Settings,
    oauth: OAuthClient,
    store: TokenStore,
    pending: PendingLogin,
    err: TextIO,
    *,
    browser: bool,
) -> LoginResult:
    opened = browser and await open_browser(pending.url)
    print(
        (
            "Opened your browser to log in to Close. If it did not open, visit:\n\n  "
            if opened
            else "Open this URL in a browser and log in to Close:\n\n  "
        )
        + pending.url
        + "\n",
        file=err,
        flush=True,
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "Then paste the URL your browser landed on (or just the code): ",
            end="",
            file=err,
            flush=True,
        )
    line = await _read_line(wait=settings.login_timeout)
    if line is None:
        raise LoginFailed(
            f"nothing was pasted within {settings.login_timeout:g} s: run `closeproxy login` "
            "again (or raise --login-timeout)"
        )
    if not line:
        raise LoginFailed(
            "no input: paste the URL the browser landed on into `closeproxy login`, or pipe "
            "it in (echo URL | closeproxy login --no-browser)"
        )
    code = check_callback(pending, Callback.from_pasted(line))
    return await finish_login(oauth, store, pending, code)


def _settle(result: asyncio.Future[str], line: str) -> None:
    if not result.done():
        result.set_result(line)


async def _read_line(*, wait: float) -> str | None:
    """One line from stdin; None on timeout. A daemon thread, so a timeout never hangs exit."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        loop.call_soon_threadsafe(_settle, result, line)

    threading.Thread(target=read, name="closeproxy-stdin", daemon=True).start()
    try:
        return (await asyncio.wait_for(result, wait)).strip()
    except TimeoutError:
        return None
