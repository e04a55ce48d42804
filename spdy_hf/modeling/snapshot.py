"""A model's floating weights kept on disk, not in memory: `DenseSnapshot`.

Recovery's dense teacher, and the float32 weights of a model lowered for the search (`spdy_hf.search.lowered.lowered`), are
written once to safetensors files in the temporary directory and read back one tensor at a time (safetensors'
`pread` backend: each read fills fresh memory, and no file mapping counts toward the process's memory). The
tensors go into shards of at most `SHARD_BYTES`, so a model on a GPU is never copied to host memory whole. A
shard's file is unlinked once it is open (where the system allows that, as POSIX systems do): it is gone when the
snapshot is closed or the process ends, even if it is killed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

SHARD_BYTES = 512 * 2**20  # the most host memory a snapshot of a GPU model copies at once


class DenseSnapshot:
    """The module's floating parameters and buffers as they are now, by name (`named_parameters`, then
    `named_buffers`), in temporary safetensors files; or, given (name, tensor) pairs instead of a module, those
    tensors (taken one at a time, so a generator of them is never held whole)."""

    def __init__(self, model: nn.Module | Iterable[tuple[str, torch.Tensor]]):
        self.index: dict[str, int] = {}  # tensor name -> shard holding it
        self._shards: list = []  # open safetensors handles
        self._stack = contextlib.ExitStack()  # closes the handles, then removes any file still there
        shard: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        size = 0
        try:
            for name, t in floating_tensors(model) if isinstance(model, nn.Module) else model:
                data = t.detach().to("cpu").contiguous()
                if data.numel() and data.untyped_storage().data_ptr() in storages:
                    data = data.clone()  # views of one memory under two names: safetensors takes one
                storages.add(data.untyped_storage().data_ptr())
                shard[name] = data
                size += data.numel() * data.element_size()
                if size >= SHARD_BYTES:
                    self._write(shard)
                    shard, storages, size = {}, set(), 0
            if shard:
                self._write(shard)
        except BaseException:
            self.close()
            raise

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(prefix="spdy-snapshot-", suffix=".safetensors")
        os.close(fd)
        self._stack.callback(_remove, path)  # after the handle is closed (last in, first out)
        save_file(tensors, path)
        handle = self._stack.enter_context(safe_open(path, framework="pt", backend="pread"))
        _remove(path)  # the open handle keeps the data (where an open file cannot be removed, Windows, close does it)
        self.index.update(dict.fromkeys(tensors, len(self._shards)))
        self._shards.append(handle)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as it was, on the CPU, in fresh memory of its own."""
        return self._shards[self.index[name]].get_tensor(name)

    @torch.no_grad()
    def restore(self, module: nn.Module, prefix: str = "") -> None:
        """Writes the snapshot's values into `module` (the model, or one of its submodules named `prefix`)."""
        for name, t in floating_tensors(module):
            t.copy_(self.tensor(prefix + name).to(t.device))

    def model(self, like: nn.Module, dtype: torch.dtype | None = None,
              shared: Callable[[str], bool] | None = None, streamed: Iterable[str] = (),
              source: DenseSnapshot | None = None) -> nn.Module:
        """A copy of `like` holding the snapshot's values, in eval mode, without gradients; with `dtype`, its
        floating parameters in that dtype (buffers, such as a rotary embedding's float32 frequencies, keep theirs),
        allocated so from the start (no copy of `like`'s values is ever made).

        `shared(name)`: the tensors of `like` the copy holds themselves, neither copied nor written (those the caller
        knows to hold the snapshot's values still and to stay so while the copy is used: recovery's teacher shares
        the blocks recovery does not train, the embeddings and the head), where they are in the copy's dtype already
        (a model mixing dtypes would not run: a float32 norm does not take bfloat16 inputs on a CPU).

        `streamed`: names of submodules of `like` whose floating parameters the copy does not hold. Each such
        submodule reads its parameters from the snapshot as its forward pass starts and releases them as it ends,
        so the copy holds the weights of one of them at a time, at the price of reading them again on every pass
        (recovery's teacher streams the blocks recovery trains: `recovery.teacher: stream`). They read from `source`
        where given, a snapshot holding their parameters under the same names (in the copy's dtype already, say: half
        the bytes of float32 to read on every pass, and nothing to convert), else from this one. The snapshot read
        from must stay open while the copy is used."""
        prefixes = tuple(f"{m}." for m in streamed)
        memo: dict[int, torch.Tensor] = {}
        kept: set[str] = set()
        for name, t in floating_tensors(like):  # fresh, uninitialized storage for every other floating tensor
            wanted = dtype if dtype is not None and isinstance(t, nn.Parameter) else t.dtype
            if shared is not None and wanted == t.dtype and shared(name):
                memo[id(t)] = t
                kept.add(name)
                continue
            lazy = isinstance(t, nn.Parameter) and name.startswith(prefixes)
            empty = torch.empty(0 if lazy else t.shape, dtype=wanted, device=t.device)
            memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
        teacher = copy.deepcopy(like, memo)
        with torch.no_grad():
            for name, t in floating_tensors(teacher):
                if name not in kept and not (isinstance(t, nn.Parameter) and name.startswith(prefixes)):
                    t.copy_(self.tensor(name).to(t.device))
        teacher.eval()
        for name, t in floating_tensors(teacher):
            if name not in kept and isinstance(t, nn.Parameter):
                t.requires_grad_(False)
        modules = dict(teacher.named_modules())
        for name in streamed:
            _StreamedWeights(source or self, name, modules[name], kept)
        return teacher

    def close(self) -> None:
        self._shards = []
        self._stack.close()


class _StreamedWeights:
    """The hooks that give one submodule of a snapshot's copy its parameters for the length of its forward pass:
    read from the snapshot (in the copy's dtype, on its device) as the pass starts, released (empty tensors of the
    same dtype) as it ends, also when it raises."""

    def __init__(self, snapshot: DenseSnapshot, name: str, module: nn.Module, shared: set[str]):
        self.snapshot, self.prefix = snapshot, f"{name}."
        self.params = {n: p for n, p in module.named_parameters()
                       if p.is_floating_point() and self.prefix + n not in shared}
        module.register_forward_pre_hook(self.fill)
        module.register_forward_hook(self.release, always_call=True)

    @torch.no_grad()
    def fill(self, module: nn.Module, args) -> None:
        for name, p in self.params.items():
            p.data = self.snapshot.tensor(self.prefix + name).to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def release(self, module: nn.Module, args, output) -> None:
        for p in self.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def floating_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's floating parameters and buffers, by name (a tied parameter once)."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            yield name, t


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
