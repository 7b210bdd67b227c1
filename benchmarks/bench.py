"""poise vs TRL's DPOTrainer vs a bare PyTorch loop: throughput, step time and peak memory, in one command.

    python benchmarks/bench.py --model small --json benchmarks/results/cpu-small.json
    python benchmarks/bench.py --model smollm2 --json benchmarks/results/cpu-smollm2.json
    python benchmarks/bench.py --quick            # a smoke configuration (tests/test_bench_smoke.py)

Five contenders, poise with its defaults (``poise-default``: what a user's config runs, diagnostics and
gradient checkpointing on), the same without diagnostics (``poise-nodiag``: what the diagnostics' cost is
measured against), poise at its fastest (``poise-fast``: ``diagnostics: false``, ``gradient_checkpointing:
false``), TRL's DPOTrainer at its fastest and a bare PyTorch loop, each train one epoch of the same model
from the same folder, on the same pairs in the same batches (poise's length-grouped order, given to TRL and
the bare loop as a sequential order), each in a fresh process, alternating poise-default, poise-nodiag,
poise-fast, TRL, bare, poise-default, ... Two figures per
run: steady-state tokens/s over the training steps after the warm-up steps, and the epoch's whole wall time
from process start to the saved model (start-up, tokenization, the reference pass, training, saving). The
token ids each contender actually trained on are hashed per step and compared. This machine's matmul
GFLOP/s is measured, and a poise step's achieved matmul throughput given as a fraction of it. Then poise's
balancers are timed against plain DPO (step-interleaved in one process), and poise's log-prob engine is
compared with a full log-softmax for peak memory over vocabulary sizes and lengths (one fresh process per
configuration). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, read_json, write_json  # noqa: E402

CONTENDERS = ("poise-default", "poise-nodiag", "poise-fast", "trl", "bare")
NAMES = {"poise-default": "poise defaults", "poise-nodiag": "poise defaults, no diagnostics",
         "poise-fast": "poise fastest", "trl": "TRL DPOTrainer",
         "bare": "bare PyTorch"}
TARGETS = {"default_tokens_per_s_vs_trl": 1.5, "fast_tokens_per_s_vs_trl": {"small": 2.5, "smollm2": 2.0},
           "peak_mem_vs_trl_smollm2": 0.6, "step_vs_bare": 1.15, "balancer_overhead": 0.03,
           "diagnostics_wall": 0.05, "diagnostics_peak_mem": 0.10, "padding": 0.05, "reference_vs_training": 2.0}

# Per model: data lengths (in words; token lengths are measured and printed), limits, batch, the epoch (pairs:
# every contender trains one epoch over them; steady state = the steps after the warm-up steps) and rounds.
# epoch_pairs: poise's epoch takes about a minute on the small model, a few minutes on SmolLM2 (CPU, 1 thread).
PRESETS = {
    "small": dict(batch=4, epoch_pairs=96, warmup=2, rounds=2, balancer_steps=8, balancer_reps=3,
                  prompt_words=(45, 170), completion_words=(20, 170), max_length=512, max_prompt_length=256, lr=1e-5),
    "smollm2": dict(batch=4, epoch_pairs=48, warmup=1, rounds=2, balancer_steps=4, balancer_reps=3,
                    prompt_words=(20, 80), completion_words=(15, 110), max_length=320, max_prompt_length=128, lr=1e-6),
    "tiny": dict(batch=2, epoch_pairs=8, warmup=1, rounds=1, balancer_steps=3, balancer_reps=1, prompt_words=(4, 12),
                 completion_words=(3, 10), max_length=64, max_prompt_length=32, lr=1e-4),
}
MATMUL = {"n": 2048, "reps": 5}
MEMSCAN_FULL = dict(vocabs=(8192, 32768, 131072), lengths=(256, 1024, 2048), rows=2, hidden=128, layers=2)
MEMSCAN_QUICK = dict(vocabs=(2048,), lengths=(128,), rows=2, hidden=64, layers=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ assets


def build_assets(args, work: Path) -> dict:
    """Model folder, data files and the run spec shared by every worker."""
    import _assets

    from poise.data import load_rows, tokenize_rows
    from poise.model.load import load_tokenizer
    from poise.training.schedule import Schedule

    p = PRESETS[args.preset]
    if args.model == "smollm2":
        folder = _assets.smollm2_folder(log)
        words = _assets.english_words()
    else:
        folder = work / "model"
        builder = _assets.build_tiny if args.preset == "tiny" else _assets.build_small
        words = builder(folder)
    tok = load_tokenizer(str(folder))
    n_pairs = args.epoch_pairs
    total = n_pairs // args.batch  # one epoch
    balancer_total = args.warmup + args.balancer_steps
    # Candidates, tokenized without limits; keep the first pairs that fit so nobody truncates anything.
    cand = work / "candidates.jsonl"
    _assets.write_pairs(cand, words, 3 * n_pairs + 8, p["prompt_words"], p["completion_words"], seed=args.seed)
    rows = load_rows(str(cand))
    data = tokenize_rows(rows, tok, max_length=None, max_prompt_length=None)
    keep = [i for i, q in enumerate(data.pairs) if len(q.prompt_ids) <= p["max_prompt_length"]
            and q.length <= p["max_length"]][:n_pairs]
    if len(keep) < n_pairs:
        raise SystemExit(f"only {len(keep)} generated pairs fit max_length={p['max_length']}")
    lines = cand.read_text().splitlines()
    train_file = work / "train.jsonl"
    train_file.write_text("".join(lines[i] + "\n" for i in keep))
    pairs = [data.pairs[i] for i in keep]
    check = tokenize_rows(load_rows(str(train_file)), tok, max_length=p["max_length"],
                          max_prompt_length=p["max_prompt_length"])
    assert [(q.prompt_ids, q.chosen_ids, q.rejected_ids) for q in check.pairs] == \
        [(q.prompt_ids, q.chosen_ids, q.rejected_ids) for q in pairs]
    sched = Schedule([q.tokens for q in pairs], args.batch, args.seed, 1.0, None)  # one epoch, as poise runs it (batch_grouping: tokens)
    assert sched.total == total
    order = [i for k in range(total) for i in sched.batch(k)]
    trl_file = work / "train_in_batch_order.jsonl"
    trl_file.write_text("".join(lines[keep[i]] + "\n" for i in order))
    pairs_file = work / "pairs_in_batch_order.json"
    pairs_file.write_text(json.dumps([[list(pairs[i].prompt_ids), list(pairs[i].chosen_ids),
                                       list(pairs[i].rejected_ids)] for i in order]))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    n_params, n_embed, n_head = _count_params(folder)
    lens = [len(q.prompt_ids) + max(len(q.chosen_ids), len(q.rejected_ids)) for q in pairs]
    spec = {
        "device": args.device, "model": args.model, "model_dir": str(folder), "train_file": str(train_file),
        "trl_file": str(trl_file), "pairs_file": str(pairs_file), "batch": args.batch, "total_steps": total,
        "warmup": args.warmup, "balancer_steps": balancer_total, "balancer_reps": args.balancer_reps, "lr": p["lr"], "beta": 0.1,
        "seed": args.seed, "max_length": p["max_length"], "max_prompt_length": p["max_prompt_length"],
        "work_dir": str(work), "threads": args.threads, "pad_token_id": tok.pad_token_id,
        "precision": args.resolved_precision, "matmul_n": args.matmul_n, "matmul_reps": MATMUL["reps"],
    }
    info = {
        "model": args.model, "architecture": config.model_type, "parameters": n_params,
        "body_parameters": n_params - n_embed - n_head, "embedding_parameters": n_embed,
        "head_parameters": n_head, "tied_head": n_head == 0,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "pairs": n_pairs, "prompt_tokens": _span([len(q.prompt_ids) for q in pairs]),
        "completion_tokens": _span([len(q.chosen_ids) for q in pairs] + [len(q.rejected_ids) for q in pairs]),
        "longest_row_tokens": _span(lens),
    }
    return {"spec": spec, "info": info}


def _count_params(folder: Path) -> tuple[int, int, int]:
    """(all parameters, the input embedding's, the output head's: 0 when tied to the embedding)."""
    from safetensors import safe_open

    n = emb = head = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                m = _prod(s.get_slice(k).get_shape())
                n += m
                emb += m if "embed_tokens" in k else 0
                head += m if "lm_head" in k else 0
    return n, emb, head


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _span(xs: list[int]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


# ------------------------------------------------------------------------------------------------ workers


def run_worker(kind: str, spec: dict, work: Path, tag: str, timeout: float) -> dict:
    spec_path, out_path = work / f"spec-{tag}.json", work / f"out-{tag}.json"
    write_json(spec_path, spec)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets"), PYTHONWARNINGS="ignore")
    launch = time.time()  # the workers report Unix times: the epoch is timed from here, the process start
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "_workers.py"), kind, str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} ({tag}) failed:\n{proc.stderr[-4000:]}")
    out = read_json(out_path)
    out["wall_s"] = time.perf_counter() - t0
    if "unix_done" in out:
        out.update({"epoch_wall_s": out["unix_done"] - launch, "startup_s": out["unix_first_step"] - launch,
                    "train_s": out["unix_last_step"] - out["unix_first_step"],
                    "finish_s": out["unix_done"] - out["unix_last_step"]})
    return out


def measured(res: dict, clock: str = "ends") -> tuple[list[float], list[int]]:
    """(step times, non-pad tokens) of the measured steps: step k's time is end(k) - end(k-1), k >= warmup;
    clock "ends" is wall time, "cpu_ends" the process's CPU time."""
    ends, w = res[clock], res["warmup"]
    return [ends[k] - ends[k - 1] for k in range(w, len(ends))], res["tokens_per_step"][w:]


