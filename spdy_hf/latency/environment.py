"""What machine and software a measurement was taken on."""

from __future__ import annotations

import os
import platform
from functools import cache

from ..version import VERSION


@cache
def processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    import torch
    import transformers

    return {
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "spdy_hf": VERSION,
    }


def table_environment() -> dict:
    """The part of the environment a latency table depends on (its cache key)."""
    info = environment_info()
    return {k: info[k] for k in ("processor", "cpu_count", "torch_threads", "torch")}
