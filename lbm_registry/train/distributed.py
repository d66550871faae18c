"""Data-parallel plumbing: which process am I, and the few collectives the loop needs.

Why this shape: accelerate (the launcher the diffusers ecosystem uses) sets up the process group
(gloo on CPU, NCCL on GPU) from the environment that ``accelerate launch`` / ``torchrun`` /
``lbm-reg train --num-processes N`` provide. The loop itself needs three collectives only: a
sum of the LoRA gradients (plus the step's loss sums and sample count) once per optimizer step, a
broadcast of the run folder / resumed checkpoint from rank 0, and a barrier around the work only
rank 0 does (validation, checkpoints). Summing the gradients ourselves, rather than wrapping the
UNet in ``DistributedDataParallel``, lets a process with no sample in a micro-step (the end of an
epoch, a skipped bad sample) simply not run it: DDP would hang waiting for its backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DistContext:
    """This process's place in the job. ``world_size == 1`` means no collectives at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum over processes (same result on every process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (pickled; small things only)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self._collective_device().type == "cuda":
                dist.barrier(device_ids=[self._collective_device().index or 0])
            else:
                dist.barrier()

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return self.device if self.device is not None else torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by accelerate launch / torchrun / ``--num-processes`` (1 otherwise)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group the launcher described (accelerate's ``PartialState``: gloo on CPU,
    NCCL on GPU); a single process gets a context without collectives."""
    from lbm_registry.lbm.model import pick_device

    if launched_world_size() <= 1:
        return DistContext(device=pick_device(device))
    import warnings

    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    with warnings.catch_warnings():  # its "OMP_NUM_THREADS unset, we set it at 1": we split the cores below
        warnings.simplefilter("ignore", UserWarning)
        state = PartialState(cpu=cpu)
    dev = torch.device("cpu") if cpu else state.device
    if not cpu:
        torch.cuda.set_device(dev)
    # split the cores between the local workers (torch would give each of them all of them)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return DistContext(rank=state.process_index, world_size=state.num_processes,
                       local_rank=state.local_process_index, device=dev)
