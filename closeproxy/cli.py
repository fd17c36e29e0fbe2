"""The `closeproxy` command: parses arguments, builds Settings, calls one function."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__, terminal_login
from .config import (
    DEFAULT_PORT,
    OPTIONS,
    OPTIONS_BY_NAME,
    READ_ONLY_METHODS,
    Settings,
    load_settings,
    parse_key_methods,
    parse_key_paths,
)
from .errors import CloseProxyError, ConfigError
from .file_store import FileGrantStore
from .grant import TokenSet
from .login import retire_previous
from .logs import setup_logging
from .refresh_policy import FORCE, refresh_due_at
from .revoke import revoke
from .runner import run_command
from .server import Listening, serve
from .signals import on_signals
from .status import status_document
from .tokens import TokenProvider
from .upstream import client_session
from .wiring import open_store, token_provider

_STORE = ("token_file", "token_store", "token_store_key", "token_store_secret")
_CLIENT = ("client_id", "client_secret", "api_url", *_STORE, "upstream_proxy")
_LOGGING = ("log_level", "log_format")
_SERVE = tuple(o.name for o in OPTIONS if o.name != "login_timeout")
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "serve": _SERVE,
    "login": (*_CLIENT, "redirect_uri", "app_url", "login_timeout", *_LOGGING),
    "status": (*_STORE, "api_url", "upstream_proxy"),
    "refresh": (*_CLIENT, *_LOGGING),
    "revoke": (*_CLIENT, *_LOGGING),
    "token": (*_CLIENT, "refresh_margin", *_LOGGING),
    "run": tuple(
        name for name in _SERVE if name not in {"host", "port", "unix_socket", "proxy_key"}
    ),
    "demo": ("port", *_LOGGING),
    "service": (),
}
ALIASES: dict[str, str] = {"logout": "revoke"}

Command = Callable[[Settings, argparse.Namespace], int]


class Stopped(Exception):
    """A command was stopped by a signal after cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _run_until_signal(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run, where SIGTERM and SIGHUP end the command the way Ctrl-C does.

    The main task is cancelled, so a refresh already sent to Close still finishes and
    saves the new refresh token before the process exits.
    """
    received: list[int] = []

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        with on_signals(
            (signal.SIGTERM, signal.SIGHUP), lambda signum: _cancel(task, signum, received)
        ):
            return await main

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise


def _cancel(task: asyncio.Task[int], signum: int, received: list[int]) -> None:
    received.append(signum)
    task.cancel()


def _print_ready(where: Listening) -> None:
    print(f"listening on {where.url}", flush=True)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.check_serve()
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings, on_ready=_print_ready))
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


def _rescue_unsaved(command: str, settings: Settings, provider: TokenProvider) -> int | None:
    """After a command: if Close issued tokens the disk refused, put them somewhere safe.

    Their predecessors in the token file are spent, so dropping them would force a new
    login. They go to a clearly named file (same format, mode 0600) beside the token
    file, or in a private directory under the system temp dir if that fails too; never to
    stdout, which scripts capture. Returns the exit status, or None when all was saved.
    """
    tokens = provider.unsaved
    if tokens is None:
        return None
    reason = provider.save_error or f"cannot write {settings.token_file}"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = f"{settings.token_file.name}.unsaved-{stamp}-{os.getpid()}"
    candidates = [
        settings.token_file.with_name(name),
        Path(tempfile.gettempdir()) / f"closeproxy-{os.getuid()}" / name,
    ]
    for candidate in candidates:
        try:
            FileGrantStore(candidate).write(tokens)
        except CloseProxyError:
            continue
        print(
            f"closeproxy {command}: Close issued new tokens but they could not be saved "
            f"({reason}); they are in {candidate} (readable by you only), and the refresh token in "
            f"{settings.token_file} is already spent: fix the cause, then run "
            f"`mv {candidate} {settings.token_file}` before any closeproxy refreshes again",
            file=sys.stderr,
        )
        return 1
    print(
        f"closeproxy {command}: Close issued new tokens but they could not be saved ({reason}), "
        f"nor written anywhere else, so they are lost and the refresh token in "
        f"{settings.token_file} is spent: fix the cause, then run `closeproxy login`",
        file=sys.stderr,
    )
    return 1


def cmd_refresh(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _provider(settings) as provider:
            tokens = await provider.refresh(FORCE)
        rescued = _rescue_unsaved("refresh", settings, provider)
        if rescued is not None:
            return rescued
        print(
            f"refreshed: the new access token expires in "
            f"{_format_duration(tokens.expires_in())}; saved to {provider.store.describe()}"
        )
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return _run_until_signal(run())


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
    return _run_until_signal(run())


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
    return _run_until_signal(run())


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
    status: int = asyncio.run(run_command(settings, argv, methods=methods, paths=paths))
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
    return asyncio.run(
        demo(
            settings,
            exit_after=args.exit_after,
            seed=args.seed,
            say=lambda text: print(text, flush=True),
        )
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
        rescued = _rescue_unsaved("token", settings, provider)
        if rescued is not None:
            return rescued
        print(tokens.access_token)
        return 0

    setup_logging(_quiet_level(settings), settings.log_format)
    return _run_until_signal(run())


COMMANDS: dict[str, tuple[Command, str, str]] = {
    "serve": (
        cmd_serve,
        "run the proxy until SIGINT, SIGTERM or SIGHUP",
        "Run the proxy: forwards /api/v1/* to Close with a current OAuth token. Prints "
        "`listening on http://HOST:PORT` once ready; SIGINT, SIGTERM or SIGHUP drain "
        "in-flight requests and exit 0.",
    ),
    "login": (
        cmd_login,
        "log in to Close in a browser and store the tokens",
        "Log in with the OAuth authorization code flow. With a loopback redirect URI "
        "(http://127.0.0.1:PORT/...) the browser's redirect is caught on that port, and a "
        "pasted landing URL is taken too (for a browser on another machine); otherwise, or "
        "with --no-browser, paste the URL the browser landed on. State and PKCE (S256) "
        "protect the exchange.",
    ),
    "status": (
        cmd_status,
        "show who is logged in (never a secret)",
        "Show whether a grant is stored, for which organization and user, and when the "
        "access token expires. Exits 0 when logged in, 1 when not.",
    ),
    "refresh": (
        cmd_refresh,
        "refresh the access token now",
        "Refresh the access token now. Safe while servers run: it takes the same lock.",
    ),
    "revoke": (
        cmd_revoke,
        "revoke the grant at Close and wipe the local tokens (alias: logout)",
        "Revoke the refresh and access tokens at Close, then wipe the token file. The "
        "file is wiped even when Close cannot be reached; then the exit status is 1 and "
        "the grant may still be active at Close.",
    ),
    "run": (
        cmd_run,
        "run a command against a private proxy: closeproxy run -- CMD ARGS",
        "Start the proxy on a free loopback port with a fresh random proxy key and run "
        "CMD with CLOSE_API_URL, CLOSEPROXY_URL and CLOSE_API_KEY (that key) in its "
        "environment, so a tool written for Close API keys works unchanged. With "
        "--read-only, --methods or --paths that key is limited to that scope (403 "
        "key_not_allowed otherwise, and no admin routes). Signals are forwarded; the exit "
        "status is CMD's.",
    ),
    "demo": (
        cmd_demo,
        "try it all without a Close account: simulator + logged-in proxy",
        "Start the bundled Close simulator and a proxy logged in to it (port 8730 unless "
        "busy), and print curl commands to paste. No network or account needed; the "
        "demo's tokens live in a temporary directory.",
    ),
    "service": (
        cmd_service,
        "run the proxy as a systemd user service: install, print or uninstall its unit",
        "`install` writes a systemd user unit for `closeproxy serve` with the current "
        "config file to $XDG_CONFIG_HOME/systemd/user/closeproxy.service (default "
        "~/.config/systemd/user) and prints the systemctl --user lines that enable and "
        "start it; `print` only prints the unit; `uninstall` removes it. The service reads "
        "its settings from the config file only.",
    ),
    "token": (
        cmd_token,
        "print a currently valid access token",
        "Print a currently valid access token on stdout, refreshing first if it is "
        "inside the refresh margin. For tools that take a bearer token.",
    ),
}


def _add_option(parser: argparse.ArgumentParser, name: str) -> None:
    option = OPTIONS_BY_NAME[name]
    parser.add_argument(
        option.flag,
        dest=option.name,
        metavar=option.metavar,
        action="append" if option.repeatable else "store",
        default=None,
        help=f"{option.help} [env {option.env}]",
    )


MAX_DEMO_SEED = 100_000


def _demo_seed(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_DEMO_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {MAX_DEMO_SEED}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closeproxy",
        description="A local reverse proxy for the Close API that holds the OAuth 2.0 token "
        "for you: point any tool at http://127.0.0.1:8730/api/v1/.",
        epilog="Settings come from flags, then CLOSEPROXY_* environment variables, then the "
        "config file, then defaults. `closeproxy COMMAND --help` lists a command's settings.",
    )
    parser.add_argument("--version", action="version", version=f"closeproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary, description) in COMMANDS.items():
        aliases = [alias for alias, target in ALIASES.items() if target == name]
        sub = commands.add_parser(name, help=summary, description=description, aliases=aliases)
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=None,
            help="TOML config file (default: config.toml in the user config directory) "
            "[env CLOSEPROXY_CONFIG]",
        )
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print a JSON document")
        if name == "login":
            sub.add_argument(
                "--no-browser",
                action="store_true",
                help="do not open a browser or listen for the redirect: print the URL and "
                "read the landed URL (or the code) from stdin",
            )
            sub.add_argument(
                "--no-pkce", action="store_true", help="do not send a PKCE code challenge"
            )
            sub.add_argument(
                "--keep-previous",
                action="store_true",
                help="do not revoke the grant this login replaces (by default it is revoked "
                "at Close, one quick try; a failure is reported but never fails the login)",
            )
        if name == "run":
            sub.add_argument(
                "--read-only",
                action="store_true",
                help="the child's key may only make GET and HEAD requests (no admin routes)",
            )
            sub.add_argument(
                "--methods",
                action="append",
                metavar="GET,HEAD,...",
                help="the child's key may only use these methods (comma-separated, "
                "repeatable; no admin routes)",
            )
            sub.add_argument(
                "--paths",
                action="append",
                metavar="/api/v1/lead/,...",
                help="the child's key may only reach these path prefixes under /api/v1/ "
                "(comma-separated, repeatable; no admin routes)",
            )
            sub.add_argument(
                "argv",
                nargs=argparse.REMAINDER,
                metavar="-- CMD ARGS",
                help="the command to run and its arguments",
            )
        if name == "service":
            sub.add_argument(
                "action",
                choices=("install", "print", "uninstall"),
                help="install the unit, print it, or uninstall it",
            )
        if name == "demo":
            sub.add_argument(
                "--exit-after",
                type=float,
                metavar="SECONDS",
                default=None,
                help="stop after this many seconds (default: run until Ctrl-C)",
            )
            sub.add_argument(
                "--seed",
                type=_demo_seed,
                metavar="N",
                default=None,
                help="simulate an organization with N leads (and their contacts, "
                "opportunities, tasks, activities and events), the same data for the same N "
                "(default: five sample leads)",
            )
        for option_name in COMMAND_OPTIONS[name]:
            _add_option(sub, option_name)
    return parser


def _flags(args: argparse.Namespace, command: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in COMMAND_OPTIONS[command]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    func = COMMANDS[args.command][0]
    try:
        settings = load_settings(_flags(args, args.command), config_file=args.config)
        return func(settings, args)
    except ConfigError as exc:
        print(f"closeproxy {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except CloseProxyError as exc:
        print(f"closeproxy {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"closeproxy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"closeproxy {args.command}: stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        # A bug. The details go to the debug log (redacted); the terminal gets one line.
        logging.getLogger("closeproxy").debug("unexpected error", exc_info=True)
        print(
            f"closeproxy {args.command}: unexpected error ({type(exc).__name__}); this is a "
            "bug: please report it, with the output of --log-level debug",
            file=sys.stderr,
        )
        return 1


def run() -> None:
    sys.exit(main())