def step_flops(c: dict, info: dict) -> float:
    """Estimated FLOPs of one training step (forward + backward; the reference is precomputed, so the step
    runs no reference forward) from the positions poise's layout computes: 6 x (parameters other than the
    embedding and the output head) x positions computed (padding included), + 6 x vocab x hidden x the
    completion tokens the output head scores, + 12 x layers x hidden x the sum over rows of length^2
    (attention scores and values, masked positions included, as SDPA computes them)."""
    return (6 * info["body_parameters"] * c["computed"] + 6 * info["vocab_size"] * info["hidden_size"] * c["scored"]
            + 12 * info["layers"] * info["hidden_size"] * c["attn_sq"])


def summarize(results: dict[str, list[dict]], info: dict | None = None) -> dict:
    out = {}
    for kind, runs in results.items():
        times, toks, inner, cpu = [], [], [], []
        for r in runs:
            t, n = measured(r)
            times += t
            toks += n
            inner += r["inner"][r["warmup"]:]
            cpu += measured(r, "cpu_ends")[0]
        out[kind] = {
            "tokens_per_s": sum(toks) / sum(times),
            "median_step_s": statistics.median(times),
            "p10_step_s": _quantile(times, 0.1), "p90_step_s": _quantile(times, 0.9),
            "median_inner_step_s": statistics.median(inner),
            "tokens_per_cpu_s": sum(toks) / sum(cpu),
            "median_cpu_step_s": statistics.median(cpu),
            "cpu_step_times_s": cpu,
            "measured_tokens_per_run": sum(runs[0]["tokens_per_step"][runs[0]["warmup"]:]),
            "peak_train_mib": max(r["peak_train_mib"] for r in runs),
            "mem_at_train_start_mib": max(r["mem_at_train_start_mib"] or 0 for r in runs),
            "peak_process_mib": max(r["peak_process_mib"] for r in runs),
            "per_round_tokens_per_s": [sum(measured(r)[1]) / sum(measured(r)[0]) for r in runs],
            "step_times_s": times, "setup_s": [r["setup_s"] for r in runs],
            "mixed_precision": runs[0].get("mixed_precision"),
            "computed_tokens_per_run": sum(runs[0]["computed_per_step"]),
            "padding_fraction": sum(runs[0]["pad_per_step"]) / sum(runs[0]["computed_per_step"]),
            "rss_after_imports_mib": max(r.get("rss_after_imports_mib") or 0 for r in runs),
        }
        o = out[kind]
        if all("epoch_wall_s" in r for r in runs):
            for x in ("epoch_wall_s", "startup_s", "train_s", "finish_s"):
                o[x] = statistics.median(r[x] for r in runs)
            o["epoch_wall_s_per_round"] = [r["epoch_wall_s"] for r in runs]
            o["disk"] = runs[0].get("disk")
        if "reference" in runs[0]:  # poise: the reference pass and the training steps, pairs per second
            ref_s, ref_n = sum(r["reference"]["seconds"] for r in runs), sum(r["reference"]["pairs"] for r in runs)
            o["reference_s"] = statistics.median(r["reference"]["seconds"] for r in runs)
            o["reference_pairs"] = runs[0]["reference"]["pairs"]
            o["reference_pairs_per_s"] = ref_n / ref_s if ref_s > 0 else float("nan")
            steps = sum(len(measured(r)[0]) for r in runs)
            o["training_pairs_per_s"] = steps * _batch(runs[0]) / sum(times)
            o["probe_s"] = statistics.median(sum(r["probe_s"]) for r in runs)
            o["probes"] = len(runs[0]["probe_s"])
            if info is not None:
                flops = sum(step_flops(c, info) for r in runs for c in r["layout_steps"][r["warmup"]:])
                o["achieved_gflops"] = flops / sum(times) / 1e9
                o["flops_per_step"] = statistics.median(step_flops(c, info) for c in runs[0]["layout_steps"])
    return out


