"""Checks of the command line that run before torch is imported or a model is built (plain Python, milliseconds).

A mistake in the command line is reported at once, in one line that names the option to change, with exit status 2
(:class:`CliError`). ``main`` runs :func:`check_common_options` on every command (the options shared by several
commands, found by name on the parsed arguments); each command calls the other helpers for its own arguments before
it imports anything heavy. The library checks the same things again later (in its own words, for Python callers).
"""

import argparse
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from capi_backbones.cli.errors import CliError
from capi_backbones.constants import MAX_IMAGE_SIZE, PATCH_SIZE
from capi_backbones.models.config import ARCHITECTURES
from capi_backbones.runtime.hardware import cuda_is_certainly_missing
from capi_backbones.weights_registry import get_weights, is_registered, weights_names

__all__ = [
    "SMALLEST_ARCHITECTURE",
    "architecture_of",
    "check_architecture",
    "check_common_options",
    "check_device",
    "check_download_timeout",
    "check_image_size",
    "check_input_paths",
    "check_output_dir",
    "check_output_file",
    "check_positive",
    "check_source",
    "check_weights_file",
    "cuda_is_certainly_missing",
    "plural",
    "progress_wanted",
    "unreadable_folders",
]

SMALLEST_ARCHITECTURE = "capi_vits14"  # what --random-init uses without --model
_DEVICE = re.compile(r"([a-z_]+)(:\d+)?")
_DEVICE_TYPES = {  # torch's device types (torch.device refuses others)
    "cpu",
    "cuda",
    "mps",
    "xpu",
    "xla",
    "meta",
    "hpu",
    "mtia",
    "npu",
    "ipu",
    "mkldnn",
    "opengl",
    "opencl",
    "ideep",
    "hip",
    "ve",
    "fpga",
    "maia",
    "vulkan",
    "lazy",
    "privateuseone",
}


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def progress_wanted(args: argparse.Namespace) -> bool:
    """Progress bars on terminals only (a bar written into a log file is noise), unless --no-progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def check_positive(value: int | None, flag: str, *, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise CliError(f"{flag} must be at least {minimum}, got {value}.")


def check_image_size(value: int | None, flag: str = "--image-size") -> None:
    """A multiple of the patch size within the bounds the models accept (the shorter side, or the square side)."""
    if value is None or (PATCH_SIZE <= value <= MAX_IMAGE_SIZE and value % PATCH_SIZE == 0):
        return
    low, high = max(PATCH_SIZE, value // PATCH_SIZE * PATCH_SIZE), (value // PATCH_SIZE + 1) * PATCH_SIZE
    nearest = f"nearest: {low} or {high}" if PATCH_SIZE <= value <= MAX_IMAGE_SIZE else "e.g. 224"
    raise CliError(
        f"{flag} must be a multiple of {PATCH_SIZE} between {PATCH_SIZE} and {MAX_IMAGE_SIZE}, got {value} ({nearest})."
    )


def check_device(value: str | None, flag: str = "--device") -> None:
    """The form of a device (cpu, cuda, cuda:1, mps, ...), and CUDA where there is certainly none."""
    if value is None:
        return
    match = _DEVICE.fullmatch(value)
    if match is None or match.group(1) not in _DEVICE_TYPES:
        raise CliError(f"{flag} {value} is not a device; use {flag} cpu, cuda or cuda:N.")
    if value.split(":")[0] == "cuda" and cuda_is_certainly_missing():
        raise CliError(f"{flag} {value} was asked for, but CUDA is not available here; use {flag} cpu.")


def check_download_timeout(value: float | None, flag: str = "--download-timeout") -> None:
    """A finite number of seconds above zero."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise CliError(f"{flag} must be a positive number of seconds (e.g. {flag} 7200), got {value}.")


def unreadable_folders(found: Iterable[tuple[Path, str]]) -> dict[str, str]:
    """{folder/: why} for the sub-folders an image search could not list (``expand_inputs(..., unreadable=[])``),
    in the words ``extract`` uses; commands name them with their failed images and exit 1."""
    return {f"{folder}/": f"Cannot list the folder ({reason}); its images were left out" for folder, reason in found}


def check_input_paths(paths: Iterable[str], what: str = "IMAGES") -> None:
    """Each image file or folder given exists, files have an image extension, folders hold image files: the image
    finder's own rules and words (``capi_backbones.images.expand_path``; no torch)."""
    from capi_backbones.images import expand_path

    for name in paths:
        try:
            expand_path(name, unreadable=[])  # unreadable sub-folders are the run's to report
        except (ValueError, OSError) as error:
            raise CliError.from_exception(error) from None


def check_output_file(
    name: str, suffixes: Sequence[str], *, flag: str, overwrite: bool | None = None, overwrite_flag: str = "--overwrite"
) -> Path:
    """An output file name: one of ``suffixes``, not a folder, not under a file, and (when ``overwrite`` is not
    None) not an existing file unless ``overwrite``."""
    path = Path(name)
    if path.suffix.lower() not in suffixes:
        expected = " or ".join(suffixes)
        raise CliError(f"{flag} must be a {expected} file, got '{name}'; e.g. {flag} {path.with_suffix(suffixes[0])}.")
    if path.is_dir():
        raise CliError(f"{flag} '{name}' is a folder; give a file name ending in {suffixes[0]}.")
    file_above = next((p for p in path.parents if p.exists() and not p.is_dir()), None)  # missing folders are made
    if file_above is not None:
        raise CliError(f"{flag} '{name}': '{file_above}' is a file, not a folder; choose another place.")
    if overwrite is False and path.exists():
        raise CliError(f"{flag} '{name}' already exists; add {overwrite_flag} to replace it, or choose another name.")
    return path


