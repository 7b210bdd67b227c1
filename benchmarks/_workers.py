"""One benchmark measurement per process: ``python benchmarks/_workers.py KIND SPEC.json OUT.json``.

KIND is ``poise``, ``trl`` or ``bare`` (one training run of a contender: one epoch over the benchmark's
pairs, from process start to the saved model; ``poise`` in the variant ``spec["variant"]``: ``default``, a
user's config with poise's defaults, or ``fast``, the same with ``diagnostics: false``), ``balancers``
(poise's plain DPO and its three balanced presets, step-interleaved in one process), ``memscan`` (one
forward + backward of the log-prob engine or of a full log-softmax) or ``matmul`` (this machine's matmul
GFLOP/s). Each run is a fresh process, so that its memory figures are its own. Two clocks: each training
step's time, the wall time from the end of the previous step to the end of this one (batch collation,
forward, backward, clipping, optimizer and scheduler, and the per-step bookkeeping of the trainer), for
the steady-state figures; and the Unix time of the first step's start, the last step's end and the end of
the run (model saved), from which bench.py, which knows when it launched the process, gets the epoch's
whole wall time and its parts.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakMemory, cpu_now, now, process_peak_mib, read_json, rows_digest, write_json  # noqa: E402


def _threads(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
        torch.set_num_interop_threads(int(spec["threads"]))


def _finish(rec: dict, batches: list, spec: dict, peak: PeakMemory) -> dict:
    """Digest and count the recorded batches (after the timed region)."""
    import torch

    digests = [rows_digest(ids, mask) for ids, mask in batches]
    if "computed_per_step" not in rec:  # TRL and bare: the rows they computed, in two-row layout
        rec["computed_per_step"] = [int(ids.numel()) for ids, _ in batches]
        rec["pad_per_step"] = [int(ids.numel() - mask.sum()) for ids, mask in batches]
    rec.update({
        "torch_threads": torch.get_num_threads(),
        "row_digests": [d for d, _ in digests],
        "tokens_per_step": [n for _, n in digests],
        "peak_train_mib": rec.get("peak_train_mib", peak.peak_mib()),
        "mem_at_train_start_mib": peak.start_mib,
        "peak_method": peak.method(),
        "peak_process_mib": process_peak_mib(),
        "warmup": spec["warmup"],
    })
    return rec


def _rss_mib() -> float | None:
    from _common import _status_mib

    return _status_mib("VmRSS")


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def _disk(run_dir: Path, cache_dir: Path | None = None) -> dict:
    """MiB on disk after the run: checkpoints, the final model, the reference cache, the rest."""
    out = {"checkpoints_mib": 0.0, "checkpoints": 0, "final_model_mib": 0.0, "other_mib": 0.0}
    for e in sorted(run_dir.iterdir()) if run_dir.exists() else []:
        size = _dir_mib(e) if e.is_dir() else e.stat().st_size / 2**20
        if e.name.startswith("checkpoint"):
            out["checkpoints_mib"] += size
            out["checkpoints"] += 1
        elif e.name == "model":
            out["final_model_mib"] += size
        else:
            out["other_mib"] += size
    out["reference_cache_mib"] = _dir_mib(cache_dir) if cache_dir is not None else 0.0
    out["total_mib"] = out["checkpoints_mib"] + out["final_model_mib"] + out["other_mib"] + out["reference_cache_mib"]
    return out


def _poise_cfg(spec: dict, method: str, run_dir: Path, max_steps: int | None, variant: str = "fast"):
    """``default``: a user's config: the keys a user sets (model, data, output, batch, lengths, steps,
    learning rate, seed, the device) and poise's defaults for everything else (diagnostics on with its
    diagnostics_steps and diagnostics_budget, mixed_precision auto, pair_layout auto, precompute_reference);
    cache_dir is a fresh folder, as on a first run. ``nodiag``: the defaults with ``diagnostics: false`` (what
    the diagnostics cost is measured against). ``fast``: ``diagnostics: false``, ``gradient_checkpointing:
    false`` and mixed_precision set to what auto resolves to on this machine (or --precision): the settings
    that make a run of this length faster (save_steps' checkpoints fire on step 100 and the epochs are
    shorter; a metrics line per step costs microseconds)."""
    from poise.training.config import from_dict

    raw = {
        "model": spec["model_dir"], "train_file": spec["train_file"], "output_dir": str(run_dir),
        "cache_dir": str(run_dir.parent / "cache"), "batch_size": spec["batch"],
        "micro_batch_size": spec["batch"], "learning_rate": spec["lr"], "max_length": spec["max_length"],
        "max_prompt_length": spec["max_prompt_length"], "seed": spec["seed"], "cpu": spec["device"] == "cpu",
    }
    if max_steps is not None:
        raw["max_steps"] = max_steps
    if method != "dpo":
        raw["method"] = method
    if variant == "nodiag":
        raw["diagnostics"] = False
    elif variant != "default":
        raw.update({"diagnostics": False, "gradient_checkpointing": False, "mixed_precision": spec["precision"]})
    return from_dict(raw)


def _layout_counts(b, pairs) -> dict:
    """Positions the step computes in poise's layout (rows x padded length), pad positions among them,
    completion tokens scored by the output head and sum over rows of length^2 (attention)."""
    ids = b.input_ids
    am = getattr(b, "attention_mask", None)
    if am is not None and am.shape == ids.shape:
        real = int(am.sum())
    elif getattr(b, "segments", None) is not None:
        real = int((b.segments >= 0).sum())
    else:
        real = int(ids.numel())
    rows, length = ids.shape
    return {"computed": int(ids.numel()), "pad": int(ids.numel()) - real,
            "scored": sum(len(q.chosen_ids) + len(q.rejected_ids) for q in pairs), "attn_sq": rows * length**2}


def run_poise(spec: dict) -> dict:
    """poise.training.loop.train(cfg) with plain DPO for one epoch, to the saved model; step ends recorded by
    wrapping poise.training.loop.train_step, the reference pass by wrapping
    poise.model.reference.compute_reference_sums, the probes by wrapping RunState.probe_metrics."""
    import poise.data
    import poise.model.reference as reference
    import poise.training.build as build
    import poise.training.loop as trainer
    import poise.training.tasks
    from poise.training.launch import resolve_mixed_precision

    rss_imports = _rss_mib()
    device, total, variant = spec["device"], spec["total_steps"], spec.get("variant", "fast")
    rec = {"kind": "poise", "variant": variant, "ends": [], "cpu_ends": [], "inner": [], "idx": [],
           "layout_steps": [], "probe_s": [], "reference": {"seconds": 0.0, "pairs": 0, "calls": 0},
           "rss_after_imports_mib": rss_imports}
    batches: list = []
    peak = PeakMemory(device)
    state = {"recording": False}
    orig_step, orig_collate = trainer.train_step, poise.training.tasks.PreferenceTask.collate
    orig_ref, orig_probe = reference.compute_reference_sums, build.RunState.probe_metrics

    def collate(self, idx):
        b = orig_collate(self, idx)
        if state["recording"]:
            # tokens are counted (and compared with TRL's and bare's) in the two-row layout, whatever layout
            # poise trains in: with the shared prompt prefix the saving shows as time, not as fewer tokens
            pairs = [self.pairs[i] for i in idx]
            rows = poise.data.collate_pairs(pairs, self.pad_token_id)
            batches.append((rows.input_ids, rows.attention_mask))
            rec["layout_steps"].append(_layout_counts(b, pairs))  # what poise's layout computes
        return b

    def compute_reference_sums(model, pairs, **kw):
        t0 = now(device)
        out = orig_ref(model, pairs, **kw)
        r = rec["reference"]
        r["seconds"] += now(device) - t0
        r["pairs"] += len(pairs)
        r["calls"] += 1
        return out

    def probe_metrics(self):
        t0 = now(device)
        out = orig_probe(self)
        if self.probe is not None:
            rec["probe_s"].append(now(device) - t0)
        return out

    def train_step(s, idx):
        if not rec["ends"]:
            gc.collect()
            peak.start()
            rec["start"] = now(device)
            rec["unix_first_step"] = time.time()
            rec["attn_implementation"] = s.unwrapped_model().config._attn_implementation
            rec["pair_layout"] = s.task.layout
            rec["mixed_precision"] = resolve_mixed_precision(s.cfg)
            opt = s.optimizer.optimizer if hasattr(s.optimizer, 'optimizer') else s.optimizer
            rec["optimizer"] = f"torch.optim.{type(opt).__name__} (fused={opt.defaults.get('fused')})"
        t0 = now(device)
        state["recording"] = True
        out = orig_step(s, idx)
        state["recording"] = False
        t1 = now(device)
        rec["cpu_ends"].append(cpu_now())
        rec["inner"].append(t1 - t0)
        rec["ends"].append(t1)
        rec["unix_last_step"] = time.time()
        rec["peak_train_mib"] = peak.peak_mib()  # the training window: first step to the last step's end
        rec["idx"].append(list(idx))
        return out

    trainer.train_step = train_step
    poise.training.tasks.PreferenceTask.collate = collate
    reference.compute_reference_sums = compute_reference_sums
    build.RunState.probe_metrics = probe_metrics
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec["work_dir"]) as tmp:
        run_dir = Path(tmp) / "run"
        cfg = _poise_cfg(spec, "dpo", run_dir, None, variant)
        rec["options"] = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "train_file", "output_dir",
                                                                             "cache_dir")}
        trainer.train(cfg)
        rec["unix_done"] = time.time()  # the model saved: what a user waits for
        rec["disk"] = _disk(run_dir, Path(tmp) / "cache")
    if len(rec["ends"]) != total:
        raise RuntimeError(f"poise ran {len(rec['ends'])} steps in the epoch, expected {total}")
    lay = rec["layout_steps"]
    rec["computed_per_step"] = [x["computed"] for x in lay]
    rec["pad_per_step"] = [x["pad"] for x in lay]
    rec["setup_s"] = rec["start"] - t_setup
    return _finish(rec, batches, spec, peak)


# ----------------------------------------------------------------------------------------------------- TRL


def trl_options(spec: dict, out_dir: str) -> dict:
    """DPOConfig keywords: TRL's fastest supported settings for this run (reported as they are); bf16
    autocast over fp32 weights where poise's fastest settings use it (a GPU, a CPU with native bf16)."""
    cuda = spec["device"] == "cuda"
    return {
        "output_dir": out_dir,
        "use_cpu": not cuda,
        "bf16": cuda or spec["precision"] == "bf16",
        "fp16": False,
        "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["total_steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "cosine",
        "beta": spec["beta"],
        "loss_type": ["sigmoid"],
        "max_length": spec["max_length"],
        "truncation_mode": "keep_start",
        "pad_to_multiple_of": None,  # pad each batch to its longest row only
        "padding_free": False,  # TRL 1.16: "temporarily unavailable", it would warn and pad anyway
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 2 * spec["batch"],  # as poise (2 x micro_batch_size); untimed either way
        "gradient_checkpointing": False,  # DPOConfig defaults to True, which recomputes the forward
        "disable_dropout": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "train_sampling_strategy": "sequential",  # the data file is already in poise's batch order
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": spec["seed"],
        "max_grad_norm": 1.0,
        "model_init_kwargs": {"dtype": "float32"},
    }


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer.train() for one epoch, then save_model (what a user runs); step boundaries from a
    TrainerCallback."""
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(spec["work_dir"], "hf-datasets"))
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rss_imports = _rss_mib()
    device = spec["device"]
    rec = {"kind": "trl", "ends": [], "cpu_ends": [], "inner": [], "rss_after_imports_mib": rss_imports}
    batches: list = []
    peak = PeakMemory(device)

    class Recorder(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append((inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()))
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            gc.collect()
            peak.start()
            rec["start"] = now(device)
            rec["unix_first_step"] = time.time()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = now(device)

        def on_step_end(self, args, state, control, **kw):
            t1 = now(device)
            rec["cpu_ends"].append(cpu_now())
            rec["inner"].append(t1 - self.t0)
            rec["ends"].append(t1)
            rec["unix_last_step"] = time.time()
            rec["peak_train_mib"] = peak.peak_mib()

    import json

    rows = [json.loads(line) for line in open(spec["trl_file"])]
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec["work_dir"]) as tmp:
        opts = trl_options(spec, tmp)
        args = DPOConfig(**opts)
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
        trainer = Recorder(model=spec["model_dir"], args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=tok, callbacks=[Clock()])
        rec["options"] = {k: v for k, v in opts.items() if k != "output_dir"}
        rec["options"]["optim"] = str(args.optim.value if hasattr(args.optim, "value") else args.optim)
        rec["attn_implementation"] = trainer.model.config._attn_implementation
        rec["optimizer"] = rec["options"]["optim"]
        rec["mixed_precision"] = "bf16" if opts["bf16"] else "no"
        trainer.train()
        trainer.save_model(os.path.join(tmp, "model"))
        rec["unix_done"] = time.time()
        rec["disk"] = _disk(Path(tmp))
    rec["setup_s"] = rec["start"] - t_setup
    return _finish(rec, batches, spec, peak)


# ----------------------------------------------------------------------------------------------------- bare


def bare_batches(spec: dict):
    """(input_ids, attention_mask, completion_mask) per step: prompt+chosen rows then prompt+rejected rows,
    right-padded to the longest row, from the pairs in poise's batch order."""
    import torch

    pairs = read_json(spec["pairs_file"])
    pad = spec["pad_token_id"]
    out = []
    b = spec["batch"]
    for k in range(spec["total_steps"]):
        group = pairs[k * b:(k + 1) * b]
        rows = [(p, c) for p, c, _ in group] + [(p, r) for p, _, r in group]
        length = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        am = torch.zeros((len(rows), length), dtype=torch.long)
        cm = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            am[i, :len(p) + len(c)] = 1
            cm[i, len(p):len(p) + len(c)] = True
        out.append((ids, am, cm))
    return out


