"""Attention in float32 inside recovery's half-precision training passes on a CPU.

PyTorch's CPU kernel for `scaled_dot_product_attention` computes its backward pass in bfloat16 several times slower
than in float32 (measured with torch 2.13 on an AVX-512/AMX Xeon: 8 windows x 12 heads x 128 tokens x 32 dims,
forward and backward 14.7 ms in bfloat16 against 3.1 ms in float32; the forward alone about 0.85 ms either way).
Under `torch.autocast` the attention of a model whose projections run in bfloat16 gets bfloat16 queries, keys
and values, and its backward pass took a quarter of MiniLM's recovery. `Float32Attention` runs that one
operation in float32 (its inputs cast up, its output cast back to their dtype), everything else as autocast
decides: the products stay in bfloat16, and the attention is computed more exactly, not less.

It intercepts the function `transformers` models call (`torch.nn.functional.scaled_dot_product_attention`) through a
`TorchFunctionMode`, so it holds for any model that attends through it, only inside the `with` block and only on the
thread that entered it: the autograd engine's recomputation of a checkpointed block is outside it, and enters it
again (`spdy_hf.recovery.fit.checkpointed`). Models with an attention of their own (eager attention: a matmul and a
softmax) are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_HALF = (torch.bfloat16, torch.float16)


class Float32Attention(TorchFunctionMode):
    """While active, `F.scaled_dot_product_attention` on half-precision CPU tensors, in a pass that records gradients,
    runs in float32 with autocast off, and returns its output in the dtype of the queries."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not args:
            return func(*args, **kwargs)
        query = args[0]
        if query.device.type != "cpu" or query.dtype not in _HALF or not torch.is_grad_enabled():
            return func(*args, **kwargs)  # a pass with no backward: bfloat16's forward is as fast
        args = tuple(_up(a) for a in args)
        kwargs = {k: _up(v) for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs).to(query.dtype)


def _up(value):
    """A half-precision tensor (queries, keys, values, an additive mask) in float32; anything else as it is (a
    boolean mask, a scale, flags)."""
    if isinstance(value, torch.Tensor) and value.dtype in _HALF:
        return value.float()
    return value
