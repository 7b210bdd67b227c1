"""Where a step's time goes: poise's train_step by phase, and the pieces of poise, TRL and the bare loop
timed apart on the benchmark's batches (CPU time of one thread, so that other processes on a shared machine
disturb the figures as little as possible).

    python benchmarks/profile_step.py WORK_DIR [--batches 4] [--repeats 2]

WORK_DIR is a bench.py --work-dir. Measured per batch (median over repeats), all on the same model and rows:

* poise.training.loop.train_step (plain DPO, reference precomputed), cut into phases by wrapping what it calls:
  collation, the log-prob engine's forward, the objective, backward, clipping, optimizer step, the rest;
* the backbone alone (forward + backward of the last hidden states with a fixed random cotangent);
* the log-prob heads on top of it (each = its forward + backward minus the backbone's):
  poise's engine (completion positions only, chunked, checkpointed), the bare loop's full logits ->
  log_softmax -> gather, and TRL's fused head as DPOTrainer calls it (on a CPU it scores every position, prompt
  and padding included, and also computes entropy, mean logit and top-1);
* AdamW step: torch.optim.AdamW defaults (what poise and the bare loop build; on a CPU that is the
  single-tensor for-loop), foreach=True, fused=True (TRL's default optim "adamw_torch_fused");
* the token shares of the batches: duplicated prompt tokens, padding.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cpu() -> float:
    return time.process_time()


class Phases:
    """Accumulates CPU time per phase name while a step runs (nested phases are subtracted from outer ones)."""

    def __init__(self):
        self.t = defaultdict(float)
        self.stack = []

    def wrap(self, name, fn):
        def inner(*a, **k):
            self.stack.append(name)
            t0 = cpu()
            try:
                return fn(*a, **k)
            finally:
                dt = cpu() - t0
                self.stack.pop()
                self.t[name] += dt
                if self.stack:
                    self.t[self.stack[-1]] -= dt
        return inner


def poise_phases(spec, batches, repeats):
    from _workers import _poise_cfg

    import poise.training.loop as trainer
    import poise.training.tasks as tasks
    from poise.training.build import build_run

    tmp = tempfile.mkdtemp(dir=spec["work_dir"])
    cfg = _poise_cfg(spec, "dpo", Path(tmp) / "run", 10**6)
    s = build_run(cfg)
    ph = Phases()
    task = s.task
    task.collate = ph.wrap("collate", task.collate)
    orig_run_policy = tasks.run_policy
    tasks.run_policy = ph.wrap("engine forward (backbone + head)", orig_run_policy)
    obj = task.objective

    class Obj:
        def __getattr__(self, k):
            return getattr(obj, k)

        def __call__(self, *a, **k):
            return ph.wrap("objective (loss + metrics)", obj)(*a, **k)

    task.objective = Obj()
    tasks.pair_logps = ph.wrap("pair_logps", tasks.pair_logps)
    acc = s.accelerator
    acc.backward = ph.wrap("backward", acc.backward)
    acc.clip_grad_norm_ = ph.wrap("clip_grad_norm_", acc.clip_grad_norm_)
    s.optimizer.step = ph.wrap("optimizer.step", s.optimizer.step)
    s.scheduler.step = ph.wrap("scheduler.step", s.scheduler.step)
    s.optimizer.zero_grad = ph.wrap("zero_grad", s.optimizer.zero_grad)
    per_batch = []
    for k, idx in enumerate(batches):
        runs = []
        for _ in range(repeats + (1 if k == 0 else 0)):  # one extra warm-up run on the first batch
            ph.t.clear()
            t0 = cpu()
            trainer.train_step(s, idx)
            total = cpu() - t0
            d = dict(ph.t)
            d["total"] = total
            d["rest of train_step"] = total - sum(ph.t.values())
            runs.append(d)
        runs = runs[1:] if k == 0 else runs
        per_batch.append({n: statistics.median(r[n] for r in runs) for n in runs[0]})
    tasks.run_policy = orig_run_policy
    return s, per_batch


def pieces(model, batch, repeats):
    """CPU seconds (median over repeats) of the backbone and of each head, forward + backward."""
    from trl.trainer.utils import add_fused_lm_head

    from poise.model.logprobs import token_logps

    ids, am, cm = batch
    torch.manual_seed(0)
    backbone = model.get_decoder()
    cot = torch.randn(ids.shape[0], ids.shape[1], model.config.hidden_size)
    w = torch.randn(ids.shape[0], ids.shape[1])
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    labels = ids.masked_fill(~cm, -100)

    def f_backbone():
        h = backbone(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        (h * cot).sum().backward()

    def f_poise():
        lp = token_logps(model, ids, am, cm).logps
        (lp * w).sum().backward()

    def f_bare():
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * cm[:, 1:]
        (lp * w[:, 1:]).sum().backward()

    def f_trl():
        out = trl_model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True, use_cache=False)
        (out.log_probs * w[:, 1:]).sum().backward()

    fns = {"backbone": f_backbone, "poise": f_poise, "bare": f_bare, "trl": f_trl}
    times = defaultdict(list)
    for r in range(repeats + 1):
        for name, fn in fns.items():
            model.zero_grad(set_to_none=True)
            trl_model.zero_grad(set_to_none=True)
            t0 = cpu()
            fn()
            if r:
                times[name].append(cpu() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def adamw_times(model, repeats):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kw in (("default (for-loop on CPU)", {}), ("foreach=True", {"foreach": True}),
                     ("fused=True", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-7, **kw)
        opt.step()
        ts = []
        for _ in range(max(3, repeats)):
            t0 = cpu()
            opt.step()
            ts.append(cpu() - t0)
        out[name] = statistics.median(ts)
    return out


def token_shares(groups):
    prompt = comp = padded = 0
    head_positions_trl = 0
    for g in groups:
        rows = [(p, c) for p, c, _ in g] + [(p, r) for p, _, r in g]
        length = max(len(p) + len(c) for p, c in rows)
        prompt += sum(len(p) for p, _ in rows)
        comp += sum(len(c) for _, c in rows)
        padded += len(rows) * length
        head_positions_trl += len(rows) * (length - 1)
    unique_prompt = prompt // 2
    return {"prompt_tokens_fed": prompt, "duplicated_prompt_tokens": prompt - unique_prompt,
            "completion_tokens": comp, "positions_incl_padding": padded,
            "padding_share": 1 - (prompt + comp) / padded,
            "duplicated_prompt_share_of_nonpad": (prompt - unique_prompt) / (prompt + comp),
            "head_positions_poise": comp, "head_positions_trl_cpu": head_positions_trl,
            "head_positions_bare": head_positions_trl}


def balancer_costs(model, batch, repeats):
    """CPU seconds (median) of the engine forward (with the statistics the method needs) + objective + backward
    for each method on one batch and one model, interleaved, and of the objective alone (forward + backward
    on detached per-token log-probs)."""
    import poise
    from poise.model.logprobs import pair_logps, token_logps

    ids, am, cm = batch
    b = ids.shape[0] // 2
    with torch.no_grad():
        ref = token_logps(model, ids, am, cm).logps.sum(-1)
    ref_sums = (ref[:b] - 0.1, ref[b:] + 0.1)
    objs = {m: poise.objective(m) for m in ("dpo", "adadpo", "gate-dpo", "balanced-dpo")}
    objs["gate-dpo"] = poise.objective("gate-dpo", gate_tau=0.5)  # a fixed threshold: no calibration needed
    step, alone = defaultdict(list), defaultdict(list)
    for r in range(repeats + 1):
        for m, obj in objs.items():
            model.zero_grad(set_to_none=True)
            t0 = cpu()
            out = token_logps(model, ids, am, cm, stats=sorted(obj.needs_stats))
            loss = obj(pair_logps(out, ref_sums=ref_sums)).loss
            loss.backward()
            dt = cpu() - t0
            lp = out.logps.detach().requires_grad_(True)
            det = type(out)(lp, out.mask, {k: v.detach() for k, v in out.stats.items()})
            t0 = cpu()
            obj(pair_logps(det, ref_sums=ref_sums)).loss.backward()
            if r:
                step[m].append(dt)
                alone[m].append(cpu() - t0)
    base = statistics.median(step["dpo"])
    return {m: {"engine_objective_backward_s": statistics.median(step[m]),
                "ratio_to_dpo": statistics.median(step[m]) / base,
                "objective_alone_s": statistics.median(alone[m])} for m in objs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--balancers-only", action="store_true",
                    help="only the per-method cost of engine + objective + backward on one model")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from _workers import bare_batches

    work = Path(a.work_dir)
    spec = json.loads((work / "spec-poise-0.json").read_text())
    spec["work_dir"] = str(work)
    pairs = json.loads((work / "pairs_in_batch_order.json").read_text())
    b = spec["batch"]
    first = spec["warmup"]
    groups = [pairs[k * b:(k + 1) * b] for k in range(first, min(first + a.batches, len(pairs) // b))]
    if a.balancers_only:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        model.config.use_cache = False
        per = [balancer_costs(model, batch, a.repeats) for batch in bare_batches(spec)[first:first + a.batches]]
        out = {m: {k: statistics.median(p[m][k] for p in per) for k in per[0][m]} for m in per[0]}
        print(json.dumps({"balancer_costs": out, "batches": len(per), "repeats": a.repeats}, indent=1))
        return
    s, phases = poise_phases(spec, _poise_batches(spec, first, a.batches), a.repeats)
    model = s.unwrapped_model()
    bb = bare_batches(spec)[first:first + a.batches]
    pc = [pieces(model, batch, a.repeats) for batch in bb]
    res = {
        "poise_train_step_phases_s": {n: statistics.median(p[n] for p in phases) for n in phases[0]},
        "pieces_fwd_bwd_s": {n: statistics.median(p[n] for p in pc) for n in pc[0]},
        "heads_fwd_bwd_s": {n: statistics.median(p[n] - p["backbone"] for p in pc) for n in ("poise", "bare", "trl")},
        "adamw_step_s": adamw_times(model, a.repeats),
        "token_shares": token_shares(groups),
        "batches": len(groups), "repeats": a.repeats, "threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=1))


def _poise_batches(spec, first, n):
    """The pair indices of poise's batches first..first+n-1 (its own Schedule, as in the benchmark)."""
    from poise.data import load_rows, tokenize_rows
    from poise.model.load import load_tokenizer
    from poise.training.schedule import Schedule

    tok = load_tokenizer(spec["model_dir"])
    data = tokenize_rows(load_rows(spec["train_file"]), tok, max_length=spec["max_length"],
                         max_prompt_length=spec["max_prompt_length"])
    sched = Schedule([p.tokens for p in data.pairs], spec["batch"], spec["seed"], 1.0, spec["total_steps"])
    return [sched.batch(k) for k in range(first, first + n)]


if __name__ == "__main__":
    main()
