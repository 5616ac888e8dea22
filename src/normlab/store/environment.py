"""What a run ran on: recorded with every run so a number can be traced to its software and machine."""

from __future__ import annotations

import os
import platform
import sys

import torch


def environment_info(device: str = "cpu") -> dict[str, str | int]:
    """torch/python versions, platform, device name, torch's intra-op thread count (chosen by
    :func:`normlab.train.threads.fit_threads`) and the cores this process may use."""
    name = device
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": name,
        "threads": torch.get_num_threads(),
        "cores": _usable_cores(),
    }


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
