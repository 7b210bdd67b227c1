"""Prototype (not used by poise): one row per pair, prompt + chosen + rejected, with a 4D attention mask.

    python benchmarks/proto_shared_prefix.py WORK_DIR [--repeats 3] [--threads 1]

WORK_DIR is a bench.py --work-dir (it holds ``model/`` or the SmolLM2 folder named in ``spec-poise-0.json``,
and ``pairs_in_batch_order.json``). For each batch of the benchmark it times one forward + backward of the DPO
policy term (sum of completion log-probs of chosen and rejected) in three layouts, interleaved:

* ``poise``: poise.model.logprobs.token_logps on the usual 2B right-padded rows (prompt+chosen, prompt+rejected);
* ``shared``: B rows [prompt | chosen | rejected]: the rejected tokens see the prompt and themselves but not
  the chosen tokens (a boolean 4D mask, True = attend), their position ids restart after the prompt; the
  first chosen and the first rejected token are both predicted by the last prompt position. The output head
  runs on completion positions only, as in poise;
* ``shared-check``: the per-sequence sums of both layouts are compared (max |difference| is printed).

The prompt is then run once per pair instead of twice. What it saves is roughly the share of duplicated
prompt tokens in the batch, minus the longer rows' extra attention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def standard_batch(group, pad):
    rows = [(p, c) for p, c, _ in group] + [(p, r) for p, _, r in group]
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    cm = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        am[i, :len(p) + len(c)] = 1
        cm[i, len(p):len(p) + len(c)] = True
    return ids, am, cm


def shared_batch(group, pad):
    """ids (B, L), bool mask (B, 1, L, L), position ids (B, L), and for the chosen/rejected tokens the row,
    predicting position and target id, plus which pair and branch (0 chosen, 1 rejected) each belongs to."""
    length = max(len(p) + len(c) + len(r) for p, c, r in group)
    b = len(group)
    ids = torch.full((b, length), pad, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, 1, length, length), dtype=torch.bool)
    rows, preds, targets, seg = [], [], [], []
    for i, (p, c, r) in enumerate(group):
        n_p, n_c, n_r = len(p), len(c), len(r)
        ids[i, :n_p + n_c + n_r] = torch.tensor(p + c + r)
        pos[i, :n_p + n_c] = torch.arange(n_p + n_c)
        pos[i, n_p + n_c:n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        m = torch.zeros((length, length), dtype=torch.bool)
        m[:n_p + n_c, :n_p + n_c] = causal[:n_p + n_c, :n_p + n_c]
        rj = slice(n_p + n_c, n_p + n_c + n_r)
        m[rj, :n_p] = True
        m[rj, rj] = causal[:n_r, :n_r]
        for t in range(n_p + n_c + n_r, length):  # padding rows attend to themselves (no NaN)
            m[t, t] = True
        mask[i, 0] = m
        for j in range(n_c):
            rows.append(i), preds.append(n_p + j - 1), targets.append(c[j]), seg.append(2 * i)
        for j in range(n_r):
            rows.append(i), preds.append(n_p - 1 if j == 0 else n_p + n_c + j - 1), targets.append(r[j])
            seg.append(2 * i + 1)
    return ids, mask, pos, torch.tensor(rows), torch.tensor(preds), torch.tensor(targets), torch.tensor(seg)


def shared_sums(model, batch, chunk=1024):
    ids, mask, pos, rows, preds, targets, seg = batch
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    h = hidden.last_hidden_state[rows, preds]
    head = model.get_output_embeddings()
    out = []
    for s in range(0, h.shape[0], chunk):
        def f(x, t):
            z = head(x).float()
            return z.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        out.append(torch.utils.checkpoint.checkpoint(f, h[s:s + chunk], targets[s:s + chunk], use_reentrant=False))
    lp = torch.cat(out)
    sums = torch.zeros(2 * ids.shape[0]).index_add(0, seg, lp)
    return sums.view(-1, 2)  # (B, 2): chosen, rejected


def poise_sums(model, batch):
    from poise.model.logprobs import token_logps

    ids, am, cm = batch
    s = token_logps(model, ids, am, cm).logps.sum(-1)
    b = ids.shape[0] // 2
    return torch.stack([s[:b], s[b:]], -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="batches to use (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    work = Path(a.work_dir)
    spec = json.loads((work / "spec-poise-0.json").read_text())
    pairs = json.loads((work / "pairs_in_batch_order.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    bsz, pad = spec["batch"], spec["pad_token_id"]
    groups = [pairs[k * bsz:(k + 1) * bsz] for k in range(len(pairs) // bsz)][:a.steps]
    times = {"poise": [], "shared": []}
    tokens = {"poise": 0, "shared": 0, "poise_positions": 0, "shared_positions": 0}
    worst = 0.0
    for g in groups:
        std, sh = standard_batch(g, pad), shared_batch(g, pad)
        tokens["poise"] += int(std[1].sum())
        tokens["poise_positions"] += std[0].numel()
        tokens["shared"] += sum(len(p) + len(c) + len(r) for p, c, r in g)
        tokens["shared_positions"] += sh[0].numel()
        with torch.no_grad():
            worst = max(worst, (poise_sums(model, std) - shared_sums(model, sh)).abs().max().item())
        for _ in range(a.repeats):
            for name, fn, batch in (("poise", poise_sums, std), ("shared", shared_sums, sh)):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                s = fn(model, batch)
                (s[:, 0] - s[:, 1]).sum().backward()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tot = {k: sum(v) for k, v in times.items()}
    print(json.dumps({"median_fwd_bwd_s": med, "shared_over_poise_total_time": tot["shared"] / tot["poise"],
                      "sum_fwd_bwd_s": {k: sum(v) for k, v in times.items()},
                      "tokens": tokens, "max_abs_diff_sequence_logp": worst,
                      "batches": len(groups), "repeats": a.repeats}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
