"""The log-prob engine against a naive full-vocabulary log-softmax on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from poise.data import SequenceBatch, TokenizedPair, collate_shared
from poise.model.logprobs import (
    TokenLogps,
    batch_logps,
    fast_path_reason,
    pair_logps,
    sequence_logps,
    token_logps,
    verify_fast_path,
)
from poise.model.modes import enable_activation_checkpointing
from poise.types import STAT_NAMES

VOCAB = 131  # distinct from every hidden size below, so (.., V) tensors are recognisable
ATOL = 1e-5

# (prompt length, completion length) per row; rows 0..1 chosen, rows 2..3 rejected.
ROWS = [(3, 5), (1, 2), (4, 6), (2, 1)]


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()


def _batch(rows=ROWS, extra_pad: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    length = max(p + c for p, c in rows) + extra_pad
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attn = torch.zeros(len(rows), length, dtype=torch.long)
    comp = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : p + c] = torch.randint(1, VOCAB, (p + c,), generator=g)
        attn[i, : p + c] = 1
        comp[i, p : p + c] = True
    return ids, attn, comp


def _naive(model, ids, attn, comp):
    """(logps, stats) from the full (N, L, V) float32 log-softmax."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    p = logp_all.exp()
    zeros = torch.zeros(ids.shape)
    sel = comp[:, 1:]

    def place(x):
        out = zeros.clone()
        out[:, 1:] = torch.where(sel, x, 0.0)
        return out

    logps = place(logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1))
    stats = {
        "sum_p2": place((p**2).sum(-1)),
        "entropy": place(-(p * logp_all).sum(-1)),
        "max_p": place(p.max(-1).values),
    }
    return logps, stats


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_logps_and_stats_match_naive(model, batch, chunk_size):
    ids, attn, comp = batch
    with torch.no_grad():
        ref, ref_stats = _naive(model, ids, attn, comp)
    out = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=chunk_size)
    assert out.path == "fast"
    assert out.logps.dtype == torch.float32 and out.logps.shape == ids.shape
    assert torch.equal(out.mask, comp)
    torch.testing.assert_close(out.logps, ref, atol=ATOL, rtol=ATOL)
    assert out.logps.requires_grad
    for name in STAT_NAMES:
        assert not out.stats[name].requires_grad
        assert out.stats[name].dtype == torch.float32
        torch.testing.assert_close(out.stats[name], ref_stats[name], atol=ATOL, rtol=ATOL)
    # off the completion tokens everything is exactly zero
    assert (out.logps.detach()[~comp] == 0).all()
    for name in STAT_NAMES:
        assert (out.stats[name][~comp] == 0).all()
    # sanity on the stats themselves
    on = comp
    assert (out.stats["max_p"][on] ** 2 <= out.stats["sum_p2"][on] + 1e-7).all()
    assert (out.stats["sum_p2"][on] <= out.stats["max_p"][on] + 1e-7).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_gradient_matches_naive(model, batch, chunk_size):
    ids, attn, comp = batch
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(5))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    naive = grads(lambda: _naive(model, ids, attn, comp)[0])
    fast = grads(lambda: token_logps(model, ids, attn, comp, stats=("sum_p2",), chunk_size=chunk_size).logps)
    model.zero_grad(set_to_none=True)
    assert naive.keys() == fast.keys()
    for name in naive:
        torch.testing.assert_close(fast[name], naive[name], atol=1e-5, rtol=1e-4, msg=name)


def test_backbone_activation_checkpointing_composes(batch):
    ids, attn, comp = batch
    model = _llama(seed=2).train()
    (_naive(model, ids, attn, comp)[0]).sum().backward()
    naive = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    enable_activation_checkpointing(model)
    token_logps(model, ids, attn, comp, chunk_size=2).logps.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, naive[name], atol=1e-5, rtol=1e-4, msg=name)