def _batch(run: dict) -> int:
    return len(run["idx"][0])


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def verify_tokens(results: dict[str, list[dict]]) -> dict:
    ref = results[next(iter(results))][0]
    same = all(r["row_digests"] == ref["row_digests"] and r["tokens_per_step"] == ref["tokens_per_step"]
               for runs in results.values() for r in runs)
    return {"identical": same, "tokens_per_step": ref["tokens_per_step"],
            "per_contender_total": {k: [sum(r["tokens_per_step"]) for r in runs] for k, runs in results.items()}}


def balancer_summary(res: dict, key: str = "times") -> dict:
    """Per batch, the fastest of the repeats of each method's step (on a shared CPU the same step on the same
    batch varies by 10-20% between repeats, and disturbances only ever add time, so the minimum is the
    least-disturbed estimate, as in ``timeit``); then, over batches, the median of the ratio to plain DPO on
    the same batch (paired), the ratio of the methods' median step times and the ratio of the totals."""
    w = res["warmup"]
    t = {m: [min(reps) for reps in v[w:]] for m, v in res[key].items()}
    base = t["dpo"]
    out = {}
    for m, v in t.items():
        ratios = [a / b for a, b in zip(v, base)]
        out[m] = {"median_step_s": statistics.median(v), "median_paired_ratio": statistics.median(ratios),
                  "ratio_of_medians": statistics.median(v) / statistics.median(base),
                  "ratio_of_totals": sum(v) / sum(base), "batches": len(v), "reps": res.get("reps", 1)}
    return out


