"""poise vs TRL's DPOTrainer vs a bare PyTorch loop: throughput, step time and peak memory, in one command.

    python benchmarks/bench.py --model small --json benchmarks/results/cpu-small.json
    python benchmarks/bench.py --model smollm2 --json benchmarks/results/cpu-smollm2.json
    python benchmarks/bench.py --quick            # a smoke configuration (tests/test_bench_smoke.py)

The three contenders train the same model from the same folder, on the same pairs in the same batches (poise's
length-grouped order, given to TRL and the bare loop as a sequential order), with the same batch size,
sequence lengths and number of steps, each in a fresh process, alternating poise, TRL, bare, poise, TRL,
bare, ... Only training steps are timed; loading, tokenization and the reference precompute are not. The
token ids each contender actually trained on are hashed per step and compared. Then poise's balancers are
timed against plain DPO (step-interleaved in one process), and poise's log-prob engine is compared with a
full log-softmax for peak memory over vocabulary sizes and lengths (one fresh process per configuration).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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

CONTENDERS = ("poise", "trl", "bare")
TARGETS = {"tokens_per_s_vs_trl": 1.5, "peak_mem_vs_trl_smollm2": 0.8, "step_vs_bare": 1.15,
           "balancer_overhead": 0.03}

# Per model: data lengths (in words; token lengths are measured and printed), limits, batch and steps.
PRESETS = {
    "small": dict(batch=4, steps=6, warmup=2, rounds=2, balancer_steps=8, balancer_reps=3, prompt_words=(45, 170),
                  completion_words=(20, 170), max_length=512, max_prompt_length=256, lr=1e-5),
    "smollm2": dict(batch=4, steps=3, warmup=1, rounds=2, balancer_steps=4, balancer_reps=3, prompt_words=(20, 80),
                    completion_words=(15, 110), max_length=320, max_prompt_length=128, lr=1e-6),
    "tiny": dict(batch=2, steps=2, warmup=1, rounds=1, balancer_steps=3, balancer_reps=1, prompt_words=(4, 12),
                 completion_words=(3, 10), max_length=64, max_prompt_length=32, lr=1e-4),
}
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
    total = args.warmup + args.steps
    n_pairs = total * args.batch
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
    sched = Schedule([q.length for q in pairs], args.batch, args.seed, 1.0, total)
    order = [i for k in range(total) for i in sched.batch(k)]
    trl_file = work / "train_in_batch_order.jsonl"
    trl_file.write_text("".join(lines[keep[i]] + "\n" for i in order))
    pairs_file = work / "pairs_in_batch_order.json"
    pairs_file.write_text(json.dumps([[list(pairs[i].prompt_ids), list(pairs[i].chosen_ids),
                                       list(pairs[i].rejected_ids)] for i in order]))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    n_params = _count_params(folder)
    lens = [len(q.prompt_ids) + max(len(q.chosen_ids), len(q.rejected_ids)) for q in pairs]
    spec = {
        "device": args.device, "model": args.model, "model_dir": str(folder), "train_file": str(train_file),
        "trl_file": str(trl_file), "pairs_file": str(pairs_file), "batch": args.batch, "total_steps": total,
        "warmup": args.warmup, "balancer_steps": balancer_total, "balancer_reps": args.balancer_reps, "lr": p["lr"], "beta": 0.1,
        "seed": args.seed, "max_length": p["max_length"], "max_prompt_length": p["max_prompt_length"],
        "work_dir": str(work), "threads": args.threads, "pad_token_id": tok.pad_token_id,
    }
    info = {
        "model": args.model, "architecture": config.model_type, "parameters": n_params,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "pairs": n_pairs, "prompt_tokens": _span([len(q.prompt_ids) for q in pairs]),
        "completion_tokens": _span([len(q.chosen_ids) for q in pairs] + [len(q.rejected_ids) for q in pairs]),
        "longest_row_tokens": _span(lens),
    }
    return {"spec": spec, "info": info}


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            n += sum(_prod(s.get_slice(k).get_shape()) for k in s.keys())
    return n


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
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "_workers.py"), kind, str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} ({tag}) failed:\n{proc.stderr[-4000:]}")
    out = read_json(out_path)
    out["wall_s"] = time.perf_counter() - t0
    return out


def measured(res: dict, clock: str = "ends") -> tuple[list[float], list[int]]:
    """(step times, non-pad tokens) of the measured steps: step k's time is end(k) - end(k-1), k >= warmup;
    clock "ends" is wall time, "cpu_ends" the process's CPU time."""
    ends, w = res[clock], res["warmup"]
    return [ends[k] - ends[k - 1] for k in range(w, len(ends))], res["tokens_per_step"][w:]


