"""Turning a user's ``--device`` string into a torch device, or a clear error naming it."""

from __future__ import annotations

import torch

from lipdeq.errors import LipdeqError

__all__ = ["DeviceError", "resolve_device"]

SUPPORTED = ("cpu", "cuda")


class DeviceError(LipdeqError, ValueError):
    """The requested device is unknown, unsupported or not available on this machine."""


def resolve_device(
    device: str | torch.device | None, *, local_rank: int = 0, distributed: bool = False
) -> torch.device:
    """The device to run on.

    ``None`` means ``cuda:<local_rank>`` when CUDA is available, else ``cpu``. ``"cuda"`` means
    ``cuda:<local_rank>`` (one GPU per torchrun process). An explicit ``"cuda:N"`` is honoured in a
    single process and refused under torchrun, where each process owns the GPU of its local rank.
    Anything that is not a CPU or an available CUDA device is an error naming the device: falling
    back to the CPU silently would train for hours on the wrong hardware.
    """
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {text!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in SUPPORTED:
        raise DeviceError(f"device {text!r} is not supported: lipdeq runs on 'cpu' or 'cuda' ('cuda:N')")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {text!r} requested but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device cpu")
    if dev.index is None:
        index = local_rank
    elif distributed:
        raise DeviceError(f"device {text!r}: under torchrun each process uses cuda:<LOCAL_RANK>; pass 'cuda' "
                          "(select GPUs with CUDA_VISIBLE_DEVICES)")
    else:
        index = dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {text!r}: CUDA device {index} does not exist ({count} visible)")
    return torch.device("cuda", index)
