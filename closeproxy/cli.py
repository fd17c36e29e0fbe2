"""The `closeproxy` command: parses arguments, builds Settings, calls one function.

The parser is built in arguments.py from the settings' declarations; the commands
themselves live in commands.py.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .arguments import ALIASES, COMMAND_OPTIONS, build_parser, flags_of
from .commands import COMMANDS
from .config import load_settings
from .errors import CloseProxyError, ConfigError
from .signals import Stopped

__all__ = ["COMMANDS", "COMMAND_OPTIONS", "build_parser", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    func = COMMANDS[args.command]
    try:
        settings = load_settings(flags_of(args, args.command), config_file=args.config)
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
