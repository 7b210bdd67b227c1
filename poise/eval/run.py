"""``poise eval RUN``: evaluate a trained run folder.

- Held-out preference metrics on ``eval_file`` (reward accuracy, margins, every metric of the run's
  objective), with the reference's log-probs computed live.
- Generations of the policy and of the reference on the held-out prompts, written to
  ``generations.jsonl`` in the AlpacaEval format (``instruction``, ``output``, ``generator``), so that
  external judges can score real models.
- KL(policy || reference), estimated on responses sampled from the policy:
  mean over prompts of log pi(y|x) - log pi_ref(y|x).
- With a gold reward (``--gold testbed``, the built-in task of poise.testbed, or ``--gold instruct``, the
  same task asked in plain English of an instruct model, poise.testbed.instruct): the gold reward of the
  policy's responses, its win rate against the reference's responses, a length-controlled win rate and
  the mean length.

Everything lands in ``eval.json`` in the run folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from poise import fsutil
from poise.data import TokenizedPair, collate_sequences, load_rows, tokenize_rows
from poise.errors import ConfigError, DataError
from poise.model.generate import generate_ids
from poise.model.load import load_model, load_tokenizer
from poise.model.logprobs import batch_logps
from poise.training.checkpoint import saved_objective_state
from poise.training.config import load_config
from poise.training.runlog import MetricAccumulator
from poise.training.tasks import PolicyLogps, PreferenceTask

log = logging.getLogger("poise")


@torch.no_grad()
def completion_logps(model, prompts: Sequence[tuple[int, ...]], completions: Sequence[Sequence[int]],
                     pad_token_id: int, eos: int | None) -> torch.Tensor:
    """(N,) log pi(completion + EOS | prompt)."""
    seqs = [(tuple(p), tuple(c) + ((eos,) if eos is not None else ())) for p, c in zip(prompts, completions)]
    b = collate_sequences(seqs, pad_token_id).to(next(model.parameters()).device)
    return batch_logps(model, b).logps.sum(-1).cpu()


def run_objective(cfg, run_dir: Path | None = None):
    """(objective, state) that ``run_dir`` trained, or (None, {}) for an SFT stage. The state is the one
    the run saved (its resolved config.yaml holds the calibrated values too): never recalibrated."""
    if cfg.stage == "sft":
        return None, {}
    objective = cfg.build_objective()
    state = objective.init_state()
    if objective.needs_calibration(state):
        saved = saved_objective_state(run_dir) if run_dir is not None else None
        if not saved or objective.needs_calibration(saved):
            raise ConfigError(f"{run_dir}: the run's objective needs its calibrated state (gate_tau: auto), and "
                              "neither its config.yaml nor a checkpoint holds it. Pass the threshold the run "
                              "used, e.g. gate_tau=0.01, in the run's config.yaml.")
        objective.check_state(saved)
        state = saved
    return objective, state


def preference_metrics(cfg, model, reference, tokenizer, pairs: list[TokenizedPair],
                       run_dir: Path | None = None) -> dict[str, float]:
    """The run's objective metrics on held-out pairs (reward accuracy, margins, ...), with the state
    the run calibrated (read, never recalibrated)."""
    objective, state = run_objective(cfg, run_dir)
    if objective is None:
        return {}
    task = PreferenceTask(pairs, objective, tokenizer.pad_token_id, ref_model=reference,
                          chunk_size=cfg.chunk_size)
    module = PolicyLogps(model, stats=sorted(objective.needs_stats), chunk_size=cfg.chunk_size)
    acc = MetricAccumulator()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(pairs), cfg.micro_batch_size):
            idx = list(range(i, min(i + cfg.micro_batch_size, len(pairs))))
            _, m, _ = task.loss(module, idx, dev, state=state, num_items=len(idx), num_tokens=task.norm_tokens(idx))
            acc.add(m, len(idx))
    return {f"eval/{k}": v for k, v in acc.reduce().items()}


def _prompt_texts(rows) -> list[str]:
    out = []
    for r in rows:
        p = r.data.get("prompt")
        if isinstance(p, list) and p and isinstance(p[-1], dict):
            p = p[-1].get("content", "")
        out.append(p if isinstance(p, str) else "")
    return out


def evaluate_run(run_dir: str | Path, *, eval_file: str | None = None, num_prompts: int = 64,
                 max_new_tokens: int = 32, gold: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Evaluate ``run_dir`` (written by ``poise train``) and write ``eval.json`` there."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model").is_dir():
        raise ConfigError(f"{run_dir} is not a finished poise run (needs config.yaml and model/).")
    cfg = load_config(run_dir / "config.yaml")
    eval_file = eval_file or cfg.eval_file
    if not eval_file:
        raise ConfigError(f"{run_dir}: no eval_file in its config; pass --eval-file FILE.")
    tokenizer = load_tokenizer(str(run_dir / "model"))
    policy = load_model(str(run_dir / "model"))
    reference = load_model(cfg.reference_model or cfg.model, gguf_file=None if cfg.reference_model else cfg.gguf_file)
    rows = load_rows(eval_file, split=cfg.split, columns=cfg.columns or None)
    data = tokenize_rows(rows, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         prompt_truncation=cfg.prompt_truncation, on_bad_row="skip")
    result: dict[str, Any] = {"run": str(run_dir), "method": cfg.method}
    pref = preference_metrics(cfg, policy, reference, tokenizer, data.pairs, run_dir)
    result.update(pref)
    if "eval/rewards/accuracies" in pref:
        result["reward_accuracy"] = pref["eval/rewards/accuracies"]
        result["margin"] = pref["eval/rewards/margins"]
    result.update(_generation_metrics(run_dir, cfg, policy, reference, tokenizer, data.pairs, rows,
                                      num_prompts=num_prompts, max_new_tokens=max_new_tokens, gold=gold, seed=seed))
    _write(run_dir / "eval.json", json.dumps(result, indent=1))
    return result


def _generation_metrics(run_dir, cfg, policy, reference, tokenizer, pairs, rows, *, num_prompts, max_new_tokens,
                        gold, seed) -> dict[str, Any]:
    by_index = {r.index: r for r in rows}
    pairs = pairs[:num_prompts]
    prompts = [p.prompt_ids for p in pairs]
    texts = _prompt_texts([by_index[p.index] for p in pairs])
    kw = dict(max_new_tokens=max_new_tokens, seed=seed)
    greedy_pol = generate_ids(policy, tokenizer, prompts, **kw)
    greedy_ref = generate_ids(reference, tokenizer, prompts, **kw)
    sampled = generate_ids(policy, tokenizer, prompts, temperature=1.0, **kw)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kl = (completion_logps(policy, prompts, sampled, pad, eos) - completion_logps(reference, prompts, sampled, pad, eos))
    out_pol = [tokenizer.decode(c, skip_special_tokens=True) for c in greedy_pol]
    out_ref = [tokenizer.decode(c, skip_special_tokens=True) for c in greedy_ref]
    lines = []
    for t, a, b in zip(texts, out_pol, out_ref):
        lines.append(json.dumps({"instruction": t, "output": a, "generator": cfg.method}) + "\n")
        lines.append(json.dumps({"instruction": t, "output": b, "generator": "reference"}) + "\n")
    _write(run_dir / "generations.jsonl", "".join(lines))
    res: dict[str, Any] = {"kl_to_reference": kl.mean().item(),
                           "mean_length_tokens": sum(map(len, greedy_pol)) / max(1, len(greedy_pol))}
    if gold:
        res.update(gold_metrics(gold, texts, out_pol, out_ref))
    return res


def gold_metrics(gold: str, prompts: list[str], responses: list[str], reference: list[str]) -> dict[str, float]:
    """Gold reward, win rate and length-controlled win rate against the reference's responses."""
    scorer = _gold(gold)
    score, win_rate = scorer
    s = score(prompts, responses)
    w = win_rate(prompts, responses, reference)
    return {"gold_reward": s["gold_reward"], "exact_match": s["exact_match"], "mean_length": s["length"],
            "reference_gold_reward": score(prompts, reference)["gold_reward"],
            "win_rate": w["win_rate"], "lc_win_rate": w["lc_win_rate"], "length_coef": w["length_coef"],
            "ties": w["ties"]}


