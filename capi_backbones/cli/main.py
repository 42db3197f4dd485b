"""Entry point of the ``capi-backbones`` command line.

``COMMANDS`` maps each subcommand to the module that registers it (its ``register(subparsers)`` function) and a
one-line summary for ``capi-backbones --help``. Only the module of the command being run is imported, and command
modules import torch and the other heavy libraries inside their handlers, so ``--help``, ``--version`` and ``list``
start in a fraction of a second. A new command is one more line in ``COMMANDS``.

Mistakes are caught before torch is imported: ``main`` runs ``cli.checks.check_common_options`` (the options several
commands share), then the command's own ``check`` function when its parser sets one
(``parser.set_defaults(handler=run, check=check_args)``), then the handler. ``python -m capi_backbones`` runs ``main``.
"""

import argparse
import sys
from importlib import import_module

from capi_backbones import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

_CLI = "capi_backbones.cli."
COMMANDS = {  # command -> (module registering it, summary shown by --help)
    "list": (_CLI + "model_commands", "list architectures and released weights"),
    "info": (_CLI + "model_commands", "describe a checkpoint: architecture, parameters, keys, dtypes"),
    "convert": (_CLI + "model_commands", "convert a checkpoint to safetensors, a folder or the official layout"),
    "extract": (_CLI + "feature_commands", "extract features of images into shards on disk"),
    "verify": (_CLI + "feature_commands", "check an extraction folder against its index"),
    "pca": (_CLI + "viz_commands", "PCA picture of the feature maps of images"),
    "explore": (_CLI + "explore_commands", "interactive feature explorer: one self-contained HTML page"),
    "train": (_CLI + "train_commands", "pretrain a CAPI model on a folder of images"),
    "export": (_CLI + "train_commands", "export the teacher (EMA) backbone of a training run"),
    "eval": (_CLI + "eval_commands", "evaluate frozen features with the paper's probes"),
    "export-onnx": (_CLI + "export_commands", "export a backbone as one ONNX graph file (any resolution)"),
    "export-torch": (_CLI + "export_commands", "export a backbone as one torch.export file (any resolution)"),
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is not an option), if it is a known one."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of ``commands`` (all when None); the other commands are only listed."""
    parser = argparse.ArgumentParser(prog="capi-backbones", description="CAPI vision backbones.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = COMMANDS if commands is None else commands
    for module in dict.fromkeys(COMMANDS[name][0] for name in names):
        import_module(module).register(subparsers)
    for name, (_, summary) in COMMANDS.items():
        if name not in subparsers.choices:  # listed by --help; running it builds its module's parser
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)  # only its module is imported; --help and --version import none
    args = build_parser([] if command is None else [command]).parse_args(argv)
    import logging  # here rather than at the top: --help and --version have exited already

    from capi_backbones.cli.checks import check_common_options
    from capi_backbones.cli.errors import CliError, EnvironmentFailure, is_environment_failure

    _configure_logging(args.verbose)
    try:
        check_common_options(args)  # mistakes in the shared options, before any command imports torch
        if getattr(args, "check", None) is not None:  # the command's own checks (set_defaults(check=...))
            args.check(args)
        _apply_download_timeout(args)
        return int(args.handler(args) or 0)
    except CliError as error:
        print(f"capi-backbones {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # disk full, permission denied, ...: one line, exit 3; other OSErrors are bugs
        if not is_environment_failure(error):
            raise
        logging.getLogger("capi_backbones.cli").debug("environment failure", exc_info=True)
        print(f"capi-backbones {args.command}: error: {EnvironmentFailure.from_os_error(error)}", file=sys.stderr)
        return EnvironmentFailure.exit_code
    except KeyboardInterrupt as interrupt:  # Ctrl-C (130) or SIGTERM during extract (143)
        print("interrupted", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)


def _apply_download_timeout(args: argparse.Namespace) -> None:
    """--download-timeout, where a command has it: given to every download of this process (and of the processes
    it starts) as $CAPI_DOWNLOAD_TIMEOUT, which the loaders read (capi_backbones.pretrained.download)."""
    import os

    from capi_backbones.constants import DOWNLOAD_TIMEOUT_ENV

    if getattr(args, "download_timeout", None) is not None:
        os.environ[DOWNLOAD_TIMEOUT_ENV] = repr(args.download_timeout)


def _configure_logging(verbose: bool) -> None:
    from capi_backbones.runtime.logs import configure_logging

    configure_logging(verbose)


if __name__ == "__main__":
    sys.exit(main())
