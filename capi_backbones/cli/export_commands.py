"""``capi-backbones export-onnx | export-torch``: one graph of a backbone that runs at any resolution."""

import argparse
import contextlib
import importlib.util
import logging
import tempfile
from pathlib import Path

from capi_backbones.cli.errors import USER_ERRORS, CliError, EnvironmentFailure
from capi_backbones.cli.model_options import _device, add_weights_options, load_model
from capi_backbones.constants import EXPORT_OUTPUTS as OUTPUT_NAMES
from capi_backbones.constants import MIN_ONNX_OPSET as MIN_OPSET
from capi_backbones.constants import N_REGISTERS, PATCH_SIZE

__all__ = ["register"]

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # fp32 graph against the eager model (the tests see ~3e-6 on small models)
THIRD_PARTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    for command, suffix, kind in (("export-onnx", ".onnx", "ONNX graph"), ("export-torch", ".pt2", "torch.export")):
        parser = subparsers.add_parser(
            command,
            help=f"export a backbone as one {kind} file that runs at any resolution",
            description=f"Export the backbone as a {kind} file ({suffix}) with a symbolic batch size, height and width "
            f"(any multiples of {PATCH_SIZE}). Input: images (B, 3, H, W), normalised as for the model; outputs, in "
            f"this order: pooled (B, D), registers (B, {N_REGISTERS}, D), patch_features (B, H/{PATCH_SIZE}, "
            f"W/{PATCH_SIZE}, D). The file is then run "
            "at two other sizes and compared with the model (skip with --no-verify).",
        )
        parser.add_argument("output", metavar="OUTPUT", help=f"file to write, ending in {suffix}")
        add_weights_options(parser)
        parser.add_argument(
            "--outputs",
            nargs="+",
            choices=OUTPUT_NAMES,
            default=list(OUTPUT_NAMES),
            help="outputs of the graph (default all); without pooled the predictor is left out (dense only)",
        )
        parser.add_argument(
            "--device", default="cpu", help="device the graph is traced for and runs on: cpu (default), cuda, ..."
        )
        if command == "export-onnx":
            parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: torch's)")
        parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
        parser.add_argument("--no-verify", action="store_true", help="skip running the file against the model")
        parser.set_defaults(handler=run_export)


def _check_arguments(args: argparse.Namespace, onnx: bool) -> Path:
    """Every argument that can be checked before torch is imported or the model is loaded; errors name the flags."""
    suffix = ".onnx" if onnx else ".pt2"
    path = Path(args.output)
    if path.suffix != suffix:
        raise CliError(f"OUTPUT {path} must end in {suffix}, e.g. {path.with_suffix(suffix).name}.")
    if path.is_dir():
        raise CliError(f"OUTPUT {path} is a folder; give a file name ending in {suffix}.")
    if path.exists() and not args.overwrite:
        raise CliError(f"OUTPUT {path} exists; pass --overwrite to replace it (it is kept if the export fails).")
    if onnx:
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise CliError(f"export-onnx needs {' and '.join(missing)}: pip install {' '.join(missing)}.")
        if args.opset is not None:
            newest = args.opset
            if args.opset >= MIN_OPSET:  # only then is the newest opset worth importing onnx for
                import onnx

                newest = onnx.defs.onnx_opset_version()
            if not MIN_OPSET <= args.opset <= newest:
                newest_text = f"to {newest} (the newest the installed onnx knows)" if newest > MIN_OPSET else "or newer"
                raise CliError(
                    f"--opset {args.opset} cannot be exported: use --opset {MIN_OPSET} {newest_text}, or leave it out "
                    "for torch's default."
                )
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """Create and remove a file next to OUTPUT, so that a folder that takes no files (read-only, /proc) fails now
    rather than after the export."""
    if not path.parent.is_dir():
        return  # created by the export
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        from capi_backbones.atomic_files import WriteError

        raise EnvironmentFailure(str(WriteError(path, error))) from None


@contextlib.contextmanager
def _third_party_logs_at_warning(verbose: bool):
    """The exporters' own INFO logs (onnxscript: one line per initializer) stay out of the command's output."""
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    if not verbose:
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_export(args: argparse.Namespace) -> int:
    onnx = args.command == "export-onnx"
    _check_arguments(args, onnx)
    import torch

    from capi_backbones import export
    from capi_backbones.atomic_files import WriteError

    device = _device(args)
    try:
        model, description = load_model(args)
        model = model.to(torch.device(device)).eval()
        with _third_party_logs_at_warning(getattr(args, "verbose", False)):
            if onnx:
                path = export.export_onnx(
                    model, args.output, args.outputs, opset_version=args.opset, overwrite=args.overwrite
                )
            else:
                path = export.export_torch(model, args.output, args.outputs, overwrite=args.overwrite)
    except WriteError as error:  # disk full, no permission, a folder that takes no files (/proc): exit 3
        raise EnvironmentFailure(str(error)) from error
    except (*USER_ERRORS, FileExistsError, ImportError) as error:  # ImportError: onnx / onnxscript not installed
        raise CliError.from_exception(error) from error
    print(f"wrote {path} ({description}; outputs: {', '.join(export.check_outputs(args.outputs))})")
    if args.no_verify:
        return 0
    artifact = _onnx_runner(path) if onnx else torch.export.load(path).module()
    if artifact is None:
        print("not verified: onnxruntime is not installed (pip install onnxruntime)")
        return 0
    difference = export.max_difference(model, artifact, args.outputs)
    if difference > TOLERANCE:
        raise CliError(f"{path} differs from the model by {difference:.2e} (> {TOLERANCE:g}); do not use it.")
    print(f"verified at two other sizes: largest difference from the model {difference:.2e}")
    return 0


def _onnx_runner(path):
    """``images -> outputs`` through onnxruntime on CPU, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images):
        return [torch.from_numpy(a) for a in session.run(None, {"images": images.detach().cpu().numpy()})]

    return run
