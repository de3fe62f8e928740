"""The suite's own guards (tests/conftest.py): Hub offline mode and no network connections."""

import socket

import huggingface_hub.constants
import pytest


def test_hub_is_offline_for_every_test():
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_connections_leave_this_machine_never():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(ConnectionRefusedError, match="tests never reach the network: connecting to \\('1.1.1.1'"):
            sock.connect(("1.1.1.1", 443))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())  # this machine is fine
