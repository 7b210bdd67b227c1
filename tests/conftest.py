"""Test-wide guards: no network access beyond loopback (poise's default path never needs one), and
the Hugging Face libraries kept offline."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_LOCAL = ("127.", "localhost", "::1", "0.0.0.0")
_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if self.family == socket.AF_UNIX or str(host).startswith(_LOCAL):
        return _connect(self, address)
    raise OSError(f"network access to {address!r} attempted in a test; poise's default path is offline")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, request):
    if request.node.get_closest_marker("network"):
        return
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
