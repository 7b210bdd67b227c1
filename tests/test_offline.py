"""The tests themselves are held offline: a connection beyond loopback fails."""

import socket

import pytest


def test_sockets_beyond_loopback_are_blocked():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError, match="network access"):
        s.connect(("192.0.2.1", 80))
    s.close()
