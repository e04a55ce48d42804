"""What the target backend means for a job: where the model runs, the regime's inputs, how runs are timed, and the
part of the environment a latency table depends on. The cuda parts are imported only when the backend is cuda.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.loading import cast_weights
from .regime import model_device, regime_inputs  # noqa: F401  (re-exported: the device; one unit of work)
from .timing import interleaved_median_ms

NO_GPU_TO_VERIFY = ("the cuda backend needs a CUDA GPU to measure the speedup; run the pruned model there (the "
                    "profile comes from the latency table measured on the GPU)")


def working_dtype(backend: str, dtype: str) -> torch.dtype:
    """The dtype a job holds the model in, from loading to saving: the regime's on a CPU (a bfloat16 job never holds
    a float32 copy of the model); float32 for the cuda backend, which casts on the GPU (`to_target_device`), so that
    without a GPU searching and pruning run in float32."""
    return getattr(torch, dtype) if backend == "cpu" else torch.float32


def to_target_device(model: nn.Module, backend: str, dtype: str) -> None:
    """The model where and how the regime runs it: in the regime's dtype on a CPU; on the GPU in the regime's dtype
    for the cuda backend, and where it is without a GPU (searching and pruning work anywhere with a table measured
    on the GPU; verifying does not)."""
    if backend == "cpu":
        cast_weights(model, getattr(torch, dtype))
    elif backend == "cuda" and torch.cuda.is_available():
        model.to(device="cuda", dtype=getattr(torch, dtype))


def interleaved_timer(backend: str):
    """The backend's interleaved timer, `(functions, warmup, repeats) -> median ms each`: CUDA events on cuda,
    wall clock on cpu."""
    if backend == "cuda":
        from .cuda import cuda_interleaved_median_ms

        return cuda_interleaved_median_ms
    return interleaved_median_ms


def table_environment(backend: str) -> dict:
    """The environment a latency table of `backend` depends on (part of its cache key, checked on reuse)."""
    if backend == "cuda":
        from .cuda import cuda_environment

        env = cuda_environment()
        return {k: env.get(k) for k in ("gpu", "capability", "cuda_runtime", "torch", "cusparselt", "driver")
                if k in env}
    from .environment import table_environment as cpu_environment

    return cpu_environment()


def verify_unavailable(backend: str, model: nn.Module) -> str | None:
    """Why the speedup cannot be measured here (the cuda backend without the model on a GPU), or None."""
    if backend == "cuda" and (not torch.cuda.is_available() or model_device(model).type != "cuda"):
        return NO_GPU_TO_VERIFY
    return None
