"""Several processes: ``torchrun --nproc_per_node=N -m kdzoo train CONFIG`` (or ``kdzoo lm distill``).

Every process builds the same run and trains on its share of every global batch (the batch size in a config is
the global batch; a task splits it over the processes, e.g. the strided slice ``[rank::N]`` `make_loader`
takes).  Gradients are averaged by DistributedDataParallel (`Distributed.wrap`) or the module is sharded with
FSDP2 (`Distributed.shard`, whose whole state `full_state` gathers for a checkpoint), so N processes follow
the trajectory of one process with the whole batch (within floating-point tolerance).  Rank 0 alone writes
checkpoints, metrics, TensorBoard events and exports; the epoch's training meters are summed over processes
before they are read.  NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from .runtime import lazy_import

# FSDP2 and its state-dict helpers load DTensor's operator tables (0.6 s): only a sharded run reads them
fsdp = lazy_import("torch.distributed.fsdp")
dcp_state = lazy_import("torch.distributed.checkpoint.state_dict")


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
        if batch_size % self.world_size:
            raise ConfigError(f"train.batch_size: {batch_size} (global) does not split over {self.world_size} processes")
        return batch_size // self.world_size

    def shard(self) -> dict:
        """make_loader's sharding arguments (none on one process)."""
        return {"rank": self.rank, "world_size": self.world_size} if self.active else {}

    def wrap(self, module: nn.Module, device: torch.device, find_unused: bool = False,
             broadcast_buffers: bool = False) -> nn.Module:
        """The module each training step calls: DistributedDataParallel around `module` on several processes
        (itself on one), so gradients are averaged.  `find_unused`: parameters that may get no gradient in a
        step (trained only in a method's init stage); `broadcast_buffers` false keeps buffers (BatchNorm
        statistics, memory banks) per process during an epoch."""
        if not self.active:
            return module
        # newer torch names the buffer switch forward_sync_buffers
        sync = ({"forward_sync_buffers": broadcast_buffers}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": broadcast_buffers})
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused, gradient_as_bucket_view=True, **sync)

    def shard_modules(self, units: Sequence[nn.Module]) -> None:
        """FSDP2: `fully_shard` each module of `units` in order (inner units first, the root last)."""
        if self.active:
            for unit in units:
                fsdp.fully_shard(unit)

    @staticmethod
    def gradient_sync(module: nn.Module, last: bool):
        """The context of one micro-batch's backward: gradients are averaged over processes on the last
        micro-batch of a step only (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(last)
        elif isinstance(module, DistributedDataParallel) and not last:
            return module.no_sync()
        return contextlib.nullcontext()

    @staticmethod
    def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """An FSDP2-sharded module's and its optimizer's whole state on the CPU (a collective: every process
        calls it)."""
        options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dcp_state.get_state_dict(module, optimizer, options=options)

    @staticmethod
    def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
        dcp_state.set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                                 options=dcp_state.StateDictOptions(full_state_dict=True))

    @staticmethod
    def full_model_state(module: nn.Module) -> dict:
        """A (sub)module's whole state on the CPU from its shards (a collective)."""
        options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dcp_state.get_model_state_dict(module, options=options)

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
