"""Entry point of the ``capi-backbones`` command line."""

import argparse
import logging
import sys

from capi_backbones.cli import (
    eval_commands,
    export_commands,
    feature_commands,
    model_commands,
    train_commands,
    viz_commands,
)
from capi_backbones.cli.errors import CliError, EnvironmentFailure, is_environment_failure

__all__ = ["main", "build_parser"]

COMMAND_MODULES = (model_commands, feature_commands, viz_commands, train_commands, eval_commands, export_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capi-backbones", description="CAPI vision backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args) or 0)
    except CliError as error:
        print(f"capi-backbones {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # disk full, permission denied, ...: one line, exit 3; other OSErrors are bugs
        if not is_environment_failure(error):
            raise
        logging.getLogger(__name__).debug("environment failure", exc_info=True)
        print(f"capi-backbones {args.command}: error: {EnvironmentFailure.from_os_error(error)}", file=sys.stderr)
        return EnvironmentFailure.exit_code
    except KeyboardInterrupt as interrupt:  # Ctrl-C (130) or SIGTERM during extract (143)
        print("interrupted", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