def _gold(name: str) -> tuple[Callable, Callable]:
    if name == "testbed":
        from poise.testbed.evaluate import score, win_rate

        return score, win_rate
    if name == "instruct":
        from poise.testbed import instruct

        return instruct.score, instruct.win_rate
    raise ConfigError(f"unknown gold reward {name!r}; the built-in ones are 'testbed' (the testbed's prompts) "
                      "and 'instruct' (the testbed asked in plain English, poise.testbed.instruct).")


def _write(path: Path, text: str) -> None:
    """Write an evaluation output atomically; a failure to write is a PoiseError naming the file."""
    try:
        fsutil.atomic_write_text(path, text)
    except OSError as e:
        raise fsutil.write_error("the evaluation output", path, e, kept="The previous file (if any) is kept.",
                                 then="run `poise eval` again") from e


# -- a prompt file scored with any reward (poise/eval/rewards.py) -------------------------------------------


def render_prompt(data: dict, tokenizer, *, where: str) -> str:
    """The prompt of a row of a prompt file, as text for generation: ``{prompt}`` (a string, or messages),
    ``{messages}`` (a final assistant message is dropped), or a preference row (its prompt). A string is
    rendered with the chat template when the tokenizer has one (as an instruct model is asked); messages
    need one."""
    from poise.data.formats import _apply

    value = data.get("prompt", data.get("messages"))
    if isinstance(value, list):
        messages = value[:-1] if value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            else value
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: the prompt is a list of messages but the tokenizer has no chat template.")
        return _apply(tokenizer, messages, "prompt", add_generation_prompt=True)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: a prompt row needs a 'prompt' (text or messages) or 'messages'; found "
                        f"{', '.join(map(repr, data)) or 'no fields'}.")
    if getattr(tokenizer, "chat_template", None):
        return _apply(tokenizer, [{"role": "user", "content": value}], "prompt", add_generation_prompt=True)
    return value


