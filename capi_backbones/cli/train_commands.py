"""``capi-backbones train`` (CAPI pretraining) and ``capi-backbones export`` (the teacher of a run)."""

import argparse
import logging

from capi_backbones.cli.checks import check_output_file
from capi_backbones.cli.errors import USER_ERRORS, CliError, EnvironmentFailure
from capi_backbones.constants import TEACHER_EXPORT_FORMATS

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    train = subparsers.add_parser(
        "train",
        help="pretrain a CAPI model on a folder of images",
        description=(
            "Pretrain a CAPI model (the official recipe by default). CONFIG is a preset (tiny, vits14, vitb14, "
            "vitl14) or a YAML file; section.key=value arguments (before or after the options) override it, e.g. "
            "data.root=/data/images optim.batch_size=256. optim.batch_size is the GLOBAL batch over all ranks. "
            "Launch with torchrun for several GPUs or nodes. Re-running the same command resumes from the run's "
            "newest checkpoint."
        ),
    )
    train.add_argument("config", metavar="CONFIG", help="preset name or YAML file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.output_dir=runs/a")
    train.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.set_defaults(handler=run_train)
    overrides_anywhere(train)

    export = subparsers.add_parser(
        "export",
        help="export the teacher (EMA) backbone of a training run",
        description=(
            "Write the teacher backbone of RUN (a run directory: its newest checkpoint; or a checkpoint file) to "
            "OUT: .safetensors (architecture in the metadata) or .pth/.pt (the official layout, 'backbone.' "
            "keys). Both load with capi_backbones.from_pretrained(OUT) and the other commands' --weights."
        ),
    )
    export.add_argument("run", metavar="RUN", help="run directory or checkpoint file")
    export.add_argument("out", metavar="OUT", help="output file: .safetensors, .pth or .pt")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (kept if the export fails)")
    export.set_defaults(handler=run_export, check=_check_export)


def overrides_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take its KEY=VALUE overrides before, between or after its options (``train tiny --max-steps 1
    data.root=photos``): argparse stops filling a ``*`` positional at the first option, so the overrides it leaves
    over are collected here; anything else left over is still refused as an unrecognized argument."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse(args, namespace)
        late = [arg for arg in extras if "=" in arg and not arg.startswith("-")]
        if late:
            namespace.overrides = [*(namespace.overrides or []), *late]
        return namespace, [arg for arg in extras if arg not in late]

    parser.parse_known_args = parse_known_args


def run_train(args: argparse.Namespace) -> int:
    if not args.print_config:
        logger.info("Starting: loading PyTorch, then building the model and the data...")  # before the slow imports
    from capi_backbones.train.launch import quiet_other_ranks, run

    quiet_other_ranks()
    return run(args.config, args.overrides, max_steps=args.max_steps, print_config=args.print_config)


def _check_export(args: argparse.Namespace) -> None:
    """Before torch is imported: OUT has an export suffix, is not a folder, and is new unless --overwrite."""
    check_output_file(args.out, tuple(TEACHER_EXPORT_FORMATS), flag="OUT", overwrite=args.overwrite)


def run_export(args: argparse.Namespace) -> int:
    from capi_backbones.atomic_files import WriteError
    from capi_backbones.train.export import export_teacher

    try:
        result = export_teacher(args.run, args.out)
    except WriteError as error:  # disk full, no permission: the environment, not the command line (exit 3)
        raise EnvironmentFailure(str(error)) from None
    except USER_ERRORS as error:
        raise CliError(str(error)) from None
    print(
        f"Exported the teacher of {result.checkpoint} (step {result.step}, trained at {result.image_size} px) "
        f"to {result.path} ({result.format})"
    )
    return 0
