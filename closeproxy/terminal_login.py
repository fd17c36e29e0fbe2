"""`closeproxy login` in a terminal: catch the redirect on loopback, or read a pasted URL.

With a loopback redirect URI both run at once, and the first valid answer wins: over SSH
the browser is on another machine and its redirect never reaches the listener, so the
address it landed on can be pasted instead.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qs

from aiohttp import web
from yarl import URL

from .config import Settings
from .errors import CloseProxyError, ConfigError, LoginFailed
from .grant import GrantStore
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
from .terminal import Prompt, StdinLines, open_browser


async def login(
    settings: Settings,
    oauth: OAuthClient,
    store: GrantStore,
    *,
    browser: bool,
    pkce: bool,
    err: TextIO,
) -> LoginResult:
    """Run the whole login; progress goes to `err`, nothing is written unless it succeeds."""
    redirect_uri = settings.redirect_uri
    pending = start_login(settings, redirect_uri=redirect_uri, pkce=pkce)
    flow = _Flow(settings, oauth, store, pending, err)
    if browser and is_loopback_redirect(redirect_uri):
        return await flow.via_loopback()
    return await flow.via_paste(browser=browser)


@dataclass
class _Flow:
    """One login waiting for its answer, from the loopback listener or from stdin."""

    settings: Settings
    oauth: OAuthClient
    store: GrantStore
    pending: PendingLogin
    err: TextIO
    claimed: bool = False  # set before the code exchange: one answer only, whoever wins
    prompt: Prompt = field(init=False)

    def __post_init__(self) -> None:
        self.prompt = Prompt(self.err)

    def say(self, text: str) -> None:
        self.prompt.say(text)

    def note(self, text: str) -> None:
        self.prompt.note(text)

    async def show_url(self, *, browser: bool) -> None:
        url = self.pending.url
        if not browser:
            self.say(f"Open this URL in a browser to log in to Close:\n\n  {url}\n")
        elif await open_browser(url):
            self.say(
                "Opened a browser to log in to Close. If it did not open, or it is on another "
                f"machine, visit:\n\n  {url}\n"
            )
        else:
            self.say(
                "No browser could be opened here (no display). Open this URL in a browser, on "
                f"any machine, to log in to Close:\n\n  {url}\n"
            )

    # --- the two ways ------------------------------------------------------------------

    async def via_loopback(self) -> LoginResult:
        assert self.pending.redirect_uri is not None
        target = URL(self.pending.redirect_uri)
        done: asyncio.Future[LoginResult] = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._callback_handler(target, done))
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
            await self.show_url(browser=True)
            self.say(
                f"Waiting for the browser to come back to {target.with_query(None)}. If the "
                "browser is on another machine, paste the address it landed on here."
            )
            return await self.wait(done, listening=True)
        finally:
            await runner.cleanup()

    async def via_paste(self, *, browser: bool) -> LoginResult:
        await self.show_url(browser=browser)
        self.say("Then paste the address your browser landed on (or just the code).")
        never: asyncio.Future[LoginResult] = asyncio.get_running_loop().create_future()
        return await self.wait(never, listening=False)

    # --- the loopback listener ---------------------------------------------------------

    def _callback_handler(
        self, target: URL, done: asyncio.Future[LoginResult]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def callback(request: web.Request) -> web.StreamResponse:
            if request.path != (target.path or "/"):
                return callback_page(
                    404, "Not found", "This address only takes the login callback."
                )
            received = Callback.from_query(parse_qs(request.query_string, keep_blank_values=True))
            if self.claimed:
                # A reload, a second tab, or a pasted answer came first: the state is spent.
                return callback_page(
                    400,
                    "Login link already used",
                    "This login has already been completed or refused; see the terminal.",
                )
            if not self._belongs(received):
                # Not ours (stale tab, another login, a forged link): refuse, keep waiting.
                self.note("refused a callback whose state does not match this login; still waiting")
                return callback_page(
                    400,
                    "Login link not valid",
                    "This callback does not belong to the login that is waiting. Start again "
                    "with `closeproxy login`.",
                )
            self.claimed = True  # before any await: a second callback must not exchange too
            try:
                tokens = await self._finish(received)
            except CloseProxyError as exc:
                if not done.done():
                    done.set_exception(exc)
                return callback_page(400, "Login failed", str(exc))
            if not done.done():
                done.set_result(tokens)
            return success_page(tokens.tokens, self.store.describe())

        return callback

    def _belongs(self, received: Callback) -> bool:
        """A callback for this login (or a bare code, which the user vouches for)."""
        if received.bare:
            return True
        return received.state is not None and hmac.compare_digest(
            received.state.encode(), self.pending.state.encode()
        )

    async def _finish(self, received: Callback) -> LoginResult:
        code = check_callback(self.pending, received)
        return await finish_login(self.oauth, self.store, self.pending, code)

    # --- waiting for whichever answer comes first --------------------------------------

    async def wait(self, done: asyncio.Future[LoginResult], *, listening: bool) -> LoginResult:
        """The tokens from `done` (the listener) or from a pasted line, whichever is first."""
        timeout = self.settings.login_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lines = StdinLines(loop)
        prompt = self.prompt
        prompt.is_open, prompt.deadline, prompt.listening = False, deadline, listening
        interactive = prompt.on_terminal
        if not interactive:
            self.say(f"waiting for the browser… (up to {timeout:g} s; Ctrl-C to cancel)")
        ticker = asyncio.ensure_future(prompt.tick(deadline)) if interactive else None
        reading = True
        get: asyncio.Future[str | None] | None = None
        try:
            while True:
                if interactive and not prompt.is_open:
                    prompt.show()
                if reading and get is None:
                    get = asyncio.ensure_future(lines.get())
                waiting: set[asyncio.Future[Any]] = {done}
                if get is not None:
                    waiting.add(get)
                finished, _ = await asyncio.wait(
                    waiting, timeout=max(deadline - loop.time(), 0), return_when="FIRST_COMPLETED"
                )
                if done in finished:
                    prompt.close(erase=True)
                    return done.result()
                if not finished:
                    prompt.close(erase=False)
                    what = "no callback arrived" if listening else "nothing was pasted"
                    raise LoginFailed(
                        f"{what} within {timeout:g} s: run `closeproxy login` again (or raise "
                        "--login-timeout)"
                    )
                assert get is not None
                line, get = get.result(), None
                prompt.is_open = False  # the user pressed Enter: the line has ended
                if line is None:  # end of input
                    reading = False
                    if listening:
                        continue
                    raise LoginFailed(
                        "no input: paste the URL the browser landed on into `closeproxy login`, "
                        "or pipe it in (echo URL | closeproxy login --no-browser)"
                    )
                tokens = await self._pasted(line, final=not (listening or interactive))
                if tokens is not None:
                    return tokens
        finally:
            if ticker is not None:
                ticker.cancel()
            if get is not None:
                get.cancel()
            # Ctrl-C (a cancellation) or any error: end the prompt line before what follows.
            prompt.close(erase=False)

    async def _pasted(self, line: str, *, final: bool) -> LoginResult | None:
        """Tokens for a valid pasted answer; None to keep waiting after a wrong one."""
        line = line.strip()
        if not line:
            return None
        received = Callback.from_pasted(line)
        if self.claimed:
            return None  # the listener got there first; its result arrives through `done`
        if not self._belongs(received) and not final:
            try:
                check_callback(self.pending, received)
            except LoginFailed as exc:
                self.note(f"{exc}; still waiting")
            return None
        self.claimed = True
        return await self._finish(received)