def test_extra_right_padding_changes_nothing(model, batch):
    ids, attn, comp = batch
    more = _batch(extra_pad=5)
    with torch.no_grad():
        a = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=4)
        b = token_logps(model, *more, stats=STAT_NAMES, chunk_size=4)
    length = ids.shape[1]
    assert (b.logps[:, length:] == 0).all()
    torch.testing.assert_close(b.logps[:, :length], a.logps, atol=1e-6, rtol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(b.stats[name][:, :length], a.stats[name], atol=1e-6, rtol=1e-6)


def test_head_sees_only_completion_rows_in_chunks(model, batch):
    ids, attn, comp = batch
    n_tokens = int(comp.sum())
    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            token_logps(model, ids, attn, comp, chunk_size=3)
        assert all(x.shape[0] <= 3 for x in seen)
        assert sum(x.shape[0] for x in seen) == n_tokens  # no prompt or padding rows
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state.detach()
        torch.testing.assert_close(torch.cat(seen), hidden[:, :-1][comp[:, 1:]], atol=1e-6, rtol=1e-6)
        # with grad: forward + checkpoint recomputation in backward, still chunk-sized
        seen.clear()
        token_logps(model, ids, attn, comp, chunk_size=3).logps.sum().backward()
        assert all(x.shape[0] <= 3 for x in seen)
        last = n_tokens - 3 * ((n_tokens - 1) // 3)  # the last chunk keeps its logits: not recomputed
        assert sum(x.shape[0] for x in seen) == 2 * n_tokens - last  # forward + recompute, nothing more
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


def test_statistics_are_computed_once_per_token_not_again_in_the_recomputation(model, batch, monkeypatch):
    """The checkpointed chunks recompute their logits in the backward; the detached statistics are not
    recomputed with them (they would be thrown away): the statistics come after the log-probs in a
    chunk, and the non-reentrant checkpoint stops its recomputation at the last tensor the backward
    needs. Their values are those of a no-grad pass."""
    import poise.model.logprobs as engine

    ids, attn, comp = batch
    rows_seen: list[int] = []
    real = engine._softmax_stats
    monkeypatch.setattr(engine, "_softmax_stats",
                        lambda logp, names: rows_seen.append(logp.shape[0]) or real(logp, names))
    out = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=3)
    out.logps.sum().backward()
    model.zero_grad(set_to_none=True)
    n_tokens = int(comp.sum())
    assert n_tokens > 3 and sum(rows_seen) == n_tokens  # several chunks, each token's stats once
    rows_seen.clear()
    with torch.no_grad():
        ref = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=n_tokens)
    for name in STAT_NAMES:
        torch.testing.assert_close(out.stats[name], ref.stats[name], atol=1e-6, rtol=1e-5)


def test_no_vocab_sized_tensor_saved_for_backward(model, batch):
    ids, attn, comp = batch
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=2)
    assert saved, "the backbone should have saved activations"
    # logits of the checkpointed chunks are not kept; only the last chunk's (at most chunk_size rows,
    # used first by the backward) are saved
    head_weight_t = tuple(model.lm_head.weight.t().shape)  # the head's own weight, saved by the matmul
    wide = [s for s in saved if s and s[-1] == VOCAB and s != head_weight_t]
    assert wide and all(s[0] <= 2 for s in wide)
    out.logps.sum().backward()
    model.zero_grad(set_to_none=True)


def test_fallback_path_matches(model, batch, monkeypatch):
    ids, attn, comp = batch
    with torch.no_grad():
        ref, ref_stats = _naive(model, ids, attn, comp)
    out = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=3, path="fallback")
    assert out.path == "fallback"
    torch.testing.assert_close(out.logps, ref, atol=ATOL, rtol=ATOL)
    for name in STAT_NAMES:
        torch.testing.assert_close(out.stats[name], ref_stats[name], atol=ATOL, rtol=ATOL)
    # gradient through the fallback too
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(7))
    (out.logps * weights).sum().backward()
    fb = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    (_naive(model, ids, attn, comp)[0] * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fb[n], p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    # a model without a decoder takes the fallback automatically
    monkeypatch.setattr(model, "get_decoder", lambda: model)
    assert fast_path_reason(model) is not None
    with torch.no_grad():
        auto = token_logps(model, ids, attn, comp, chunk_size=2)
    assert auto.path == "fallback"
    torch.testing.assert_close(auto.logps, ref, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="not supported"):
        token_logps(model, ids, attn, comp, path="fast")


def test_peft_lora_and_disable_adapter(batch):
    peft = pytest.importorskip("peft")
    ids, attn, comp = batch
    base = _llama(seed=3)
    with torch.no_grad():
        base_ref, _ = _naive(base, ids, attn, comp)
    torch.manual_seed(4)
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    wrapped = peft.get_peft_model(base, cfg)
    assert fast_path_reason(wrapped) is None
    with torch.no_grad():
        lora_ref, _ = _naive(wrapped, ids, attn, comp)
    assert (lora_ref - base_ref).abs().max() > 1e-3  # the adapter does change the numbers
    out = token_logps(wrapped, ids, attn, comp, chunk_size=3)
    assert out.path == "fast"
    torch.testing.assert_close(out.logps, lora_ref, atol=ATOL, rtol=ATOL)
    out.logps.sum().backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if p.requires_grad]
    assert lora_grads and all(g is not None for g in lora_grads)
    with wrapped.disable_adapter():
        ref_sums = sequence_logps(wrapped, ids, attn, comp, chunk_size=3)
        off = token_logps(wrapped, ids, attn, comp, chunk_size=3)
    torch.testing.assert_close(off.logps.detach(), base_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ref_sums, base_ref.sum(-1), atol=1e-4, rtol=1e-4)


