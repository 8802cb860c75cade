"""Data-parallel training over several processes: ``torchrun --nproc_per_node=N -m kdzoo train CONFIG``.

Each process trains the same distiller on its share of every global batch (`train.batch_size` is the global
batch: each process takes the strided slice ``[rank::N]`` of the batch one process would draw, see
`make_loader`; on the device-resident loader that is a gather on the GPU, on the PIL fallback path every
process decodes the whole global batch).  Gradients are averaged by DistributedDataParallel, so N processes
follow the same trajectory as one process with the whole batch (within floating-point tolerance).  Rank 0 alone writes checkpoints, metrics, TensorBoard
events and exports; the epoch's training metrics are summed over processes before they are read.

Each process keeps its own BatchNorm statistics and method buffers (memory banks) during an epoch
(`broadcast_buffers=False`: a CRD bank would otherwise be broadcast at every step); the student's buffers
are broadcast from rank 0 before each evaluation and checkpoint, so every process evaluates and saves
the same model.  NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    """This process's place in the group; world_size 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object initialised the process group, so `close` destroys it

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str = "auto") -> "Distributed":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or use
        one already initialised by the caller."""
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(dist.get_rank(), dist.get_world_size(), local)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or not dist.is_available():
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=True)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` means this process's ``cuda:LOCAL_RANK``."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def local_batch_size(self, batch_size: int) -> int:
        from ..errors import ConfigError

        if batch_size % self.world_size:
            raise ConfigError(f"train.batch_size: {batch_size} (global) does not split over {self.world_size} processes")
        return batch_size // self.world_size

    def shard(self) -> dict:
        """make_loader's sharding arguments (none on one process)."""
        return {"rank": self.rank, "world_size": self.world_size} if self.active else {}

    def wrap(self, distiller: nn.Module, device: torch.device) -> nn.Module:
        """The module each training step calls: DDP around the distiller, so the student's and the methods'
        gradients are averaged (the frozen teacher takes no part)."""
        if not self.active:
            return distiller
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # parameters a method trains only in its init stage may get no gradient later: DDP must look for them
        unused = any(m.init_stage(distiller.student) is not None for m in distiller.methods.values())
        # buffers stay per process during the epoch (newer torch names the switch forward_sync_buffers)
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=unused, gradient_as_bucket_view=True, **no_sync)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_reduce_min(self, tensor: torch.Tensor) -> None:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Every process takes rank 0's buffers (BatchNorm statistics) of `module`."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


__all__ = ["Distributed"]
