"""Sizes refused before they are allocated: an estimate of what a module or a batch would take,
checked against the memory the device has free, so that a typo (a 100,000-cell grid, a 1e6-wide
connector) gets an error naming the setting instead of the allocator's."""

from __future__ import annotations

import psutil
import torch

GB = 1e9


def available_bytes(device: str | torch.device = "cpu") -> int:
    """The memory free on ``device`` now: CUDA's free memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check_fits(what: str, nbytes: float, accepted: str, device: str | torch.device = "cpu") -> None:
    """Refuse ``what`` when its estimated ``nbytes`` exceed the memory free on ``device``.

    Raises:
        ValueError: naming ``what``, the estimate and the free memory in GB, and ``accepted``.
    """
    free = available_bytes(device)
    if nbytes > free:
        raise ValueError(
            f"{what} needs about {nbytes / GB:,.1f} GB, more than the {free / GB:,.1f} GB free on "
            f"{torch.device(device)}; accepted: {accepted}"
        )
