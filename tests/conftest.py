import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores on CI: more threads than cores only adds contention.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    # Tiny tensors: one thread skips the fork/join overhead that dominates on two busy cores.
    torch.set_num_threads(1)
    yield