def test_bf16_model_gives_float32_close_to_fp32(model, batch):
    ids, attn, comp = batch
    bf = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        fp = token_logps(model, ids, attn, comp, stats=STAT_NAMES).logps
        out = token_logps(bf, ids, attn, comp, stats=STAT_NAMES, chunk_size=3)
        naive_bf, naive_stats = _naive(bf, ids, attn, comp)
    assert out.logps.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in out.stats.values())
    torch.testing.assert_close(out.logps, fp, atol=0.1, rtol=0.1)
    # against the bf16 model's own logits upcast to float32, only chunking differs
    torch.testing.assert_close(out.logps, naive_bf, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.stats["entropy"], naive_stats["entropy"], atol=1e-2, rtol=1e-2)


def _quirk_models():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    small = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(11)
    yield (
        "gemma2",
        Gemma2ForCausalLM(
            Gemma2Config(**small, head_dim=16, final_logit_softcapping=1.5, attn_logit_softcapping=None)
        ),
    )
    yield "cohere", CohereForCausalLM(CohereConfig(**small, logit_scale=3.0))
    yield "granite", GraniteForCausalLM(GraniteConfig(**small, logits_scaling=0.25))


def test_head_quirks_match_the_model_forward(batch):
    ids, attn, comp = batch
    for name, m in _quirk_models():
        m = m.float().eval()
        assert fast_path_reason(m) is None, name
        with torch.no_grad():
            ref, ref_stats = _naive(m, ids, attn, comp)
            out = token_logps(m, ids, attn, comp, stats=STAT_NAMES, chunk_size=3)
        assert out.path == "fast", name
        torch.testing.assert_close(out.logps, ref, atol=ATOL, rtol=ATOL, msg=name)
        torch.testing.assert_close(out.stats["sum_p2"], ref_stats["sum_p2"], atol=ATOL, rtol=ATOL, msg=name)
        assert verify_fast_path(m, ids, attn, comp) < ATOL


def test_sequence_logps(model, batch):
    ids, attn, comp = batch
    with torch.no_grad():
        ref, _ = _naive(model, ids, attn, comp)
    sums = sequence_logps(model, ids, attn, comp, chunk_size=2)
    assert sums.shape == (ids.shape[0],) and not sums.requires_grad
    torch.testing.assert_close(sums, ref.sum(-1), atol=1e-4, rtol=1e-4)


