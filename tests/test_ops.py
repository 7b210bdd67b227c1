"""The numerical building blocks."""

import math

import pytest
import torch

from poise.ops import log1mexp, masked_quantile, masked_sum, scale_gradient


def test_log1mexp_matches_naive_and_is_stable():
    a = torch.tensor([-1e-5, -0.1, -0.6931, -0.7, -5.0, -50.0], dtype=torch.float64)
    expect = [math.log(1 - math.exp(x)) for x in a.tolist()]
    assert log1mexp(a).tolist() == pytest.approx(expect, rel=1e-10)
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e4]))).all()


def test_masked_quantile_equals_torch_quantile_on_valid_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 9, generator=g, dtype=torch.float64)
    lengths = [1, 2, 5, 8, 9]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    for q in (0.0, 0.1, 0.25, 0.5, 1.0):
        got = masked_quantile(x, mask, q)
        for i, n in enumerate(lengths):
            assert got[i].item() == pytest.approx(torch.quantile(x[i, :n], q).item(), abs=1e-12)


def test_masked_sum_ignores_garbage():
    x = torch.tensor([[1.0, float("inf"), float("nan")]])
    assert masked_sum(x, torch.tensor([[True, False, False]])).item() == 1.0


def test_scale_gradient_keeps_value_bitwise_and_scales_gradient():
    t = torch.tensor([0.1, -3.7, 12.25], dtype=torch.float32, requires_grad=True)
    c = torch.tensor([0.3, 2.0, 0.0])
    out = scale_gradient(t, c)
    assert torch.equal(out, t.detach())
    out.sum().backward()
    assert torch.equal(t.grad, c)
