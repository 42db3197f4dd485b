"""``capi-backbones train`` (CAPI pretraining) and ``capi-backbones export`` (the teacher of a run)."""

import argparse
import logging
import os
import sys

from capi_backbones.cli.errors import USER_ERRORS, CliError

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    train = subparsers.add_parser(
        "train",
        help="pretrain a CAPI model on a folder of images",
        description=(
            "Pretrain a CAPI model (the official recipe by default). CONFIG is a preset (tiny, vits14, vitb14, "
            "vitl14) or a YAML file; section.key=value arguments override it, e.g. data.root=/data/images "
            "optim.batch_size=256. optim.batch_size is the GLOBAL batch over all ranks. Launch with torchrun "
            "for several GPUs or nodes. Re-running the same command resumes from the run's newest checkpoint."
        ),
    )
    train.add_argument("config", metavar="CONFIG", help="preset name or YAML file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.output_dir=runs/a")
    train.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.set_defaults(handler=run_train)

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
    export.set_defaults(handler=run_export)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from capi_backbones.train.config import config_to_dict, load_config
    from capi_backbones.train.trainer import NonFiniteLossError, train

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one progress log per job, from rank 0
    try:
        config = load_config(args.config, args.overrides)
    except USER_ERRORS as error:
        raise CliError(str(error)) from None
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise CliError(f"--max-steps must be >= 1, got {args.max_steps}.")
    try:
        result = train(config, max_steps=args.max_steps)
    except NonFiniteLossError as error:
        print(f"capi-backbones train: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise CliError(str(error)) from None
    where = f"checkpoint {result.last_checkpoint}" if result.last_checkpoint else f"run dir {result.run_dir}"
    if result.stopped_by_signal:
        logger.info("Stopped at step %d; %s. Run the same command to resume.", result.end_step, where)
    else:
        logger.info("Done: %d steps; %s.", result.end_step, where)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from capi_backbones.train.export import export_teacher

    try:
        result = export_teacher(args.run, args.out)
    except USER_ERRORS as error:
        raise CliError(str(error)) from None
    print(f"Exported the teacher of {result.checkpoint} (step {result.step}) to {result.path} ({result.format})")
    return 0
