"""A job spread over the processes of `accelerate launch` (or `torchrun`): torch.distributed underneath.

    accelerate launch --multi_gpu --num_processes 2 -m spdy_hf prune MODEL ...

(`--multi_gpu` is accelerate's name for "several processes on this machine"; on a machine without GPUs they run on
the CPU.) Every process loads the model and runs the job; two stages share their work out:

- the database: each process solves its share of the units (the costliest first, each to the least loaded
  process) and writes them to the database directory, which every process then reads. The directory must be one
  they all see: one machine, or a shared filesystem.
- the search: the candidate profiles a step of SPDY's search scores are scored by different processes
  (`spdy_hf.search.spdy`); every process then holds every score and takes the same next step.

Timing (the latency table, verify) is done by the main process alone, on every core, while the others wait; the
main process recovers the model and writes the result. Each unit and each candidate is computed exactly as one
process would compute it, so the result is bit-identical to a one-process job run with the same threads per process
(`OMP_NUM_THREADS`, which `accelerate launch` sets).

A process group the caller already made (an `Accelerator`, say) is used as it is; otherwise one is made from the
launcher's environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`): gloo for the CPU, with NCCL beside it
for CUDA tensors when the job runs on GPUs (each process on the GPU of its `LOCAL_RANK`). The objects exchanged are
small (tables, scores, unit names), so gloo carries them.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SPDYError

logger = logging.getLogger(__name__)

# How long a process waits for the others at a meeting point: the main process alone profiles, verifies and recovers
# (an hour or more for a large model) while the others, with several targets, wait for it in the next search.
WAIT = datetime.timedelta(hours=12)


class ProcessError(SPDYError):
    """Another process of the job failed in a step the processes share."""


@dataclass
class Processes:
    """This process's place in the job: `rank` of `size` (0 of 1 when the job runs alone)."""

    rank: int = 0
    size: int = 1
    _loads: list[float] = field(default_factory=list, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def spread(self) -> bool:
        """Whether the job runs in more than one process."""
        return self.size > 1

    # ------------------------------------------------------------------ meeting points
    def barrier(self) -> None:
        if self.spread:
            import torch.distributed as dist

            dist.barrier()

    def share(self, obj: Any, src: int = 0) -> Any:
        """`obj` as process `src` holds it, in every process."""
        if not self.spread:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, in every process."""
        if not self.spread:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run by the main process alone (the others wait), its result in every process; an error in it is
        raised in every process."""
        outcome = _attempt(fn) if self.is_main else None
        shared = self.share(_portable(outcome))
        return _settled([outcome if self.is_main else shared], "the main process")[0]

    # ------------------------------------------------------------------ shared work
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """`[fn(x) for x in items]`, each item computed by one process (item i by process i mod size), every result
        in every process. An error in any process is raised in all of them."""
        if not self.spread:
            return [fn(x) for x in items]
        mine = {i: _attempt(lambda x=x: fn(x)) for i, x in enumerate(items) if i % self.size == self.rank}
        merged: dict[int, tuple] = {}
        for part in self.gather({i: _portable(o) for i, o in mine.items()}):
            merged.update(part)
        merged.update(mine)  # this process's own outcomes, errors as raised
        return _settled([merged[i] for i in range(len(items))], "another process")

    def owners(self, costs: Sequence[float]) -> list[int]:
        """Which process computes each of these items: the costliest first, each to the process with the least work
        so far (counting the items of earlier calls), ties to the lowest rank. Every process computes the same
        answer from the same costs."""
        if len(self._loads) != self.size:
            self._loads = [0.0] * self.size
        heap = [(load, rank) for rank, load in enumerate(self._loads)]
        heapq.heapify(heap)
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
            load, rank = heapq.heappop(heap)
            owner[i] = rank
            heapq.heappush(heap, (load + float(costs[i]), rank))
        for load, rank in heap:
            self._loads[rank] = load
        return owner

    # ------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Timing on every core: a process of a spread job runs on its share of the cores (`OMP_NUM_THREADS`), but
        the main process times alone, so it times with the threads a job alone on the machine would have."""
        if not self.spread:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(machine_threads())
        try:
            yield
        finally:
            torch.set_num_threads(before)


def machine_threads() -> int:
    """The threads torch takes by default when nothing limits it: one per physical core."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def _attempt(fn: Callable[[], Any]) -> tuple:
    try:
        return ("ok", fn())
    except Exception as e:  # every process must hear of it, or the others wait for ever
        return ("error", e)


def _portable(outcome: tuple | None) -> tuple | None:
    """An outcome as another process receives it: an error as its text (not every exception pickles)."""
    if outcome is not None and outcome[0] == "error":
        return ("error", f"{type(outcome[1]).__name__}: {outcome[1]}")
    return outcome


def _settled(outcomes: list[tuple], where: str) -> list[Any]:
    """The values of `_attempt` outcomes; the first error is raised: the exception itself where this process raised
    it, a `ProcessError` with its text where another did."""
    for status, value in outcomes:
        if status == "error":
            if isinstance(value, BaseException):
                raise value
            raise ProcessError(f"A step failed in {where}: {value}")
    return [value for _, value in outcomes]


_CURRENT: Processes | None = None


def launched_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current_processes(cuda: bool = False) -> Processes:
    """This process's `Processes`: from a process group already made, else one made now from the launcher's
    environment, else a job alone. `cuda`: the job runs on GPUs (NCCL beside gloo, each process on its own GPU)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _CURRENT = Processes(rank=dist.get_rank(), size=dist.get_world_size())
    elif launched_size() > 1:
        if not dist.is_available():
            raise SPDYError("This torch build has no torch.distributed; run the job in one process.")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise SPDYError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start the "
                            "processes with `accelerate launch` or `torchrun`.")
        dist.init_process_group(backend=process_backend(cuda), timeout=WAIT)
        if cuda:
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _CURRENT = Processes(rank=dist.get_rank(), size=dist.get_world_size())
        logger.debug("Process %d of %d (%s).", _CURRENT.rank, _CURRENT.size, dist.get_backend())
    else:
        _CURRENT = Processes()
    return _CURRENT


def run_alone() -> Processes:
    """This process runs its job alone, whatever the launcher started (a command only the main process runs)."""
    global _CURRENT
    _CURRENT = Processes()
    return _CURRENT


def process_backend(cuda: bool) -> str:
    """torch.distributed's backend: gloo for CPU objects, and NCCL for CUDA tensors where the job uses GPUs."""
    if cuda:
        import torch

        if torch.cuda.is_available():
            return "cpu:gloo,cuda:nccl"
    return "gloo"