# ------------------------------------------------------------------------------------------------ report


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(res: dict) -> str:
    info, cfg = res["info"], res["config"]
    m = res["machine"]
    out = [f"# poise benchmark: model {info['model']} ({info['architecture']}, {info['parameters'] / 1e6:.1f}M "
           f"parameters, vocab {info['vocab_size']}, {info['layers']} layers, hidden {info['hidden_size']})",
           f"device {cfg['device']} | {m['cpu_model']} | {m['cpu_cores']} cores, {res['worker_threads']} torch "
           f"thread(s) per worker | torch {m['torch']} | transformers {m['transformers']} | trl {m['trl']} | "
           f"{res['date']}",
           f"data: {info['pairs']} pairs; prompt tokens {info['prompt_tokens']}, completion tokens "
           f"{info['completion_tokens']}, longest row per pair {info['longest_row_tokens']}"]
    if res["raw"].get("contenders"):
        out += contenders_report(res)
    return "\n".join(out + rest_report(res))


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def contenders_report(res: dict) -> list[str]:
    s, cfg = res["raw"]["contenders"], res["config"]
    mem_unit = "MiB (CUDA max allocated)" if cfg["device"] == "cuda" else "MiB (RSS)"
    f = s["poise-fast"]
    out = [f"one epoch of {cfg['epoch_pairs']} pairs per run: batch {cfg['batch']} pairs ({2 * cfg['batch']} rows), "
           f"{cfg['steps']} measured steps after {cfg['warmup']} warm-up steps, {cfg['rounds']} rounds alternating "
           "poise defaults, poise defaults without diagnostics, poise fastest, TRL, bare (fresh process each)",
           "poise defaults: a user's config (diagnostics on, gradient_checkpointing on, mixed_precision auto, "
           "pair_layout auto, precomputed reference); poise defaults, no diagnostics: the same with diagnostics: "
           "false; poise fastest: diagnostics: false, gradient_checkpointing: false, mixed_precision explicit",
           "steady state: training steps only (end of step k-1 to end of step k: collation, forward, backward, "
           "clip, optimizer, scheduler, per-step bookkeeping, and the probes that fall between steps); epoch: "
           "process start to the saved model",
           f"tokens: {res['tokens']['verdict']}",
           "optimizers: " + ", ".join(f"{k} {s[k].get('optimizer')}" for k in CONTENDERS)
           + f"; poise's pair layout: {f.get('pair_layout')} (prompt once per pair when shared)",
           "mixed precision: " + ", ".join(f"{k} {s[k].get('mixed_precision')}" for k in CONTENDERS), ""]
    cpu = cfg["device"] == "cpu"
    rows = []
    for k in CONTENDERS:
        c = s[k]
        rows.append([NAMES[k], f"{c['tokens_per_s']:.0f}", f"{c['median_step_s']:.3f}",
                     f"{c['p10_step_s']:.3f}-{c['p90_step_s']:.3f}",
                     f"{c['tokens_per_cpu_s']:.0f}" if cpu else "-", f"{c['median_cpu_step_s']:.3f}" if cpu else "-",
                     f"{c['peak_train_mib']:.0f}", f"{c['mem_at_train_start_mib']:.0f}",
                     f"{c['peak_process_mib']:.0f}" if cpu else "-",
                     " ".join(f"{x:.0f}" for x in c["per_round_tokens_per_s"])])
    out.append(fmt_table(["contender", "non-pad tok/s", "median step s", "p10-p90 s", "tok/CPU-s",
                          "median CPU s", f"peak train {mem_unit}", "at train start", "peak process",
                          "tok/s per round"], rows))
    out += ["", "one epoch, whole process (medians over rounds): start-up = process start to the first step "
            "(imports, loading, tokenization, layout check, reference pass, start probes); finish = the last "
            "step to the saved model (end probes, checkpoint, final model)"]
    rows = []
    for k in CONTENDERS:
        c = s[k]
        rows.append([NAMES[k], _f(c.get("epoch_wall_s"), ".1f"), _f(c.get("startup_s"), ".1f"),
                     _f(c.get("reference_s"), ".1f"), _f(c.get("train_s"), ".1f"), _f(c.get("finish_s"), ".1f"),
                     _f(c.get("probe_s"), ".1f") + (f" ({c['probes']})" if c.get("probes") else ""),
                     " ".join(f"{x:.1f}" for x in c.get("epoch_wall_s_per_round", [])),
                     f"{100 * c['padding_fraction']:.1f}%"])
    out.append(fmt_table(["contender", "epoch wall s", "start-up s", "reference s", "training s", "finish s",
                          "probes s (n)", "epoch s per round", "pad share"], rows))
    r, c = res, res.get("cpu_time", {})
    nan = float("nan")
    out += ["", "ratios                              wall     CPU time",
            f"poise fastest/TRL tokens/s          {r['tokens_per_s_ratio_vs_trl']:.3f}    "
            f"{c.get('tokens_per_s_ratio_vs_trl', nan):.3f}   (> 1: poise is faster)",
            f"poise defaults/TRL tokens/s         {r['default_tokens_per_s_ratio_vs_trl']:.3f}    "
            f"{c.get('default_tokens_per_s_ratio_vs_trl', nan):.3f}",
            f"poise fastest/bare median step      {r['step_ratio_vs_bare']:.3f}    "
            f"{c.get('step_ratio_vs_bare', nan):.3f}   (1 = the floor)",
            f"poise defaults/bare median step     {r['default_step_ratio_vs_bare']:.3f}    "
            f"{c.get('default_step_ratio_vs_bare', nan):.3f}",
            f"poise fastest/TRL median step       {f['median_step_s'] / s['trl']['median_step_s']:.3f}    "
            f"{f['median_cpu_step_s'] / s['trl']['median_cpu_step_s']:.3f}",
            f"poise fastest/TRL peak memory       {r['peak_mem_ratio_vs_trl']:.3f}             (peak during "
            "training; < 1: poise uses less)",
            f"poise defaults/TRL peak memory      {r['default_peak_mem_ratio_vs_trl']:.3f}",
            f"poise defaults/TRL epoch wall       {_f(r.get('epoch_wall_ratio_vs_trl'))}             (process start "
            "to saved model; < 1: poise is done sooner)",
            f"poise fastest/TRL epoch wall        {_f(r.get('fast_epoch_wall_ratio_vs_trl'))}",
            f"diagnostics overhead, wall          {_f(r.get('diagnostics_overhead'))}             ((epoch defaults - "
            "epoch defaults without diagnostics) / epoch defaults, paired by round)",
            f"diagnostics overhead, peak memory   {_f(r.get('diagnostics_peak_mem_overhead'))}             (peak "
            "process memory, defaults / defaults without diagnostics - 1)",
            f"padding, share of tokens computed   {r['padding_fraction']:.3f}             (poise's layout; TRL "
            f"{s['trl']['padding_fraction']:.3f}, bare {s['bare']['padding_fraction']:.3f})",
            f"reference pass / training pairs/s   {_f(r.get('reference_pairs_per_s_ratio_vs_training'))}             "
            f"(poise fastest: {_f(f.get('reference_pairs_per_s'), '.2f')} pairs/s over "
            f"{f.get('reference_pairs')} pairs vs {_f(f.get('training_pairs_per_s'), '.2f')} in training)", ""]
    out += matmul_report(res) + memory_disk_report(res)
    return out


def matmul_report(res: dict) -> list[str]:
    mm = res["raw"].get("matmul")
    if not mm:
        return []
    s = res["raw"]["contenders"]
    peaks = ", ".join(f"{k} {mm[k]['best_gflops']:.1f} GFLOP/s (median {mm[k]['median_gflops']:.1f})"
                      for k in ("fp32", "bf16") if k in mm)
    out = [f"matmul peak of this machine: torch.mm {mm['n']}x{mm['n']}, {mm['threads']} thread(s), best of "
           f"{mm['reps']}: {peaks}",
           "a poise step's achieved matmul throughput: estimated FLOPs (6 x non-embedding, non-head parameters x "
           "positions computed + 6 x vocab x hidden x completion tokens scored + 12 x layers x hidden x sum of "
           "row length^2; gradient checkpointing's recomputed forward not counted) / step time, over the measured "
           "steps, against the peak in the step's precision:"]
    rows = []
    for k in ("poise-default", "poise-fast"):
        c = s[k]
        rows.append([NAMES[k], c.get("mixed_precision"), f"{c['flops_per_step'] / 1e9:.1f}",
                     f"{c['achieved_gflops']:.1f}", f"{c['matmul_peak_gflops']:.1f}",
                     f"{100 * c['matmul_fraction']:.1f}%"])
    out.append(fmt_table(["contender", "precision", "GFLOP per step (median)", "achieved GFLOP/s",
                          "peak GFLOP/s", "fraction of peak"], rows))
    return out + [""]


