"""Data-parallel training: two gloo processes on the CPU follow one process with the whole batch."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdzoo.config import TrainConfig
from kdzoo.data import Placement, build_dataset, make_loader
from kdzoo.distiller import Distiller
from kdzoo.methods import create_method
from kdzoo.tasks.classification import fit
from kdzoo.engine.checkpoint import load_checkpoint


def _data():
    return build_dataset("synthetic", num_classes=4, image_size=8, train_size=48, test_size=16)


def _model(width: int, seed: int) -> nn.Module:
    """No BatchNorm: a process's batch statistics would depend on its share of the batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))


def _distiller():
    return Distiller(_model(4, 1), _model(8, 0), [create_method("kd")])


def _cfg(cache: bool = False):
    return TrainConfig(epochs=3, batch_size=16, lr=0.1, schedule="cosine", save_every=1, progress=False, device="cpu",
                       seed=3, cache_teacher_outputs=cache)


def _worker(rank: int, world_size: int, port: int, run_dir: str, cache: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        distiller = _distiller()
        calls = []
        distiller.teacher.register_forward_hook(lambda *args: calls.append(1))
        fit(distiller, _data(), _cfg(cache), run_dir, verbose=False)
        plan = 1 if rank == 0 else 0  # rank 0 evaluates the teacher once for the run's plan.md
        assert len(calls) == (3 if cache else 9) + plan, len(calls)  # 3 steps per epoch; cached after the first
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_loader_splits_each_global_batch():
    data = _data()
    whole = [index for _, _, index in make_loader(data.train, 16, shuffle=True, seed=3, epoch=1)]
    shares = [[index for _, _, index in make_loader(data.train, 8, shuffle=True, seed=3, epoch=1, placement=Placement(rank=r, world_size=2))]
              for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == 3
    for b, batch in enumerate(whole):
        assert torch.equal(shares[0][b], batch[0::2]) and torch.equal(shares[1][b], batch[1::2])
    odd = build_dataset("synthetic", num_classes=4, image_size=8, train_size=37, test_size=4).train
    sizes = [len(i) for _, _, i in make_loader(odd, 8, shuffle=True, placement=Placement(rank=1, world_size=2))]
    assert sizes == [8, 8, 2] and len(make_loader(odd, 8, shuffle=True, placement=Placement(rank=1, world_size=2))) == 3  # 5 left: 4 kept
    sharded = make_loader(odd, 4, shuffle=False, placement=Placement(world_size=3))  # 12, 12, 12, then 1: too few for 3
    assert [len(i) for _, _, i in sharded] == [4, 4, 4] and len(sharded) == 3


@pytest.mark.parametrize("cache", [False, True], ids=["live-teacher", "teacher-cache"])
def test_two_gloo_processes_match_one_process(tmp_path, cache):
    """2 processes x batch 8 = 1 process x batch 16; with the cache, each process fills its share in epoch 1 and
    the shares are merged, so epochs 2 and 3 replay every sample's teacher output."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), cache), nprocs=2, join=True)
    single = _distiller()
    result = fit(single, _data(), _cfg(), tmp_path / "single", verbose=False)
    state = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")  # written by rank 0 alone
    assert state["epoch"] == 3
    for key, value in single.student.state_dict().items():
        assert torch.allclose(state["student"][key], value, atol=1e-5), key
    for got, expected in zip(state["history"], result.history):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)  # summed over both processes
        assert got["test_top1"] == expected["test_top1"]
    assert not list((tmp_path / "ddp").glob(".*.tmp"))
