"""Test-wide guards: no network access beyond loopback (poise's default path never needs one), and
the Hugging Face libraries kept offline. Under CI (the environment variable CI set, as CI services
do) Hypothesis draws the same examples on every run: profile "ci"."""

import os
import socket

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# mixed_precision: auto picks bf16 autocast on a CPU with native bf16 (AVX512_BF16, AMX) and fp32 on
# others: the suite runs fp32 on every CPU, so that it computes the same everywhere (also in the
# processes it launches); tests/training/test_precision.py tests the choice and the bf16 path.
os.environ["POISE_CPU_BF16"] = "0"

# "ci": derandomized (the examples follow from each test's name, not from a random seed or the
# example database), no deadline (a shared CI machine is slow at random moments), and a failure
# prints the blob that reproduces it. Loaded when CI is set (CI=true on CI services); otherwise the
# default profile, also under a Hypothesis that would pick its own "ci" profile on seeing CI=false.
# The settings(...) objects of the test modules inherit from the profile loaded here.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI", "").lower() not in ("", "0", "false", "no") else "default")

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