def evaluate_prompts(run_dir: str | Path, prompts_file: str, reward: str, *, baseline: str | None = None,
                     num_prompts: int = 64, max_new_tokens: int = 128, seed: int = 0,
                     on_bad_row: str = "error", backend: str = "auto",
                     baseline_replies: Sequence[str] | None = None) -> dict[str, Any]:
    """Generate for the prompts of ``prompts_file`` with the run's model and a baseline (a model folder or
    a run folder; default the run's reference model), compare the two replies to each prompt with
    ``reward`` (:func:`poise.eval.rewards.load_reward`: a pointwise reward scores both, the outcome is 1,
    0.5 or 0; a pairwise judge gives its probability that the run's reply is better, asked in both
    orders; :func:`poise.eval.rewards.compare_sides`), and report: mean rewards (None for a judge), win
    rate and length-controlled win rate (:func:`poise.testbed.evaluate.compare_outcomes`, AlpacaEval 2's
    regression on the length difference), the per-prompt ``outcomes`` with their ``prompt_ids`` (the
    indices of the compared prompts in the file's order, to pair two runs prompt by prompt) and
    ``win_rate_ci``, the 95% percentile bootstrap interval of the win rate over prompts
    (:func:`poise.testbed.evaluate.bootstrap_ci`, 2000 resamples, seed 0).
    Both sides generate greedily with ``backend`` (:func:`poise.model.generate.choose_backend`: vLLM when it is
    installed and a GPU is present, Hugging Face otherwise; a GGUF baseline always with Hugging Face).
    ``baseline_replies``: the baseline's replies to these prompts, generated before with the same settings
    (``poise iterate`` evaluates many runs against one start model), used instead of generating them again.
    Writes ``eval_prompts.json`` and ``generations_prompts.jsonl`` in the run folder."""
    from poise.eval.rewards import compare_sides, load_reward
    from poise.model.generate import choose_backend
    from poise.testbed.evaluate import bootstrap_ci, compare_outcomes

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model").is_dir():
        raise ConfigError(f"{run_dir} is not a finished poise run (needs config.yaml and model/).")
    cfg = load_config(run_dir / "config.yaml")
    scorer = load_reward(reward)  # a bad reward is refused before any model loads
    rows = load_rows(prompts_file, required=())[:num_prompts]
    tokenizer = load_tokenizer(str(run_dir / "model"))
    texts = [render_prompt(r.data, tokenizer, where=r.where) for r in rows]
    base = baseline or cfg.reference_model or cfg.model
    if (Path(base) / "model" / "config.json").is_file():  # a run folder: its final model
        base = str(Path(base) / "model")
    base_gguf = None if baseline or cfg.reference_model else cfg.gguf_file
    paths = (str(run_dir / "model"), None if base_gguf else base)  # vLLM loads a folder itself

    def replies(path: str | None, load) -> list[str]:
        use = choose_backend(backend, path)
        model = load() if use == "hf" else None
        ids = generate_ids(model, tokenizer, texts, max_new_tokens=max_new_tokens, seed=seed, backend=use,
                           model_path=path)
        return [tokenizer.decode(c, skip_special_tokens=True) for c in ids]

    out_a = replies(paths[0], lambda: load_model(str(run_dir / "model")))
    if baseline_replies is not None and len(baseline_replies) != len(texts):
        raise ValueError(f"baseline_replies: {len(baseline_replies)} replies for {len(texts)} prompts")
    out_b = list(baseline_replies) if baseline_replies is not None else \
        replies(paths[1], lambda: load_model(base, gguf_file=base_gguf, key="baseline"))
    where = [r.where for r in rows]
    sides = compare_sides(scorer, texts, out_a, out_b, on_bad_row=on_bad_row, where=where)
    ga, gb = sides.scores_a, sides.scores_b
    keep = [i for i, o in enumerate(sides.outcomes) if o is not None]
    if not keep:
        raise DataError(f"{prompts_file}: the reward {reward!r} scored no prompt on both sides.")
    outcomes = [sides.outcomes[i] for i in keep]
    diff = [len(out_a[i].split()) - len(out_b[i].split()) for i in keep]
    result: dict[str, Any] = {"run": str(run_dir), "method": cfg.method, "reward": reward, "baseline": base,
                              "prompts": len(texts), "scored": len(keep), "skipped": len(texts) - len(keep),
                              "reward_mean": sum(ga[i] for i in keep) / len(keep) if ga is not None else None,
                              "baseline_reward_mean": sum(gb[i] for i in keep) / len(keep) if gb is not None else None,
                              "mean_length": sum(len(out_a[i].split()) for i in keep) / len(keep),
                              "baseline_mean_length": sum(len(out_b[i].split()) for i in keep) / len(keep)}
    result.update(compare_outcomes(outcomes, diff))
    result["win_rate_ci"] = list(bootstrap_ci(outcomes))
    result["outcomes"] = outcomes
    result["prompt_ids"] = keep
    none = [None] * len(texts)
    lines = [json.dumps({"instruction": t, "output": a, "reward": sa, "baseline_output": b, "baseline_reward": sb,
                         "outcome": o}) + "\n"
             for t, a, b, sa, sb, o in zip(texts, out_a, out_b, ga or none, gb or none, sides.outcomes)]
    _write(run_dir / "generations_prompts.jsonl", "".join(lines))
    _write(run_dir / "eval_prompts.json", json.dumps(result, indent=1))
    return result