def run_bare(spec: dict) -> dict:
    """The floor: forward, full logits -> log_softmax -> gather, DPO loss on precomputed reference sums,
    backward, fused AdamW (torch.optim.AdamW(fused=True), as poise and TRL's adamw_torch_fused build it). No
    clipping, no scheduler. One epoch, then save_pretrained. bf16 autocast where poise's fastest settings
    use it."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    rss_imports = _rss_mib()
    device, beta, b = spec["device"], spec["beta"], spec["batch"]
    rec = {"kind": "bare", "ends": [], "cpu_ends": [], "inner": [], "rss_after_imports_mib": rss_imports}
    peak = PeakMemory(device)
    t_setup = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device)
    model.config.use_cache = False
    batches = bare_batches(spec)
    bf16 = device == "cuda" or spec["precision"] == "bf16"
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    rec["mixed_precision"] = "bf16" if bf16 else "no"

    def seq_logps(ids, am, cm):
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * cm[:, 1:]).sum(-1)

    model.eval()
    refs = []
    with torch.no_grad(), amp:
        for ids, am, cm in batches:  # the reference = the initial policy, precomputed (untimed)
            refs.append(seq_logps(ids.to(device), am.to(device), cm.to(device)).float())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], fused=True)
    rec["attn_implementation"] = model.config._attn_implementation
    rec["optimizer"] = "torch.optim.AdamW (fused)"
    rec["options"] = {"logps": "full logits -> float32 log_softmax -> gather", "grad_clip": None,
                      "scheduler": None, "optimizer": "torch.optim.AdamW fused", "autocast": rec["mixed_precision"]}
    gc.collect()
    peak.start()
    rec["start"] = now(device)
    rec["unix_first_step"] = time.time()
    for (ids, am, cm), ref in zip(batches, refs):
        t0 = now(device)
        ids, am, cm = ids.to(device), am.to(device), cm.to(device)
        with amp:
            s = seq_logps(ids, am, cm)
        margin = (s[:b] - ref[:b]) - (s[b:] - ref[b:])
        loss = -F.logsigmoid(beta * margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1 = now(device)
        rec["cpu_ends"].append(cpu_now())
        rec["inner"].append(t1 - t0)
        rec["ends"].append(t1)
    rec["unix_last_step"] = time.time()
    rec["peak_train_mib"] = peak.peak_mib()
    with tempfile.TemporaryDirectory(dir=spec["work_dir"]) as tmp:
        model.save_pretrained(Path(tmp) / "model")
        rec["unix_done"] = time.time()
        rec["disk"] = _disk(Path(tmp))
    rec["setup_s"] = rec["start"] - t_setup
    return _finish(rec, [(ids, am) for ids, am, _ in batches], spec, peak)


# ----------------------------------------------------------------------------------------------- balancers

BALANCER_METHODS = ("dpo", "adadpo", "gate-dpo", "balanced-dpo")


def run_balancers(spec: dict) -> dict:
    """poise's train_step for plain DPO and each balanced preset, on the same batches, interleaved step by
    step (the order rotates every step); each batch is stepped ``balancer_reps`` times by every method.

    One model, one optimizer and one task serve all four methods: before each step the task's objective
    (and the per-token statistics the engine computes for it) is swapped. Four separate 135M-parameter
    models stepped in turn made the same method on the same batch vary by 5-15% (caches, memory), more
    than the effect measured. The weights move a little between steps, which changes no timing; gate-dpo's
    threshold is calibrated before (untimed)."""
    import torch

    import poise.training.loop as trainer
    from poise.training.build import build_run

    device, total, reps = spec["device"], spec["balancer_steps"], spec.get("balancer_reps", 1)
    with tempfile.TemporaryDirectory(dir=spec["work_dir"]) as tmp:
        cfg = _poise_cfg(spec, "dpo", Path(tmp) / "run", total * reps * len(BALANCER_METHODS))
        s = build_run(cfg)
        sched = s.schedule
        engine = s.accelerator.unwrap_model(s.module)
        objectives, states = {}, {}
        for m in BALANCER_METHODS:
            s.task.objective = objectives[m] = _poise_cfg(spec, m, Path(tmp) / m, 1).build_objective()
            s.state = s.task.init_state()
            trainer.calibrate(s)
            states[m] = s.state
        times = {m: [[] for _ in range(total)] for m in BALANCER_METHODS}
        cpu = {m: [[] for _ in range(total)] for m in BALANCER_METHODS}
        tokens = []
        methods = list(BALANCER_METHODS)
        turn = 0
        for k in range(total):
            batch = sched.batch(k)
            tokens.append(s.task.real_tokens(batch))
            for _ in range(reps):
                order = methods[turn % len(methods):] + methods[:turn % len(methods)]
                turn += 1
                for m in order:
                    s.task.objective, s.state = objectives[m], states[m]
                    engine.stats = tuple(sorted(objectives[m].needs_stats))
                    t0, c0 = now(device), cpu_now()
                    out = trainer.train_step(s, batch)
                    times[m][k].append(now(device) - t0)
                    cpu[m][k].append(cpu_now() - c0)
                    if out.get("nonfinite"):
                        raise RuntimeError(f"{m}: non-finite step {k}")
        del s, engine
        gc.collect()
    return {"kind": "balancers", "times": times, "cpu_times": cpu, "tokens_per_step": tokens,
            "warmup": spec["warmup"], "reps": reps, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------- memscan


def run_memscan(spec: dict) -> dict:
    """Peak memory of one forward + backward of a Llama's per-token completion log-probs, through
    poise.model.logprobs.token_logps (path 'poise') or full logits -> log_softmax -> gather (path 'full')."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from poise.model.logprobs import token_logps

    device, vocab, length, rows = spec["device"], spec["vocab"], spec["length"], spec["rows"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
                         num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(2048, length), tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().to(device)
    model.config.use_cache = False

    def batch(n_rows, n):
        ids = torch.randint(3, vocab, (n_rows, n), device=device)
        am = torch.ones_like(ids)
        cm = torch.zeros_like(ids, dtype=torch.bool)
        cm[:, n - int(n * spec["completion_frac"]):] = True
        return ids, am, cm

    def fwd_bwd(ids, am, cm):
        if spec["path"] == "poise":
            lp = token_logps(model, ids, am, cm, chunk_size=spec["chunk_size"]).logps
        else:
            logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
            lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * cm[:, 1:]
        lp.sum().backward()

    fwd_bwd(*batch(rows, 16))  # allocates the weights' gradients, so that only activations are measured
    model.zero_grad(set_to_none=False)
    ids, am, cm = batch(rows, length)
    gc.collect()
    peak = PeakMemory(device)
    peak.start()
    t0 = now(device)
    fwd_bwd(ids, am, cm)
    dt = now(device) - t0
    p = peak.peak_mib()
    return {"kind": "memscan", "path": spec["path"], "vocab": vocab, "length": length, "rows": rows,
            "peak_mib": p, "start_mib": peak.start_mib, "growth_mib": p - peak.start_mib,
            "process_peak_mib": process_peak_mib(), "seconds": dt, "peak_method": peak.method(),
            "full_logits_mib": rows * length * vocab * 4 / 2**20}


# -------------------------------------------------------------------------------------------------- matmul


def run_matmul(spec: dict) -> dict:
    """This machine's matmul throughput: torch.mm of two n x n matrices, ``matmul_reps`` timed repeats after
    one untimed, in float32 and, where the hardware computes bf16 natively (a CPU with AVX512_BF16 or AMX,
    a GPU with bf16), in bfloat16; GFLOP/s = 2 n^3 / time, the best repeat (the least disturbed) and the
    median."""
    import statistics

    import torch

    device, n, reps = spec["device"], spec["matmul_n"], spec["matmul_reps"]
    dtypes = {"fp32": torch.float32}
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            dtypes["bf16"] = torch.bfloat16
    else:
        cpu = getattr(torch, "cpu", None)
        try:
            native = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except AttributeError:
            native = False
        if native:
            dtypes["bf16"] = torch.bfloat16
    out = {"kind": "matmul", "n": n, "reps": reps, "threads": torch.get_num_threads()}
    for name, dt in dtypes.items():
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t0 = now(device)
            torch.mm(a, b)
            times.append(now(device) - t0)
        flop = 2 * n**3
        out[name] = {"best_gflops": flop / min(times) / 1e9, "median_gflops": flop / statistics.median(times) / 1e9,
                     "times_s": times}
    return out


RUNNERS = {"poise": run_poise, "trl": run_trl, "bare": run_bare, "balancers": run_balancers,
           "memscan": run_memscan, "matmul": run_matmul}


def main() -> None:
    kind, spec_path, out_path = sys.argv[1:4]
    spec = read_json(spec_path)
    _threads(spec)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    write_json(out_path, RUNNERS[kind](spec))


if __name__ == "__main__":
    main()
