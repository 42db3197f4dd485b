"""Device resolution shared by every command: ``None``/``auto``, ``cpu``, ``cuda``, ``cuda:N`` to a
``torch.device``, refusing in one line a device that does not exist here."""

import torch

__all__ = ["DeviceUnavailableError", "resolve_device"]


class DeviceUnavailableError(ValueError):
    """A CUDA device was asked for on a machine without CUDA (or an unknown device name)."""


def resolve_device(
    requested: "str | torch.device | None" = "auto", *, local_rank: int | None = None, option: str = "device="
) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else the CPU. A named device is checked: an unknown name or CUDA
    on a machine without it raises :class:`DeviceUnavailableError`, one line naming ``option`` (how the caller's
    user spells the setting: ``"device="``, ``"--device "``, ``"train.device="``).

    ``local_rank``: a bare ``cuda`` (or ``auto`` on a GPU machine) becomes ``cuda:<local_rank % GPUs>``, one GPU per
    torchrun rank; None leaves it as given.
    """
    if requested is None or requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailableError(
            f"{option}{requested} is not a device; use {option}cpu, {option}cuda or {option}cuda:N."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"{option}{requested} was asked for, but CUDA is not available here; use {option}cpu."
            )
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
