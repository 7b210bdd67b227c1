"""The shared-prefix layout gives the log-probs, statistics and gradients of the usual layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from poise.data import TokenizedPair, collate_pairs, collate_shared
from poise.data.shared import CHOSEN, PAD, PROMPT, REJECTED
from poise.errors import ConfigError
from poise.model.logprobs import batch_logps
from poise.model.shared_mask import attention_mask_4d, shared_prefix_reason
from poise.model.shared_prefix import (
    HALF_MEAN_TOLERANCE,
    check_layouts,
    choose_layout,
    layout_differences,
    pairs_reason,
    verify_shared_prefix,
)
from poise.types import STAT_NAMES

VOCAB = 97


def _llama(attn="sdpa", seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float().eval()


def _pairs(seed=3, shapes=((3, 4, 2), (1, 2, 5), (5, 1, 1), (2, 6, 3))):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist())

    return [TokenizedPair(ids(p), ids(c), ids(r), "f", i) for i, (p, c, r) in enumerate(shapes)]


def test_attention_mask_by_hand():
    """prompt p0 p1, chosen c0, rejected r0 r1, one pad: rejected sees the prompt and itself only."""
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED, PAD]], dtype=torch.int16)
    m = attention_mask_4d(seg, "sdpa", torch.float32)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0],  # c0
        [1, 1, 0, 1, 0, 0],  # r0: not c0
        [1, 1, 0, 1, 1, 0],  # r1
        [0, 0, 0, 0, 0, 1],  # pad: itself (and earlier padding), never an empty row
    ]
    eager = attention_mask_4d(seg, "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, torch.tensor(m, dtype=torch.bool))
    assert eager.min().item() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["fast", "fallback"])
def test_logps_stats_and_gradients_match_the_separate_layout(attn, path):
    model = _llama(attn)
    pairs = _pairs()
    sep_b, sh_b = collate_pairs(pairs, 0), collate_shared(pairs, 0)

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = batch_logps(model, batch, stats=STAT_NAMES, chunk_size=5, path=path)
        w = torch.arange(1, out.mask.sum() + 1, dtype=torch.float32).sin()  # distinct weight per token
        (out.logps[out.mask] * w).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    sep, g_sep = run(sep_b)
    sh, g_sh = run(sh_b)
    assert sh.path == path and sh.mask.shape == (8, 6)
    # the same scored tokens in the same row-major order: per row, the same counts
    assert sh.mask.sum(-1).tolist() == sep.mask.sum(-1).tolist() == [4, 2, 1, 6, 2, 5, 1, 3]
    torch.testing.assert_close(sh.logps[sh.mask], sep.logps[sep.mask], atol=2e-6, rtol=2e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(sh.stats[name][sh.mask], sep.stats[name][sep.mask], atol=2e-6, rtol=2e-6)
    assert (sh.logps[~sh.mask] == 0).all()
    for name in g_sep:
        torch.testing.assert_close(g_sh[name], g_sep[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_wrong_mask_is_caught_by_the_check(monkeypatch):
    """If the rejected tokens could see the chosen ones, the verification sees it and auto falls back."""
    import poise.model.shared_mask as sm

    model, pairs = _llama(), _pairs()
    assert verify_shared_prefix(model, pairs, 0) < 1e-5
    monkeypatch.setattr(sm, "attention_mask_4d", _plain_causal)
    assert verify_shared_prefix(model, pairs, 0) > 1e-3
    assert choose_layout("auto", [model], pairs, 0) == "separate"
    with pytest.raises(ConfigError, match="pair_layout: shared is not possible: the layouts disagree"):
        choose_layout("shared", [model], pairs, 0)


def test_the_check_runs_in_float32_under_bf16_autocast(monkeypatch):
    """bf16 rounding differs between the two layouts' matmul shapes (0.14 nats on a SmolLM2 token), so the
    check of float32 weights runs with autocast off: exact there, under a bf16 autocast region too."""
    model, pairs = _llama(), _pairs()
    seen = []
    real = layout_differences

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    import poise.model.shared_prefix as sp
    monkeypatch.setattr(sp, "layout_differences", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_layouts(model, pairs, 0) is None
        assert choose_layout("auto", [model], pairs, 0) == "shared"
    assert seen == [False, False]


def _plain_causal(seg, impl, dtype):
    return torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()[None, None].expand(seg.shape[0], 1, -1, -1)


def test_half_weights_are_checked_on_the_mean_difference(monkeypatch):
    """bf16 weights: rounding moves single tokens, so the mean per-token difference decides; a wrong mask
    moves the mean far past the tolerance."""
    import poise.model.shared_mask as sm

    model, pairs = _llama(initializer_range=0.2).to(torch.bfloat16), _pairs()  # logits of a trained model's scale
    diffs = layout_differences(model, pairs, 0)
    assert diffs.mean().item() <= HALF_MEAN_TOLERANCE
    assert check_layouts(model, pairs, 0) is None
    assert choose_layout("auto", [model], pairs, 0) == "shared"
    monkeypatch.setattr(sm, "attention_mask_4d", _plain_causal)
    reason = check_layouts(model, pairs, 0)
    assert reason is not None and "on average" in reason and "bfloat16" in reason
    assert layout_differences(model, pairs, 0).mean().item() > 2 * HALF_MEAN_TOLERANCE
    assert choose_layout("auto", [model], pairs, 0) == "separate"


def _fake(**config):
    """A module with only a config: what shared_prefix_reason reads."""
    module = torch.nn.Module()
    module.config = SimpleNamespace(**{"model_type": "llama", "_attn_implementation": "sdpa", **config})
    return module


def test_which_models_qualify():
    assert shared_prefix_reason(_llama("sdpa")) is None
    assert shared_prefix_reason(_llama("eager")) is None
    assert "flash_attention_2" in shared_prefix_reason(_fake(_attn_implementation="flash_attention_2"))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    assert "gpt2" in shared_prefix_reason(gpt2)  # learned absolute positions: not in the list
    assert "sliding" in shared_prefix_reason(_fake(model_type="mistral", sliding_window=16))
    assert shared_prefix_reason(_fake(model_type="qwen2", sliding_window=16, use_sliding_window=False)) is None
    assert "sliding" in shared_prefix_reason(_fake(layer_types=["full_attention", "sliding_attention"]))
    assert shared_prefix_reason(_fake(layer_types=["full_attention"] * 2)) is None


def test_choose_layout():
    model, pairs = _llama(), _pairs()
    assert choose_layout("auto", [model], pairs, 0) == "shared"
    assert choose_layout("shared", [model], pairs, 0) == "shared"
    assert choose_layout("separate", [model], pairs, 0) == "separate"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    assert choose_layout("auto", [gpt2], pairs, 0) == "separate"
    with pytest.raises(ConfigError, match="model type 'gpt2'"):
        choose_layout("shared", [gpt2], pairs, 0)
    no_prompt = [TokenizedPair((), (5, 2), (6, 2), "f", 1)]
    assert choose_layout("auto", [model], no_prompt, 0) == "separate"
    with pytest.raises(ConfigError, match="some pairs have an empty prompt"):
        choose_layout("shared", [model], pairs + no_prompt, 0)


def test_pairs_reason_needs_a_prompt_token_in_every_pair():
    pairs = _pairs()
    assert pairs_reason(pairs) is None
    assert pairs_reason(pairs + [TokenizedPair((), (5,), (6,), "f", 9)]) == "some pairs have an empty prompt"


def test_peft_lora_model_qualifies_and_matches():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    assert shared_prefix_reason(model) is None
    assert verify_shared_prefix(model, _pairs(), 0) < 1e-5


PACKING = ((2, 2, 2), (1, 1, 1), (3, 4, 2), (1, 1, 2), (2, 3, 2))  # 6, 3, 9, 4, 7 tokens: width 9


def test_short_pairs_share_a_row_and_see_only_their_own_pair():
    from poise.data.shared import REJECTED as R

    batch = collate_shared(_pairs(shapes=PACKING), 0)
    assert batch.input_ids.shape == (4, 9) and batch.num_pairs == 5  # pairs 0 (6) and 1 (3) share row 0
    assert batch.segments[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 5]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 1]  # positions restart per pair
    assert int(batch.attention_mask.sum()) == 6 + 3 + 9 + 4 + 7
    m = attention_mask_4d(batch.segments[:1], "sdpa", torch.float32)[0, 0].int()
    assert m[6].tolist() == [0] * 6 + [1, 0, 0]  # pair 1's prompt sees nothing of pair 0
    assert m[8].tolist() == [0] * 6 + [1, 0, 1]  # pair 1's rejected: its prompt and itself, not its chosen
    assert R == 2 and m[4].tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 0]
    unpacked = collate_shared(_pairs(shapes=PACKING), 0, pack=False)
    assert unpacked.input_ids.shape == (5, 9)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_separate_layouts_logps_and_gradients(attn):
    model, pairs = _llama(attn), _pairs(shapes=PACKING)

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = batch_logps(model, batch, stats=STAT_NAMES, chunk_size=5)
        w = torch.arange(1, out.mask.sum() + 1, dtype=torch.float32).cos()
        (out.logps[out.mask] * w).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (sep, g_sep), (sh, g_sh) = run(collate_pairs(pairs, 0)), run(collate_shared(pairs, 0))
    assert collate_shared(pairs, 0).input_ids.shape[0] < len(pairs)  # packed
    torch.testing.assert_close(sh.logps[sh.mask], sep.logps[sep.mask], atol=2e-6, rtol=2e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(sh.stats[name][sh.mask], sep.stats[name][sep.mask], atol=2e-6, rtol=2e-6)
    for name in g_sep:
        torch.testing.assert_close(g_sh[name], g_sep[name], atol=1e-5, rtol=1e-4, msg=name)
