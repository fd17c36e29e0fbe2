"""The bodies of the `closeproxy` commands: each takes Settings and the parsed arguments."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from . import loop, terminal_login
from .config import DEFAULT_PORT, READ_ONLY_METHODS, Settings, parse_key_methods, parse_key_paths
from .errors import ConfigError
from .grant import TokenSet
from .login import retire_previous
from .logs import setup_logging
from .refresh_policy import FORCE, refresh_due_at
from .rescue import rescue_unsaved
from .revoke import revoke
from .runner import run_command
from .server import Listening, serve
from .signals import run_until_signal
from .status import status_document
from .tokens import TokenProvider
from .upstream import client_session
from .wiring import open_store, token_provider

Command = Callable[[Settings, argparse.Namespace], int]


def _print_ready(where: Listening) -> None:
    print(f"listening on {where.url}", flush=True)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.check_serve()
    setup_logging(settings.log_level, settings.log_format)
    loop.run(settings, lambda: serve(settings, on_ready=_print_ready))
    return 0


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    route = settings.upstream_route()

    async def load() -> TokenSet | None:
        try:
            return (await store.load()).tokens
        finally:
            await store.aclose()

    doc = status_document(asyncio.run(load()), store)
    doc["upstream_proxy"] = route.document()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0 if doc["logged_in"] else 1
    lines = ["logged in to Close" if doc["logged_in"] else "not logged in"]
    rows = [
        ("organization", doc.get("organization_id")),
        ("user", doc.get("user_id")),
        ("scope", doc.get("scope")),
        ("API", doc.get("api_url")),
    ]
    if "expires_in" in doc:
        left = doc["expires_in"]
        when = (
            f"{_format_duration(left)} left (expires {doc['expires_at']})"
            if left > 0
            else f"expired {_format_duration(-left)} ago (at {doc['expires_at']})"
        )
        rows.append(("access token", when))
        rows.append(("refreshable", "yes" if doc["can_refresh"] else "no"))
    if "token_file" in doc:
        rows.append(("token file", doc["token_file"]))
    else:
        encrypted = "encrypted" if doc.get("encrypted") else "not encrypted"
        store_row = f"{doc['token_store']} key {doc['token_store_key']} ({encrypted})"
        rows.append(("token store", store_row))
    rows.append(("outbound", route.label))
    lines += [f"  {name:<13} {value}" for name, value in rows if value is not None]
    if doc.get("problem"):
        lines.append(f"  {doc['problem']}")
    print("\n".join(lines))
    return 0 if doc["logged_in"] else 1


@contextlib.asynccontextmanager
async def _provider(
    settings: Settings, *, require_client: bool = True
) -> AsyncIterator[TokenProvider]:
    if require_client:
        settings.require_client()
    async with client_session(settings.upstream_route()) as session:
        provider = token_provider(
            settings,
            session,
            log_failures=False,  # the command prints the failure itself, once
            request_wait=None,  # a command waits for the refresh it started, however slow
        )
        try:
            yield provider
        finally:
            await provider.aclose()


def cmd_refresh(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _provider(settings) as provider:
            tokens = await provider.refresh(FORCE)
        rescued = rescue_unsaved("refresh", settings, provider)
        if rescued is not None:
            return rescued
        print(
            f"refreshed: the new access token expires in "
            f"{_format_duration(tokens.expires_in())}; saved to {provider.store.describe()}"
        )
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return run_until_signal(run())


def cmd_login(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _provider(settings) as provider:
            assert provider.oauth is not None
            result = await terminal_login.login(
                settings,
                provider.oauth,
                provider.store,
                browser=not args.no_browser,
                pkce=not args.no_pkce,
                err=sys.stderr,
            )
            tokens = result.tokens
            print(
                f"logged in to Close: organization {tokens.organization_id or '?'}, "
                f"user {tokens.user_id or '?'}\ntokens stored in {provider.store.describe()}",
                flush=True,
            )
            if args.keep_previous:
                if result.previous is not None:
                    print("kept the previous grant active at Close (--keep-previous)")
            else:
                retired = await retire_previous(provider.oauth, result)
                if retired.revoked:
                    print(retired.message)
                elif retired.message is not None:
                    print(f"closeproxy login: note: {retired.message}", file=sys.stderr)
        if tokens.refresh_token is None:
            print(
                "note: Close gave no refresh token (the OAuth app lacks offline_access), so "
                "the session ends when the access token expires"
            )
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return run_until_signal(run())


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _provider(settings, require_client=False) as provider:
            outcome = await revoke(provider)
        if not outcome.had_grant:
            print(f"not logged in: nothing to revoke ({provider.store.describe()} is empty)")
            return 0
        if outcome.problem:
            print(f"closeproxy revoke: {outcome.problem}", file=sys.stderr)
            return 1
        print(f"revoked the grant at Close and wiped {provider.store.describe()}")
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return run_until_signal(run())


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError(
            "nothing to run: give a command after --, e.g. `closeproxy run -- python sync.py`",
            setting="command",
        )
    methods = None
    if args.read_only and args.methods:
        raise ConfigError(
            "--read-only already means --methods GET,HEAD: give one of them", setting="methods"
        )
    if args.read_only:
        methods = READ_ONLY_METHODS
    elif args.methods:
        methods = parse_key_methods(",".join(args.methods), "--methods")
    paths = parse_key_paths(",".join(args.paths), "--paths") if args.paths else ()
    setup_logging(_quiet_level(settings), settings.log_format)
    status: int = loop.run(
        settings, lambda: run_command(settings, argv, methods=methods, paths=paths)
    )
    return status


def cmd_service(settings: Settings, args: argparse.Namespace) -> int:
    from . import service

    if args.action == "print":
        outcome = service.Outcome(
            [service.render_unit(settings).rstrip("\n")],
            service.shell_notes(settings, os.environ),
        )
    elif args.action == "install":
        outcome = service.install(settings)
    else:
        outcome = service.uninstall()
    for note in outcome.notes:
        print(f"closeproxy service: note: {note}", file=sys.stderr)
    print("\n".join(outcome.out), flush=True)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from .demo import demo  # the simulator is loaded only for the demo

    setup_logging(settings.log_level, settings.log_format)
    if "port" not in settings.sources:
        settings = replace(settings, port=DEFAULT_PORT)
    return loop.run(
        settings,
        lambda: demo(
            settings,
            exit_after=args.exit_after,
            seed=args.seed,
            say=lambda text: print(text, flush=True),
        ),
    )


def _quiet_level(settings: Settings) -> str:
    """Commands sharing the terminal with someone else log warnings only, unless asked."""
    return settings.log_level if "log_level" in settings.sources else "warning"


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _provider(settings, require_client=False) as provider:
            stored = await provider.snapshot()
            if (
                provider.oauth is None
                and stored is not None
                and stored.refresh_token is not None
                and not stored.refresh_rejected
                and time.time() >= refresh_due_at(stored, provider.margin)
            ):
                settings.require_client()  # only a due refresh needs the OAuth client
            tokens = await provider.current(wait_for_refresh=True)
        rescued = rescue_unsaved("token", settings, provider)
        if rescued is not None:
            return rescued
        print(tokens.access_token)
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return run_until_signal(run())


COMMANDS: dict[str, Command] = {
    "serve": cmd_serve,
    "login": cmd_login,
    "status": cmd_status,
    "refresh": cmd_refresh,
    "revoke": cmd_revoke,
    "run": cmd_run,
    "demo": cmd_demo,
    "service": cmd_service,
    "token": cmd_token,
}
