"""poise score-pairs (poise/eval/scorepairs.py): CHES of spec section 10 by hand, against a tiny model's
``output_hidden_states`` for one pair, and the command end to end with its filter."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import save_tiny_model

from poise.cli import main
from poise.data import tokenize_rows
from poise.data.load import Row
from poise.eval.scorepairs import (
    SCORE_KEYS,
    ches_scores,
    prefix_embedding_sums,
    score_batch,
    top_indices,
)
from poise.model.load import load_model, load_tokenizer

WORDS = "the cat sat on a mat and dog ran to big red box when it was warm".split()


def test_ches_by_hand():
    """Chosen row: tokens [p, c1, c2] (prompt p at 0, response at 1..2); rejected row: [p, r1, pad].
    Hidden states (D = 2), prefix embedding of token t = hidden at t - 1:

        chosen   h0 = (1, 0), h1 = (1, 2), h2 = (9, 9) -> H_w = h0 + h1 = (2, 2), |y_w| = 2
        rejected h0 = (3, 1), h1 = (7, 7), h2 = (5, 5) -> H_l = h0       = (3, 1), |y_l| = 1

    ches      = <(2,2),(3,1)> - ||(2,2)||^2 = 8 - 8 = 0
    ches_norm = <(1,1),(3,1)> - ||(1,1)||^2 = 4 - 2 = 2

    Second pair, chosen = the first pair's, rejected H_l = (0, 0): ches = -8, ches_norm = -2. The hidden
    state at the last response token (h2 of the chosen row) never enters: it predicts nothing scored."""
    hidden = torch.tensor([[[1, 0], [1, 2], [9, 9]],  # chosen of pair 1
                           [[1, 0], [1, 2], [9, 9]],  # chosen of pair 2
                           [[3, 1], [7, 7], [5, 5]],  # rejected of pair 1
                           [[0, 0], [7, 7], [5, 5]]], dtype=torch.float64)  # rejected of pair 2
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    sums = prefix_embedding_sums(hidden, mask)
    assert sums.dtype == torch.float64
    assert torch.equal(sums, torch.tensor([[2.0, 2.0], [2.0, 2.0], [3.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    n = mask.sum(-1)
    raw, norm = ches_scores(sums[:2], sums[2:], n[:2], n[2:])
    assert raw.tolist() == [0.0, -8.0] and norm.tolist() == [2.0, -2.0]
    # float32 hidden states are upcast before any product
    raw32, _ = ches_scores(sums[:2].float(), sums[2:].float(), n[:2], n[2:])
    assert raw32.dtype == torch.float64
    with pytest.raises(ValueError, match="first token"):
        prefix_embedding_sums(hidden, torch.ones(4, 3, dtype=torch.bool))


def test_top_indices_floor_and_ties():
    scores = [0.5, 3.0, 1.0, 3.0, -2.0, 0.0, 2.0, 1.5]
    assert top_indices(scores, 0.25) == [1, 3]  # floor(0.25 * 8) = 2: both 3.0
    assert top_indices(scores, 0.3) == [1, 3]  # floor(2.4) = 2
    assert top_indices(scores, 0.0) == []
    assert top_indices([1.0, 1.0, 1.0], 0.34) == [0]  # a tie: the earlier row goes first
    assert top_indices([0.0] * 100, 0.29) == list(range(29))  # 0.29 * 100 = 28.999...: still 29


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def _pairs(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))),
             "chosen": " " + " ".join(rng.choices(WORDS[:8], k=rng.randint(2, 5))),
             "rejected": " " + " ".join(rng.choices(WORDS[8:], k=rng.randint(3, 8)))} for _ in range(n)]


@pytest.mark.parametrize("layout", ["separate", "shared"])
@pytest.mark.parametrize("path", ["fast", "fallback"])
def test_scores_equal_a_direct_computation(model_dir, layout, path, monkeypatch):
    """For one pair (and the same pair inside a padded batch): H(y) from output_hidden_states[-1] at the
    positions before the response tokens, the summed log-probs from the logits, and G_l / G_w from the
    softmax, all by hand. ``fallback``: the engine's path for a model without a separate head (the
    hidden states then come from a second forward pass)."""
    if path == "fallback":
        import poise.eval.scorepairs
        import poise.model.logprobs

        for module in (poise.model.logprobs, poise.eval.scorepairs):
            monkeypatch.setattr(module, "resolve_path", lambda model, path: None)
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir)).eval()
    rows = [Row("d.jsonl", i + 1, r, "line") for i, r in enumerate(_pairs(3, seed=1))]
    pairs = tokenize_rows(rows, tok, max_length=64, max_prompt_length=32).pairs
    got = score_batch(model, pairs, tok.pad_token_id, layout=layout)
    assert set(got) == set(SCORE_KEYS)

    pair = pairs[1]
    P = len(pair.prompt_ids)
    by_hand = {}
    with torch.no_grad():
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            x = torch.tensor([list(pair.prompt_ids) + list(ids)])
            out = model(input_ids=x, output_hidden_states=True)
            hidden = out.hidden_states[-1][0].double()  # (L, D)
            n = len(ids)
            H = sum(hidden[P - 1 + k] for k in range(n))  # the position before response token P + k
            unshifted = sum(hidden[P + k] for k in range(n))  # the response token's own position: wrong
            assert (H - unshifted).abs().max() > 1e-3
            logp = torch.log_softmax(out.logits[0].double(), -1)
            p = logp.exp()
            S = sum(logp[P - 1 + k, ids[k]] for k in range(n))
            G2 = sum(1 - 2 * p[P - 1 + k, ids[k]] + (p[P - 1 + k] ** 2).sum() for k in range(n))
            by_hand[side] = (H, n, S.item(), G2.sqrt().item())
    H_w, n_w, S_w, G_w = by_hand["chosen"]
    H_l, n_l, S_l, G_l = by_hand["rejected"]
    ches = (H_w @ H_l - H_w @ H_w).item()
    ches_norm = ((H_w / n_w) @ (H_l / n_l) - (H_w / n_w) @ (H_w / n_w)).item()
    assert got["len_chosen"][1] == n_w and got["len_rejected"][1] == n_l
    assert got["ches"][1] == pytest.approx(ches, rel=1e-4, abs=1e-4)
    assert got["ches_norm"][1] == pytest.approx(ches_norm, rel=1e-4, abs=1e-5)
    assert got["logp_chosen"][1] == pytest.approx(S_w, rel=1e-4)
    assert got["logp_rejected"][1] == pytest.approx(S_l, rel=1e-4)
    assert got["grad_ratio"][1] == pytest.approx(G_l / G_w, rel=1e-4)
    alone = score_batch(model, [pair], tok.pad_token_id, layout=layout)
    assert alone["ches"][0] == pytest.approx(got["ches"][1], rel=1e-4, abs=1e-4)


def _setup(tmp_path, model_dir, n=8):
    data = tmp_path / "prefs.jsonl"
    rows = _pairs(n)
    for i, r in enumerate(rows):
        r["id"] = i  # an extra column, kept in the filtered file
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {data}\noutput_dir: {tmp_path / 'run'}\nmethod: dpo\n"
                   "batch_size: 2\nmicro_batch_size: 2\nmax_length: 64\nmax_prompt_length: 32\n")
    return cfg, data, rows


def test_score_pairs_end_to_end(tmp_path, model_dir, capsys):
    cfg, data, rows = _setup(tmp_path, model_dir)
    out = tmp_path / "scores"
    # options after CONFIG and among the overrides, as a user types them
    code = main(["score-pairs", str(cfg), "batch_size=6", "micro_batch_size=3", "--drop-top", "0.25",
                 "--out", str(out)])  # micro-batches of 3, 3 and 2 pairs
    printed, err = capsys.readouterr()
    assert code == 0, err
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == len(rows)
    assert [s["index"] for s in scores] == list(range(1, len(rows) + 1))  # JSONL line numbers
    assert all(s["source"] == str(data) for s in scores)
    for s in scores:
        assert set(s) == {"source", "index", *SCORE_KEYS}
        assert s["len_chosen"] >= 2 and s["logp_chosen"] < 0 and s["grad_ratio"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 8 and summary["scores"]["ches"]["count"] == 8
    assert summary["scores"]["ches"]["mean"] == pytest.approx(sum(s["ches"] for s in scores) / 8)
    assert (out / "ches_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the filter: floor(0.25 * 8) = 2 rows dropped, the two highest CHES, the rest as in the file
    kept = [json.loads(line) for line in (out / "train_filtered.jsonl").read_text().splitlines()]
    top = sorted(scores, key=lambda s: -s["ches"])[:2]
    dropped = {s["index"] - 1 for s in top}
    assert kept == [r for i, r in enumerate(rows) if i not in dropped]
    assert summary["drop_top"]["dropped"] == 2 and summary["drop_top"]["threshold"] == min(s["ches"] for s in top)
    assert max(s["ches"] for i, s in enumerate(scores) if i not in dropped) <= summary["drop_top"]["threshold"]
    assert "dropped 2 of 8" in printed and str(out / "train_filtered.jsonl") in printed

    # the filtered file is training data the preflight accepts
    assert main(["validate", str(cfg), f"train_file={out / 'train_filtered.jsonl'}"]) == 0
    assert "kept 6 of 6 rows" in capsys.readouterr().out

    # a second run into the same folder needs --force; by ches_norm this time
    assert main(["score-pairs", str(cfg), "--out", str(out), "--drop-top", "0.5", "--by", "ches_norm"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["score-pairs", "--force", str(cfg), "--out", str(out), "--drop-top", "0.5", "--by",
                 "ches_norm"]) == 0
    capsys.readouterr()
    kept = [json.loads(line) for line in (out / "train_filtered.jsonl").read_text().splitlines()]
    top = {s["index"] - 1 for s in sorted(scores, key=lambda s: -s["ches_norm"])[:4]}
    assert kept == [r for i, r in enumerate(rows) if i not in top]


def test_default_out_and_bad_drop_top(tmp_path, model_dir, capsys):
    cfg, _, rows = _setup(tmp_path, model_dir, n=4)
    for bad in ("1", "-0.1", "1.5", "nan"):
        assert main(["score-pairs", str(cfg), "--drop-top", bad]) == 2
        err = capsys.readouterr().err
        assert "--drop-top" in err and "[0, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    assert main(["score-pairs", str(cfg), "batch_size=8"]) == 2  # the config's own errors
    assert "batch_size" in capsys.readouterr().err
    assert main(["score-pairs", str(cfg), "stage=sft"]) == 2
    assert "preference" in capsys.readouterr().err
    assert main(["score-pairs", str(cfg), "--model", str(model_dir)]) == 0
    capsys.readouterr()
    out = tmp_path / "run" / "pair_scores"
    assert len((out / "scores.jsonl").read_text().splitlines()) == len(rows)
    assert not (out / "train_filtered.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["drop_top"] is None