def memory_disk_report(res: dict) -> list[str]:
    """Peak process memory and disk use, with a breakdown from the parameter count (fp32 weights, their
    gradients, AdamW's two moments) and the measured sizes of what the run wrote."""
    info = res["info"]
    br = res.get("memory_disk")
    if not br:
        return []
    out = [f"memory and disk of one epoch ({info['parameters'] / 1e6:.1f}M parameters: fp32 weights "
           f"{br['weights_mib']:.0f} MiB, gradients {br['weights_mib']:.0f}, AdamW state "
           f"{2 * br['weights_mib']:.0f}; reference sums {br['reference_sums_mib']:.2f} MiB); peak process = "
           "ru_maxrss of the whole run; runtime = RSS after imports; activations and the rest = peak - runtime - "
           "weights - gradients - AdamW state (a best-effort split)"]
    rows = []
    for k in CONTENDERS:
        m = br["contenders"][k]
        rows.append([NAMES[k], f"{m['peak_process_mib']:.0f}", f"{m['runtime_mib']:.0f}", f"{br['weights_mib']:.0f}",
                     f"{br['weights_mib']:.0f}", f"{2 * br['weights_mib']:.0f}", f"{m['rest_mib']:.0f}",
                     m["memory_dominated_by"], f"{m['checkpoints_mib']:.0f} ({m['checkpoints']})",
                     f"{m['final_model_mib']:.0f}", f"{m['reference_cache_mib']:.2f}", f"{m['disk_mib']:.0f}",
                     m["disk_dominated_by"]])
    out.append(fmt_table(["contender", "peak process MiB", "runtime", "weights", "gradients", "AdamW",
                          "activations + rest", "memory: largest", "checkpoints MiB (n)", "final model",
                          "reference cache", "disk total", "disk: largest"], rows))
    return out + [f"a checkpoint holds the weights and AdamW's state: about {3 * br['weights_mib']:.0f} MiB "
                  "at 12 bytes per parameter, the final model " f"{br['weights_mib']:.0f} MiB", ""]


def rest_report(res: dict) -> list[str]:
    r, out = res, [""]
    b = r["raw"].get("balancers")
    if b:
        bc = r["raw"].get("balancers_cpu") or {}
        v0 = b["dpo"]
        out.append(f"balancer overhead over plain DPO in poise ({v0['batches']} batches x {v0['reps']} repeats per "
                   "method, the four methods interleaved step by step on the same batches, train_step time, the "
                   "fastest repeat per batch; overhead = median over batches of the ratio to DPO on the same "
                   "batch, minus 1):")
        out.append(fmt_table(["method", "median step s", "overhead (wall)", "ratio of totals (wall)",
                              "median CPU s", "overhead (CPU)", "ratio of totals (CPU)"],
                             [[m, f"{v['median_step_s']:.3f}", f"{100 * (v['median_paired_ratio'] - 1):+.1f}%",
                               f"{v['ratio_of_totals']:.3f}",
                               f"{bc[m]['median_step_s']:.3f}" if bc else "-",
                               f"{100 * (bc[m]['median_paired_ratio'] - 1):+.1f}%" if bc else "-",
                               f"{bc[m]['ratio_of_totals']:.3f}" if bc else "-"]
                              for m, v in b.items()]))
        out.append("")
    scan = r.get("mem_scan")
    if scan:
        out.append(f"log-prob engine memory scan: one forward + backward, {scan['rows']} rows, half of each row "
                   f"is completion, Llama {scan['layers']} layers hidden {scan['hidden']}, chunk_size 1024; "
                   f"growth = {scan['method']}")
        out.append(fmt_table(["vocab", "length", "(N,L,V) fp32 MiB", "poise growth MiB", "full growth MiB",
                              "poise/full", "poise s", "full s"],
                             [[str(e["vocab"]), str(e["length"]), f"{e['full_logits_mib']:.0f}",
                               f"{e['poise_growth_mib']:.0f}",
                               "skipped" if e["full_growth_mib"] is None else f"{e['full_growth_mib']:.0f}",
                               "-" if e["full_growth_mib"] is None else f"{e['poise_growth_mib'] / e['full_growth_mib']:.3f}",
                               f"{e['poise_s']:.2f}", "-" if e["full_s"] is None else f"{e['full_s']:.2f}"]
                              for e in scan["entries"]]))
        out.append("")
    out.append("targets (verdict on wall time as specified; the CPU-time verdict, less sensitive to other "
               "processes on a shared CPU, in brackets):")
    out += [f"  {t['verdict']:4}  {t['name']}: {t['detail']}" for t in r["targets"]]
    contenders = r["raw"].get("contenders")
    if contenders:
        out += ["", "TRL options (DPOConfig): " + json.dumps(contenders["trl"].get("options", {}), sort_keys=True)]
        for k in ("poise-default", "poise-nodiag", "poise-fast"):
            o = contenders[k].get("options", {})
            out.append(f"{NAMES[k]} (poise config, resolved): diagnostics={o.get('diagnostics')} "
                       f"diagnostics_steps={o.get('diagnostics_steps')} diagnostics_budget={o.get('diagnostics_budget')} "
                       f"mixed_precision={o.get('mixed_precision')} (ran {contenders[k].get('mixed_precision')}) "
                       f"pair_layout={o.get('pair_layout')} (ran {contenders[k].get('pair_layout')}) "
                       f"precompute_reference={o.get('precompute_reference')} "
                       f"gradient_checkpointing={o.get('gradient_checkpointing')}")
    return out


