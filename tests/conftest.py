import ipaddress
import os
import socket

# Before anything imports huggingface_hub: it reads HF_HUB_OFFLINE once, at import (setting it later in a test does
# nothing). Subprocesses inherit both.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402
import torch  # noqa: E402

_REAL_CONNECT = socket.socket.connect


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost


def _guarded_connect(sock: socket.socket, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(str(address[0])):
        raise ConnectionRefusedError(f"tests never reach the network: connecting to {address} was refused")
    return _REAL_CONNECT(sock, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test reaches the network: connections to anything but this machine fail at once (local servers, such
    as the browser demo's, are fine)."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its tiny workloads gain nothing from more, and on a busy shared CPU
    OpenMP threads waiting on each other make every op tens of times slower (measured: 4 s vs 0.2 s for one
    backward). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
