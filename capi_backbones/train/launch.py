"""Running a training job from a config name and overrides, with one-line errors and exit codes.

``capi-backbones train`` and ``python -m capi_backbones.train`` (torchrun's entry) both end here; the CLI
imports this module, never the reverse. Exit codes follow ``capi-backbones extract``: 0 done (or stopped by a
signal, resumable), 1 stopped by non-finite losses, 2 a usage or input error, 3 an environment failure
(disk full, no permission, a missing optional dependency).
"""

import argparse
import logging
import sys

from capi_backbones.constants import EXIT_ENVIRONMENT, EXIT_USAGE
from capi_backbones.constants import EXIT_INPUTS_FAILED as EXIT_NON_FINITE
from capi_backbones.runtime.exit_codes import exit_code_for
from capi_backbones.runtime.hardware import cuda_is_certainly_missing
from capi_backbones.runtime.logs import configure_logging
from capi_backbones.runtime.ranks import env_rank
from capi_backbones.train.config import ConfigError, dump_config, load_config

__all__ = ["EXIT_ENVIRONMENT", "EXIT_NON_FINITE", "EXIT_USAGE", "main", "run"]

logger = logging.getLogger(__name__)


def _fail(prog: str, message: str, code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{prog}: error: {first_line}", file=sys.stderr)
    return code


def run(
    config_source: str,
    overrides: list[str],
    *,
    max_steps: int | None = None,
    print_config: bool = False,
    prog: str = "capi-backbones train",
) -> int:
    """Load the config, train (resuming when the run directory has checkpoints) and return the exit code.
    Errors are printed as one line prefixed with ``prog``."""
    if max_steps is not None and max_steps < 1:
        return _fail(prog, f"--max-steps must be >= 1, got {max_steps}.", EXIT_USAGE)
    try:
        config = load_config(config_source, overrides)
        text = dump_config(config) if print_config else None
    except (ConfigError, ImportError) as error:
        return _fail(prog, str(error), EXIT_ENVIRONMENT if isinstance(error, ImportError) else EXIT_USAGE)
    if text is not None:  # before torch is imported
        print(text, end="")
        return 0
    if config.train.device == "cuda" and cuda_is_certainly_missing():  # said before torch is imported
        message = "train.device=cuda was asked for, but CUDA is not available here; use train.device=cpu."
        return _fail(prog, message, EXIT_USAGE)
    from capi_backbones.train.checkpointing import CheckpointNotFoundError
    from capi_backbones.train.step_runner import NonFiniteLossError
    from capi_backbones.train.trainer import train

    try:
        result = train(config, max_steps=max_steps)
    except NonFiniteLossError as error:
        return _fail(prog, str(error), EXIT_NON_FINITE)
    except (ConfigError, CheckpointNotFoundError) as error:
        return _fail(prog, str(error), EXIT_USAGE)
    except (OSError, ImportError, ValueError) as error:  # the package's one mapping; anything else is a bug
        code = exit_code_for(error)
        if code is None:
            raise
        return _fail(prog, str(error), code)
    where = f"checkpoint {result.last_checkpoint}" if result.last_checkpoint else f"run dir {result.run_dir}"
    if result.stopped_by_signal:
        logger.info("Stopped at step %d; %s. Run the same command to resume.", result.end_step, where)
    else:
        logger.info("Done: %d steps; %s.", result.end_step, where)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m capi_backbones.train CONFIG [key=value ...] [--max-steps N] [--print-config]``."""
    parser = argparse.ArgumentParser(
        prog="python -m capi_backbones.train",
        description="CAPI pretraining (the same as `capi-backbones train`; see its --help).",
    )
    parser.add_argument("config", metavar="CONFIG", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.output_dir=runs/a")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    configure_logging()
    quiet_other_ranks()
    return run(args.config, args.overrides, max_steps=args.max_steps, print_config=args.print_config, prog=parser.prog)


def quiet_other_ranks() -> None:
    """One progress log per job: ranks other than 0 (torchrun's RANK) log warnings only."""
    if env_rank() != 0:
        logging.getLogger("capi_backbones").setLevel(logging.WARNING)