def check_output_dir(name: str, flag: str = "--out") -> Path:
    """An output folder: created if missing, so only a file of that name is a mistake."""
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} '{name}' is a file, not a folder; give a folder name.")
    return path


def check_weights_file(value: str | None, flag: str = "--weights") -> None:
    """A local checkpoint that exists (a URL or hf-hub: source is left to the load)."""
    if value is None or "://" in value or value.startswith("hf-hub:") or Path(value).exists():
        return
    raise CliError(f"{flag} {value} does not exist; give the path of a .pth or .safetensors checkpoint.")


def check_source(value: str, what: str = "CHECKPOINT") -> None:
    """Anything ``from_pretrained`` takes: a file or folder that exists, released weights, a URL or hf-hub:."""
    if is_registered(value) or "://" in value or value.startswith("hf-hub:") or Path(value).exists():
        return
    if not Path(value).suffix and os.sep not in value:  # meant as a name
        raise CliError(
            f"Unknown model or weights '{value}' for {what}: use released weights ({', '.join(weights_names())}; "
            "see 'capi-backbones list') or a checkpoint file, folder, URL or hf-hub:owner/repo."
        )
    raise CliError(
        f"{what} {value} does not exist: give a .pth or .safetensors file, a folder written by save_pretrained, "
        "released weights (see 'capi-backbones list'), a URL or hf-hub:owner/repo."
    )


def check_architecture(value: str | None, flag: str = "--model") -> None:
    if value is not None and value not in ARCHITECTURES:
        raise CliError(f"{flag} {value} is not an architecture; use one of {', '.join(ARCHITECTURES)}.")


def _check_weights_options(args: argparse.Namespace) -> None:
    """--model, --weights and --random-init together (see cli.model_options.add_weights_options)."""
    model, weights = args.model, args.weights
    if model is not None and model not in ARCHITECTURES and not is_registered(model):
        # --model also takes any from_pretrained source on its own: a file or folder, a URL, hf-hub:owner/repo
        source = "://" in model or model.startswith("hf-hub:") or Path(model).exists()
        if not source or weights is not None or args.random_init:
            names = ", ".join([*ARCHITECTURES, "capi_vitl14_lvd", "..."])
            where = "with --random-init use" if args.random_init else "use one of"
            raise CliError(f"--model {model} is unknown; {where} {names} (see 'capi-backbones list').")
    if args.random_init:
        if weights is not None:
            raise CliError("--random-init uses random weights; leave out --weights PATH (or leave out --random-init).")
        if model is None:  # said by the command when it builds the model (cli.model_options)
            args.model = SMALLEST_ARCHITECTURE
            args.model_by_default = True
        return
    if weights is not None:
        return  # the file is the command's to check (or the load's: it names the path)
    if model in ARCHITECTURES and not is_registered(model):
        released = ", ".join(w for w in ("capi_vitl14_lvd", "capi_vitl14_p205") if is_registered(w))
        raise CliError(
            f"--model {model} is an architecture without weights; add --weights PATH (a checkpoint) or "
            f"--random-init (random weights), or name released weights such as --model {released.split(', ')[0]} "
            "(see 'capi-backbones list')."
        )


def architecture_of(model: str | None) -> str | None:
    """The architecture a --model name stands for (an architecture, or released weights), else None."""
    if model in ARCHITECTURES:
        return model
    return get_weights(model).arch if model is not None and is_registered(model) else None


def check_common_options(args: argparse.Namespace) -> None:
    """The options several commands share, wherever the parsed ``args`` have them; run by ``main`` first. Then
    ``main`` runs the command's own ``check`` (``parser.set_defaults(check=...)``), if it sets one."""
    if all(hasattr(args, name) for name in ("model", "weights", "random_init")):
        _check_weights_options(args)
    if hasattr(args, "device"):
        check_device(args.device)
    if hasattr(args, "download_timeout"):
        check_download_timeout(args.download_timeout)
    if hasattr(args, "images"):  # extract, pca: image files and folders
        check_input_paths(args.images)
    for name in ("batch_size", "shard_size"):
        if hasattr(args, name):
            check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    if hasattr(args, "workers"):
        check_positive(args.workers, "--workers", minimum=0)
    if hasattr(args, "image_size"):
        check_image_size(args.image_size)
    if getattr(args, "precision", None) == "fp16":  # bf16 runs on CPUs too (natively or not: the library says)
        device = getattr(args, "device", None)
        on_cpu = device is not None and device.split(":")[0] != "cuda"
        if on_cpu or (device is None and cuda_is_certainly_missing()):
            raise CliError(
                f"--precision fp16 is only allowed on CUDA (device is {device or 'cpu'}): fp16 is very slow on CPUs; "
                "use --precision bf16, fp32 or auto."
            )