def targets(res: dict, model: str) -> list[dict]:
    t = []
    cpu = res.get("cpu_time") or {}

    def add(name, value, limit, op, applies=True, cpu_value=None, why=" (the target is for smollm2)"):
        def ok(x):
            return {">=": x >= limit, "<=": x <= limit, "<": x < limit}[op]

        if value is None or (isinstance(value, float) and math.isnan(value)):
            t.append({"name": name, "value": None, "limit": limit, "verdict": "n/a", "detail": "not measured"})
            return
        verdict = ("PASS" if ok(value) else "FAIL") if applies else "n/a"
        detail = f"{value:.3f} {op} {limit}"
        entry = {"name": name, "value": value, "limit": limit, "verdict": verdict}
        if cpu_value is not None:
            entry["cpu_value"] = cpu_value
            entry["cpu_verdict"] = ("PASS" if ok(cpu_value) else "FAIL") if applies else "n/a"
            detail += f"  [CPU time: {entry['cpu_verdict']} {cpu_value:.3f}]"
        entry["detail"] = detail + ("" if applies else why)
        t.append(entry)

    if "tokens_per_s_ratio_vs_trl" in res:
        fast_min = TARGETS["fast_tokens_per_s_vs_trl"][model]
        add("poise defaults: tokens/s >= 1.5 x TRL", res["default_tokens_per_s_ratio_vs_trl"],
            TARGETS["default_tokens_per_s_vs_trl"], ">=", cpu_value=cpu.get("default_tokens_per_s_ratio_vs_trl"))
        add(f"poise fastest: tokens/s >= {fast_min} x TRL ({model}; 2.5 small, 2 smollm2)",
            res["tokens_per_s_ratio_vs_trl"], fast_min, ">=", cpu_value=cpu.get("tokens_per_s_ratio_vs_trl"))
        # the memory target is the defaults' (what a user gets); the fastest settings turn gradient
        # checkpointing off, trading that memory for speed, and their ratio is printed above
        add("poise defaults: peak memory <= 0.6 x TRL on smollm2", res["default_peak_mem_ratio_vs_trl"],
            TARGETS["peak_mem_vs_trl_smollm2"], "<=", applies=model == "smollm2")
        for who, key in (("defaults", "default_step_ratio_vs_bare"), ("fastest", "step_ratio_vs_bare")):
            add(f"poise {who}: step time <= 1.15 x bare (reference precomputed)", res[key], TARGETS["step_vs_bare"],
                "<=", cpu_value=cpu.get(key))
        add("poise defaults: diagnostics add <= 5% wall time (epoch, probes included)",
            res.get("diagnostics_overhead"), TARGETS["diagnostics_wall"], "<=")
        add("poise defaults: diagnostics add <= 10% peak memory", res.get("diagnostics_peak_mem_overhead"),
            TARGETS["diagnostics_peak_mem"], "<=")
        for who, k in (("defaults", "poise-default"), ("fastest", "poise-fast")):
            c = res["raw"]["contenders"][k]
            add(f"poise {who}: padding < 5% of the tokens computed", c["padding_fraction"], TARGETS["padding"], "<")
            add(f"poise {who}: reference pass >= 2 x training pairs/s", c.get("reference_ratio"),
                TARGETS["reference_vs_training"], ">=")
    for m, v in res["balancer_overhead"].items():
        add(f"{m} within 3% of plain DPO's step time", v, TARGETS["balancer_overhead"], "<=",
            cpu_value=(cpu.get("balancer_overhead") or {}).get(m))
    return t


# ------------------------------------------------------------------------------------------------ main