def test_input_validation(model, batch):
    ids, attn, comp = batch
    bad = comp.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="completion_mask"):
        token_logps(model, ids, attn, bad)
    with pytest.raises(ValueError, match="unknown stats"):
        token_logps(model, ids, attn, comp, stats=("variance",))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(model, ids, attn, comp, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        token_logps(model, ids, attn, comp[:, :-1])
    with torch.no_grad():  # no completion tokens at all: all zeros, no error
        empty = token_logps(model, ids, attn, torch.zeros_like(comp), stats=("max_p",))
    assert (empty.logps == 0).all() and (empty.stats["max_p"] == 0).all()


# ----------------------------------------------------------------------------- the one entry


def test_batch_logps_of_rows_is_token_logps(model, batch):
    """A SequenceBatch goes through the two-row computation: the same numbers as token_logps."""
    ids, attn, comp = batch
    with torch.no_grad():
        out = batch_logps(model, SequenceBatch(ids, attn, comp), stats=STAT_NAMES, chunk_size=3)
        ref = token_logps(model, ids, attn, comp, stats=STAT_NAMES, chunk_size=3)
    assert out.path == ref.path == "fast" and torch.equal(out.mask, ref.mask)
    assert torch.equal(out.logps, ref.logps)
    for name in STAT_NAMES:
        assert torch.equal(out.stats[name], ref.stats[name])


def test_batch_logps_checks_the_options_of_the_shared_layout_too(model):
    shared = collate_shared([TokenizedPair((3, 4), (5, 6), (7,), "f", 0)], 0)
    with pytest.raises(ValueError, match="unknown stats"):
        batch_logps(model, shared, stats=("variance",))
    with pytest.raises(ValueError, match="chunk_size"):
        batch_logps(model, shared, chunk_size=0)
    with pytest.raises(ValueError, match="path must be"):
        batch_logps(model, shared, path="slow")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="not exact for this model: model type 'gpt2'"):
        batch_logps(gpt2, shared)


def test_token_logps_is_a_pytree_so_ddp_finds_its_tensors():
    """A module's forward returns TokenLogps: DDP's and FSDP2's output hooks flatten it as a pytree."""
    out = _token_out()
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert any(leaf is out.logps for leaf in leaves) and any(leaf is out.stats["sum_p2"] for leaf in leaves)
    back = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, TokenLogps) and back.logps is out.logps and back.path == out.path


# ----------------------------------------------------------------------------- pair_logps


def _token_out(n=4, length=5, stats=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, length, generator=g) > 0.4
    mask[:, 0] = False
    logps = torch.where(mask, -torch.rand(n, length, generator=g), 0.0)
    st = {"sum_p2": torch.where(mask, torch.rand(n, length, generator=g), 0.0)} if stats else {}
    return TokenLogps(logps, mask, st)


def test_pair_logps_splits_rows():
    out = _token_out()
    pair = pair_logps(out)
    assert pair.batch_size == 2 and not pair.has_reference
    assert torch.equal(pair.chosen, out.logps[:2]) and torch.equal(pair.rejected, out.logps[2:])
    assert torch.equal(pair.chosen_mask, out.mask[:2]) and torch.equal(pair.rejected_mask, out.mask[2:])
    assert torch.equal(pair.chosen_stats["sum_p2"], out.stats["sum_p2"][:2])
    assert torch.equal(pair.rejected_stats["sum_p2"], out.stats["sum_p2"][2:])
    assert pair_logps(_token_out(stats=False)).chosen_stats is None


def test_pair_logps_reference_per_token_and_sums():
    out = _token_out()
    ref = TokenLogps(out.logps * 2, out.mask.clone(), {})
    pair = pair_logps(out, ref)
    assert torch.equal(pair.ref_chosen, ref.logps[:2]) and torch.equal(pair.ref_rejected, ref.logps[2:])
    sums = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    pair = pair_logps(out, ref_sums=sums)
    assert torch.equal(pair.ref_chosen, sums[0]) and torch.equal(pair.ref_rejected, sums[1])
    with pytest.raises(ValueError, match="not both"):
        pair_logps(out, ref, ref_sums=sums)
    with pytest.raises(ValueError, match="different batch"):
        pair_logps(out, TokenLogps(ref.logps, ~ref.mask, {}))
    with pytest.raises(ValueError, match="shape"):
        pair_logps(out, ref_sums=(torch.zeros(3), torch.zeros(2)))
    with pytest.raises(ValueError, match="2B rows"):
        pair_logps(_token_out(n=3))


def test_pair_logps_on_a_real_pass(model, batch):
    ids, attn, comp = batch
    policy = token_logps(model, ids, attn, comp, stats=("sum_p2",))
    with torch.no_grad():
        ref = token_logps(model, ids, attn, comp)
    pair = pair_logps(policy, ref)
    assert pair.chosen.requires_grad and not pair.ref_chosen.requires_grad
    torch.testing.assert_close(pair.chosen.detach(), pair.ref_chosen, atol=1e-6, rtol=1e-6)
    assert pair.chosen_mask.sum() == comp[:2].sum() and pair.rejected_mask.sum() == comp[2:].sum()