def summarize(results: dict[str, list[dict]]) -> dict:
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
        }
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def verify_tokens(results: dict[str, list[dict]]) -> dict:
    ref = results["poise"][0]
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


def contenders_report(res: dict) -> list[str]:
    s, cfg = res["raw"]["contenders"], res["config"]
    mem_unit = "MiB (CUDA max allocated)" if cfg["device"] == "cuda" else "MiB (RSS)"
    out = [f"batch {cfg['batch']} pairs ({2 * cfg['batch']} rows), {cfg['steps']} measured steps after "
           f"{cfg['warmup']} warm-up steps, {cfg['rounds']} rounds alternating poise, TRL, bare (fresh process each)",
           "timed: training steps only (end of step k-1 to end of step k: collation, forward, backward, clip, "
           "optimizer, scheduler, per-step bookkeeping); model loading, tokenization and the reference "
           "precompute are excluded for all three",
           f"tokens: {res['tokens']['verdict']}",
           "optimizers: " + ", ".join(f"{k} {s[k].get('optimizer')}" for k in ("poise", "trl", "bare"))
           + f"; poise's pair layout: {s['poise'].get('pair_layout')} (prompt once per pair when shared)", ""]
    cpu = cfg["device"] == "cpu"
    rows = []
    for k, name in (("poise", "poise (dpo)"), ("trl", "TRL DPOTrainer"), ("bare", "bare PyTorch")):
        c = s[k]
        rows.append([name, f"{c['tokens_per_s']:.0f}", f"{c['median_step_s']:.3f}",
                     f"{c['p10_step_s']:.3f}-{c['p90_step_s']:.3f}",
                     f"{c['tokens_per_cpu_s']:.0f}" if cpu else "-", f"{c['median_cpu_step_s']:.3f}" if cpu else "-",
                     f"{c['peak_train_mib']:.0f}", f"{c['mem_at_train_start_mib']:.0f}",
                     f"{c['peak_process_mib']:.0f}" if cpu else "-",
                     " ".join(f"{x:.0f}" for x in c["per_round_tokens_per_s"])])
    out.append(fmt_table(["contender", "non-pad tok/s", "median step s", "p10-p90 s", "tok/CPU-s",
                          "median CPU s", f"peak train {mem_unit}", "at train start", "peak process",
                          "tok/s per round"], rows))
    r, c = res, res.get("cpu_time", {})
    out += ["", "ratios                  wall     CPU time",
            f"poise/TRL tokens/s      {r['tokens_per_s_ratio_vs_trl']:.3f}    {c.get('tokens_per_s_ratio_vs_trl', float('nan')):.3f}"
            "   (> 1: poise is faster)",
            f"poise/bare median step  {r['step_ratio_vs_bare']:.3f}    {c.get('step_ratio_vs_bare', float('nan')):.3f}"
            "   (1 = the floor)",
            f"poise/TRL median step   {s['poise']['median_step_s'] / s['trl']['median_step_s']:.3f}    "
            f"{s['poise']['median_cpu_step_s'] / s['trl']['median_cpu_step_s']:.3f}",
            f"poise/TRL peak memory   {r['peak_mem_ratio_vs_trl']:.3f}             (peak during training; < 1: "
            "poise uses less)", ""]
    return out


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
    return out


