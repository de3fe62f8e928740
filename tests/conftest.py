import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its tiny workloads gain nothing from more, and on a busy shared CPU
    OpenMP threads waiting on each other make every op tens of times slower (measured: 4 s vs 0.2 s for one
    backward). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
