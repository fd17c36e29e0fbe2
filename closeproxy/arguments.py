"""The command line's shape: each command's flags, built from the settings' declarations.

A setting's flag, metavar, help and default come from its declaration in settings.py;
this module only says which command takes which settings, and adds the few flags that
are a command's own (`status --json`, `login --no-browser`, ...).
"""

from __future__ import annotations

import argparse

from . import __version__
from .config import CONFIG, OPTIONS, OPTIONS_BY_NAME, Option

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
    "demo": ("port", *_LOGGING, "event_loop"),
    "service": (),
}
ALIASES: dict[str, str] = {"logout": "revoke"}

COMMAND_HELP: dict[str, tuple[str, str]] = {
    "serve": (
        "run the proxy until SIGINT, SIGTERM or SIGHUP",
        "Run the proxy: forwards /api/v1/* to Close with a current OAuth token. Prints "
        "`listening on http://HOST:PORT` once ready; SIGINT, SIGTERM or SIGHUP drain "
        "in-flight requests and exit 0.",
    ),
    "login": (
        "log in to Close in a browser and store the tokens",
        "Log in with the OAuth authorization code flow. With a loopback redirect URI "
        "(http://127.0.0.1:PORT/...) the browser's redirect is caught on that port, and a "
        "pasted landing URL is taken too (for a browser on another machine); otherwise, or "
        "with --no-browser, paste the URL the browser landed on. State and PKCE (S256) "
        "protect the exchange.",
    ),
    "status": (
        "show who is logged in (never a secret)",
        "Show whether a grant is stored, for which organization and user, and when the "
        "access token expires. Exits 0 when logged in, 1 when not.",
    ),
    "refresh": (
        "refresh the access token now",
        "Refresh the access token now. Safe while servers run: it takes the same lock.",
    ),
    "revoke": (
        "revoke the grant at Close and wipe the local tokens (alias: logout)",
        "Revoke the refresh and access tokens at Close, then wipe the token file. The "
        "file is wiped even when Close cannot be reached; then the exit status is 1 and "
        "the grant may still be active at Close.",
    ),
    "run": (
        "run a command against a private proxy: closeproxy run -- CMD ARGS",
        "Start the proxy on a free loopback port with a fresh random proxy key and run "
        "CMD with CLOSE_API_URL, CLOSEPROXY_URL and CLOSE_API_KEY (that key) in its "
        "environment, so a tool written for Close API keys works unchanged. With "
        "--read-only, --methods or --paths that key is limited to that scope (403 "
        "key_not_allowed otherwise, and no admin routes). Signals are forwarded; the exit "
        "status is CMD's.",
    ),
    "demo": (
        "try it all without a Close account: simulator + logged-in proxy",
        "Start the bundled Close simulator and a proxy logged in to it (port 8730 unless "
        "busy), and print curl commands to paste. No network or account needed; the "
        "demo's tokens live in a temporary directory.",
    ),
    "service": (
        "run the proxy as a systemd user service: install, print or uninstall its unit",
        "`install` writes a systemd user unit for `closeproxy serve` with the current "
        "config file to $XDG_CONFIG_HOME/systemd/user/closeproxy.service (default "
        "~/.config/systemd/user) and prints the systemctl --user lines that enable and "
        "start it; `print` only prints the unit; `uninstall` removes it. The service reads "
        "its settings from the config file only.",
    ),
    "token": (
        "print a currently valid access token",
        "Print a currently valid access token on stdout, refreshing first if it is "
        "inside the refresh margin. For tools that take a bearer token.",
    ),
}


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    parser.add_argument(
        option.flag,
        dest=option.name,
        metavar=option.metavar,
        action="append" if option.repeatable else "store",
        default=None,
        help=f"{option.help} [env {option.env}]".replace("%", "%%"),
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
    for name, (summary, description) in COMMAND_HELP.items():
        aliases = [alias for alias, target in ALIASES.items() if target == name]
        sub = commands.add_parser(name, help=summary, description=description, aliases=aliases)
        _add_option(sub, CONFIG)
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
            _add_option(sub, OPTIONS_BY_NAME[option_name])
    return parser


def flags_of(args: argparse.Namespace, command: str) -> dict[str, object]:
    """The settings given as flags to `command`, by name (None where not given)."""
    values: dict[str, object] = {name: getattr(args, name) for name in COMMAND_OPTIONS[command]}
    return values