def memscan(args, work: Path, spec_base: dict) -> dict | None:
    grid = MEMSCAN_QUICK if args.quick else MEMSCAN_FULL
    entries = []
    method = None
    for vocab in grid["vocabs"]:
        for length in grid["lengths"]:
            e = {"vocab": vocab, "length": length, "full_logits_mib": grid["rows"] * length * vocab * 4 / 2**20}
            for path in ("poise", "full"):
                if path == "full" and e["full_logits_mib"] > args.memscan_max_gib * 1024:
                    e["full_growth_mib"] = e["full_s"] = None
                    continue
                spec = dict(spec_base, path=path, vocab=vocab, length=length, rows=grid["rows"],
                            hidden=grid["hidden"], layers=grid["layers"], completion_frac=0.5, chunk_size=1024)
                log(f"  memscan {path} vocab={vocab} length={length}")
                r = run_worker("memscan", spec, work, f"mem-{path}-{vocab}-{length}", args.timeout)
                e[f"{path}_growth_mib"], e[f"{path}_s"] = r["growth_mib"], r["seconds"]
                e[f"{path}_peak_mib"] = r["peak_mib"]
                method = r["peak_method"]
            entries.append(e)
    return {"rows": grid["rows"], "hidden": grid["hidden"], "layers": grid["layers"], "entries": entries,
            "method": f"{method} minus memory at the start of the pass (weight gradients preallocated)",
            "full_skipped_above_gib": args.memscan_max_gib}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("small", "smollm2"), default="small")
    ap.add_argument("--epoch-pairs", type=int,
                    help="pairs in the epoch every contender trains (a multiple of --batch; default per model: "
                    "small 96, smollm2 48, --quick 8)")
    ap.add_argument("--steps", type=int, help="measured steps per run (after the warm-up steps): sets the epoch to "
                    "(warmup + steps) x batch pairs, unless --epoch-pairs is given")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run, not measured")
    ap.add_argument("--batch", type=int, help="pairs per step (2 x batch rows)")
    ap.add_argument("--rounds", type=int, help="rounds of poise defaults, poise fastest, TRL, bare (each a fresh process, one epoch)")
    ap.add_argument("--balancer-steps", type=int, help="measured batches of each method in the balancer section")
    ap.add_argument("--balancer-reps", type=int, help="steps of each method on each batch in the balancer section")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                    help="mixed precision of poise fastest, TRL and the bare loop (poise defaults always runs "
                    "mixed_precision: auto); auto: what poise's auto resolves to here (bf16 on a GPU and on a CPU "
                    "with native bf16, POISE_CPU_BF16=0 forces fp32)")
    ap.add_argument("--matmul-n", type=int, help=f"size of the matmul peak measurement (default {MATMUL['n']}, "
                    "--quick 1024)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every worker; default 1 on a CPU (see README: on a shared machine "
                    "OpenMP threads that wait on a descheduled sibling make multi-threaded timings erratic), "
                    "torch's default on CUDA; 0 = torch's default")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, few steps: a smoke test")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--md", help="write the printed report to this Markdown file")
    ap.add_argument("--skip-contenders", action="store_true",
                    help="only the balancer section and/or the memory scan (no TRL needed)")
    ap.add_argument("--skip-balancers", action="store_true")
    ap.add_argument("--skip-memscan", action="store_true")
    ap.add_argument("--memscan-max-gib", type=float, default=1.0,
                    help="skip the full log-softmax when one (N, L, V) float32 tensor would exceed this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", help="keep the generated model, data and worker outputs here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    args = ap.parse_args(argv)
    args.preset = "tiny" if args.quick else args.model
    p = PRESETS[args.preset]
    for k in ("warmup", "batch", "rounds", "balancer_steps", "balancer_reps"):
        if getattr(args, k) is None:
            setattr(args, k, p[k])
    if args.epoch_pairs is None:
        args.epoch_pairs = (args.warmup + args.steps) * args.batch if args.steps else p["epoch_pairs"]
    if args.epoch_pairs % args.batch:
        ap.error(f"--epoch-pairs {args.epoch_pairs} is not a multiple of --batch {args.batch}")
    args.steps = args.epoch_pairs // args.batch - args.warmup
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (a step's time is measured from the end of the previous one)")
    if args.steps < 1:
        ap.error(f"the epoch ({args.epoch_pairs} pairs, {args.epoch_pairs // args.batch} steps) leaves no measured "
                 f"step after {args.warmup} warm-up steps")
    if args.matmul_n is None:
        args.matmul_n = 1024 if args.quick else MATMUL["n"]
    args.resolved_precision = resolve_precision(args)
    return args


def resolve_precision(args) -> str:
    """The mixed precision of poise fastest, TRL and bare: --precision, or what poise's auto chooses here."""
    if args.precision != "auto":
        return args.precision
    if args.device == "cuda":
        return "bf16"
    from poise.training.launch import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def matmul_peak(args, spec: dict, work: Path) -> dict:
    """_workers.run_matmul: on a CPU in this process (idle while the workers run, torch already imported), on
    the workers' thread count; on CUDA in a worker, so that this process holds no CUDA context."""
    import _workers
    import torch

    if args.device == "cuda":
        return run_worker("matmul", spec, work, "matmul", args.timeout)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _workers.run_matmul(spec)
    finally:
        torch.set_num_threads(threads)


def contender_results(args, spec: dict, work: Path) -> dict[str, list[dict]]:
    """Rounds of poise defaults, poise fastest, TRL, bare, each run a fresh process training one epoch."""
    results: dict[str, list[dict]] = {k: [] for k in CONTENDERS}
    for r in range(args.rounds):
        for name in CONTENDERS:
            log(f"round {r + 1}/{args.rounds}: {name} (one epoch, {spec['total_steps']} steps)")
            kind, variant = (name.split("-") + [None])[:2] if name.startswith("poise") else (name, None)
            results[name].append(run_worker(kind, dict(spec, variant=variant), work, f"{name}-{r}", args.timeout))
    return results


def base_result(args, built: dict) -> dict:
    spec = built["spec"]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "worker_threads": args.threads or "default",
        "config": {"model": args.model, "quick": args.quick, "device": args.device, "batch": args.batch,
                   "epoch_pairs": args.epoch_pairs, "precision": args.resolved_precision,
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed,
                   "balancer_steps": args.balancer_steps, "balancer_reps": args.balancer_reps,
                   "threads": args.threads, "max_length": spec["max_length"],
                   "max_prompt_length": spec["max_prompt_length"], "lr": spec["lr"], "beta": spec["beta"],
                   "sections": [x for x, skip in (("contenders", args.skip_contenders),
                                                  ("balancers", args.skip_balancers),
                                                  ("memscan", args.skip_memscan)) if not skip]},
        "info": built["info"],
        "balancer_overhead": {},
        "cpu_time": {} if args.device != "cpu" else {
            "note": "the same figures from each worker's CPU time (time.process_time) instead of wall time"},
        "raw": {},
    }


def _ratio(a, b) -> float:
    return a / b if a is not None and b else float("nan")


def assemble(args, built: dict, results: dict[str, list[dict]], matmul: dict | None = None) -> dict:
    info = built["info"]
    summary = summarize(results, info)
    tokens = verify_tokens(results)
    tokens["verdict"] = (
        f"identical non-pad token ids in every step for {', '.join(CONTENDERS)} "
        f"({sum(tokens['tokens_per_step'])} non-pad tokens per run, {sum(tokens['tokens_per_step'][args.warmup:])} "
        "in the measured steps)" if tokens["identical"] else
        f"MISMATCH: the contenders did not train on the same token ids; totals {tokens['per_contender_total']}")
    for k in CONTENDERS:
        first = results[k][0]
        summary[k].update({x: first.get(x) for x in ("options", "attn_implementation", "optimizer", "peak_method",
                                                     "pair_layout")})
        summary[k]["torch_threads"] = sorted({r["torch_threads"] for r in results[k]})
    d, nd, f, t, b = (summary[k] for k in CONTENDERS)
    peaks = {k: v["best_gflops"] for k, v in (matmul or {}).items() if isinstance(v, dict) and "best_gflops" in v}
    for c in (d, f):
        c["reference_ratio"] = _ratio(c.get("reference_pairs_per_s"), c.get("training_pairs_per_s"))
        peak = peaks.get("bf16" if c.get("mixed_precision") == "bf16" else "fp32")
        c["matmul_peak_gflops"] = peak if peak is not None else float("nan")
        c["matmul_fraction"] = _ratio(c.get("achieved_gflops"), peak)
    rounds = zip(results["poise-default"], results["poise-nodiag"])  # the same config but for diagnostics
    overhead = [(x["epoch_wall_s"] - y["epoch_wall_s"]) / x["epoch_wall_s"] for x, y in rounds
                if "epoch_wall_s" in x and "epoch_wall_s" in y]
    res = base_result(args, built)
    res.update({
        "tokens": tokens,
        # poise fastest (the keys of earlier results)
        "tokens_per_s_ratio_vs_trl": f["tokens_per_s"] / t["tokens_per_s"],
        "peak_mem_ratio_vs_trl": f["peak_train_mib"] / t["peak_train_mib"],
        "step_ratio_vs_bare": f["median_step_s"] / b["median_step_s"],
        # poise defaults
        "default_tokens_per_s_ratio_vs_trl": d["tokens_per_s"] / t["tokens_per_s"],
        "default_peak_mem_ratio_vs_trl": d["peak_train_mib"] / t["peak_train_mib"],
        "default_step_ratio_vs_bare": d["median_step_s"] / b["median_step_s"],
        # whole process, one epoch
        "epoch_wall_ratio_vs_trl": _ratio(d.get("epoch_wall_s"), t.get("epoch_wall_s")),
        "fast_epoch_wall_ratio_vs_trl": _ratio(f.get("epoch_wall_s"), t.get("epoch_wall_s")),
        "default_process_peak_mem_ratio_vs_trl": d["peak_process_mib"] / t["peak_process_mib"],
        "process_peak_mem_ratio_vs_trl": f["peak_process_mib"] / t["peak_process_mib"],
        "diagnostics_overhead": statistics.median(overhead) if overhead else float("nan"),
        "diagnostics_peak_mem_overhead": d["peak_process_mib"] / nd["peak_process_mib"] - 1,
        "diagnostics_parts": {
            "probes_s": d.get("probe_s"), "probes": d.get("probes"),
            "probes_share_of_epoch": _ratio(d.get("probe_s"), d.get("epoch_wall_s")),
            "every_step_share": 1 - nd["median_step_s"] / d["median_step_s"]},
        "padding_fraction": f["padding_fraction"],
        "padding": {k: summary[k]["padding_fraction"] for k in CONTENDERS},
        "reference_pairs_per_s_ratio_vs_training": f["reference_ratio"],
        "default_reference_pairs_per_s_ratio_vs_training": d["reference_ratio"],
        "matmul_peak_gflops": f["matmul_peak_gflops"],
        "matmul_peaks_gflops": peaks,
        "step_matmul_fraction": f["matmul_fraction"],
        "default_step_matmul_fraction": d["matmul_fraction"],
    })
    res["memory_disk"] = memory_disk(info, summary)
    res["worker_threads"] = f["torch_threads"]
    if args.device == "cpu":
        res["cpu_time"].update({
            "tokens_per_s_ratio_vs_trl": f["tokens_per_cpu_s"] / t["tokens_per_cpu_s"],
            "default_tokens_per_s_ratio_vs_trl": d["tokens_per_cpu_s"] / t["tokens_per_cpu_s"],
            "step_ratio_vs_bare": f["median_cpu_step_s"] / b["median_cpu_step_s"],
            "default_step_ratio_vs_bare": d["median_cpu_step_s"] / b["median_cpu_step_s"]})
    summary["poise"] = summary["poise-fast"]  # the key of earlier results: poise's fastest settings
    res["raw"] = {"contenders": summary, "matmul": matmul,
                  "runs": {k: [{x: r[x] for x in r if x not in ("idx",)} for r in v] for k, v in results.items()}}
    return res


def memory_disk(info: dict, summary: dict) -> dict:
    """A best-effort split of each contender's peak process memory and of its disk use: fp32 weights,
    their gradients and AdamW's two moments from the parameter count (4 bytes each), the runtime (RSS after
    the imports), activations and the rest (what remains of the peak); on disk the measured sizes of the
    checkpoints, the final model, the reference cache and the rest of the run folder."""
    w = info["parameters"] * 4 / 2**20
    out = {"weights_mib": w, "reference_sums_mib": info["pairs"] * 2 * 4 / 2**20, "contenders": {}}
    for k in CONTENDERS:
        c = summary[k]
        runtime = c.get("rss_after_imports_mib") or 0.0
        rest = c["peak_process_mib"] - runtime - 4 * w
        parts = {"runtime (torch, libraries)": runtime, "weights": w, "gradients": w, "AdamW state": 2 * w,
                 "activations and the rest": rest}
        disk = c.get("disk") or {}
        dparts = {"checkpoints": disk.get("checkpoints_mib", 0.0), "final model": disk.get("final_model_mib", 0.0),
                  "reference cache": disk.get("reference_cache_mib", 0.0), "other": disk.get("other_mib", 0.0)}
        out["contenders"][k] = {
            "peak_process_mib": c["peak_process_mib"], "runtime_mib": runtime, "rest_mib": rest,
            "memory_dominated_by": max(parts, key=parts.get),
            "checkpoints_mib": dparts["checkpoints"], "checkpoints": disk.get("checkpoints", 0),
            "final_model_mib": dparts["final model"], "reference_cache_mib": dparts["reference cache"],
            "other_mib": dparts["other"], "disk_mib": disk.get("total_mib", 0.0),
            "disk_dominated_by": max(dparts, key=dparts.get)}
    return out


def add_balancers(args, res: dict, spec: dict, work: Path) -> None:
    log("balancers: dpo, adadpo, gate-dpo, balanced-dpo interleaved")
    b = run_worker("balancers", spec, work, "balancers", args.timeout * 2)
    bs = balancer_summary(b)
    res["raw"]["balancers"] = bs
    res["raw"]["balancer_times"] = b
    res["balancer_overhead"] = {m: v["median_paired_ratio"] - 1 for m, v in bs.items() if m != "dpo"}
    if args.device == "cpu":
        bc = balancer_summary(b, "cpu_times")
        res["raw"]["balancers_cpu"] = bc
        res["cpu_time"]["balancer_overhead"] = {m: v["median_paired_ratio"] - 1 for m, v in bc.items()
                                                if m != "dpo"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="poise-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log(f"building the model and data in {work}")
    built = build_assets(args, work)
    if args.skip_contenders:
        res = base_result(args, built)
    else:
        log(f"matmul peak: torch.mm {args.matmul_n}x{args.matmul_n}")
        matmul = matmul_peak(args, built["spec"], work)
        res = assemble(args, built, contender_results(args, built["spec"], work), matmul)
    if not args.skip_balancers:
        add_balancers(args, res, built["spec"], work)
    if not args.skip_memscan:
        log("memory scan of the log-prob engine")
        res["mem_scan"] = memscan(args, work, {"device": args.device, "threads": args.threads,
                                                "work_dir": str(work)})
    res["targets"] = targets(res, args.model)
    res["wall_s"] = time.perf_counter() - t_start
    text = report(res)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, res)
    if args.md:
        Path(args.md).write_text(f"```text\n{text}\n```\n")
    return res


if __name__ == "__main__":
    random.seed(0)
    main()