def targets(res: dict, model: str) -> list[dict]:
    t = []
    cpu = res.get("cpu_time") or {}

    def add(name, value, limit, op, applies=True, cpu_value=None):
        def ok(x):
            return x >= limit if op == ">=" else x <= limit

        verdict = ("PASS" if ok(value) else "FAIL") if applies else "n/a"
        detail = f"{value:.3f} {op} {limit}"
        entry = {"name": name, "value": value, "limit": limit, "verdict": verdict}
        if cpu_value is not None:
            entry["cpu_value"] = cpu_value
            entry["cpu_verdict"] = ("PASS" if ok(cpu_value) else "FAIL") if applies else "n/a"
            detail += f"  [CPU time: {entry['cpu_verdict']} {cpu_value:.3f}]"
        entry["detail"] = detail + ("" if applies else " (the target is for smollm2)")
        t.append(entry)

    if "tokens_per_s_ratio_vs_trl" in res:
        add("tokens/s >= 1.5 x TRL", res["tokens_per_s_ratio_vs_trl"], TARGETS["tokens_per_s_vs_trl"], ">=",
            cpu_value=cpu.get("tokens_per_s_ratio_vs_trl"))
        add("peak memory <= 0.8 x TRL on smollm2", res["peak_mem_ratio_vs_trl"],
            TARGETS["peak_mem_vs_trl_smollm2"], "<=", applies=model == "smollm2")
        add("step time <= 1.15 x bare (reference precomputed)", res["step_ratio_vs_bare"], TARGETS["step_vs_bare"],
            "<=", cpu_value=cpu.get("step_ratio_vs_bare"))
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
    ap.add_argument("--steps", type=int, help="measured steps per run (after the warm-up steps)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run, not measured")
    ap.add_argument("--batch", type=int, help="pairs per step (2 x batch rows)")
    ap.add_argument("--rounds", type=int, help="rounds of poise, TRL, bare (each a fresh process)")
    ap.add_argument("--balancer-steps", type=int, help="measured batches of each method in the balancer section")
    ap.add_argument("--balancer-reps", type=int, help="steps of each method on each batch in the balancer section")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
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
    for k in ("steps", "warmup", "batch", "rounds", "balancer_steps", "balancer_reps"):
        if getattr(args, k) is None:
            setattr(args, k, p[k])
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (a step's time is measured from the end of the previous one)")
    return args


def contender_results(args, spec: dict, work: Path) -> dict[str, list[dict]]:
    """Rounds of poise, TRL, bare, each run a fresh process."""
    results: dict[str, list[dict]] = {k: [] for k in CONTENDERS}
    for r in range(args.rounds):
        for kind in CONTENDERS:
            log(f"round {r + 1}/{args.rounds}: {kind}")
            results[kind].append(run_worker(kind, spec, work, f"{kind}-{r}", args.timeout))
    return results


def base_result(args, built: dict) -> dict:
    spec = built["spec"]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "worker_threads": args.threads or "default",
        "config": {"model": args.model, "quick": args.quick, "device": args.device, "batch": args.batch,
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


def assemble(args, built: dict, results: dict[str, list[dict]]) -> dict:
    summary = summarize(results)
    tokens = verify_tokens(results)
    tokens["verdict"] = (
        f"identical non-pad token ids in every step for poise, TRL and bare "
        f"({sum(tokens['tokens_per_step'])} non-pad tokens per run, {sum(tokens['tokens_per_step'][args.warmup:])} "
        "in the measured steps)" if tokens["identical"] else
        f"MISMATCH: the contenders did not train on the same token ids; totals {tokens['per_contender_total']}")
    for k in CONTENDERS:
        first = results[k][0]
        summary[k].update({x: first.get(x) for x in ("options", "attn_implementation", "optimizer", "peak_method", "pair_layout")})
        summary[k]["torch_threads"] = sorted({r["torch_threads"] for r in results[k]})
    res = base_result(args, built)
    res.update({
        "tokens": tokens,
        "tokens_per_s_ratio_vs_trl": summary["poise"]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
        "peak_mem_ratio_vs_trl": summary["poise"]["peak_train_mib"] / summary["trl"]["peak_train_mib"],
        "step_ratio_vs_bare": summary["poise"]["median_step_s"] / summary["bare"]["median_step_s"],
    })
    res["worker_threads"] = summary["poise"]["torch_threads"]
    if args.device == "cpu":
        res["cpu_time"].update({
            "tokens_per_s_ratio_vs_trl": summary["poise"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"],
            "step_ratio_vs_bare": summary["poise"]["median_cpu_step_s"] / summary["bare"]["median_cpu_step_s"]})
    res["raw"] = {"contenders": summary,
                  "runs": {k: [{x: r[x] for x in r if x not in ("idx",)} for r in v] for k, v in results.items()}}
    return res


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
        res = assemble(args, built, contender_results(args, built["spec"], work))
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
