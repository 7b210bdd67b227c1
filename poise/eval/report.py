"""Compare finished runs: a Markdown report from their run folders (``poise report RUN_DIRS...``).

A run folder holds ``metrics.jsonl`` (one row per logged step), ``config.yaml`` (the resolved config)
and, when the run was evaluated, ``eval.json`` (gold reward, win rates, length, KL, grid cell). Any of
them may be missing or incomplete: a missing key or a NaN is shown as "-" and left out of means.

``eval_prompts.json`` (``poise eval --prompts-file``) fills in what eval.json lacks. When it holds the
per-prompt ``outcomes`` of its win rate (1 the run's reply won, 0.5 a tie, 0 a loss; soft for judges)
with their ``prompt_ids``, the report gives the win rate 95% intervals over prompts: for a run its
``win_rate_ci`` (else a bootstrap of its outcomes), a method's over seeds a bootstrap over the prompts
its seeds share (:func:`bootstrap_prompts`), and the difference to the baseline a paired bootstrap over
the prompts both share (:func:`paired_bootstrap`), used for the win rate's significance in the seeds
table and the "beats" counts; the other metrics keep the seed-paired t-interval.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from poise import fsutil
from poise.errors import PoiseError

#: The source of each log-prob curve, best first: the fixed probe set, else the training batches.
CHOSEN_KEYS = ("probe/chosen_logp", "logps/chosen")
REJECTED_KEYS = ("probe/rejected_logp", "logps/rejected")
OTHERS_KEYS = ("probe/others_logp",)
RATIO_KEY = "diag/logit_grad_ratio"

#: The keys of eval_prompts.json that belong to its win rate: the per-prompt outcomes, their prompts'
#: indices in the prompt file, and the win rate's 95% interval.
PROMPT_KEYS = ("outcomes", "prompt_ids", "win_rate_ci")
#: Resamples and seed of the bootstraps over prompts.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Fewest prompts an interval over prompts is given for.
MIN_PROMPTS = 2

#: Config keys that never tell two runs apart in a label.
_NOT_LABEL_KEYS = {"output_dir", "resume", "cache_dir", "report_to", "train_file", "eval_file", "logging_steps",
                   "save_steps", "save_total_limit", "eval_steps", "cpu", "model", "tokenizer"}


@dataclass
class Run:
    """One run folder, read. ``label`` is unique among the runs of a report; ``name`` is the label
    before :func:`load_runs` told alike runs apart (the eval.json label, or method and hyperparameters)."""

    path: Path
    label: str
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    _series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return str(self.eval.get("method") or self.config.get("method") or self.path.name)

    @property
    def cell(self) -> str | None:
        c = self.eval.get("cell")
        return None if c is None else str(c)

    def score(self, key: str) -> float | None:
        """A finite number of eval.json, else None."""
        return finite(self.eval.get(key))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a metric over the rows that hold a finite value of it (do not modify)."""
        if key not in self._series:
            pairs = [(finite(row.get("step")), finite(row.get(key)), i) for i, row in enumerate(self.metrics)]
            pairs = [(float(i) if s is None else s, v) for s, v, i in pairs if v is not None]
            self._series[key] = ([s for s, _ in pairs], [v for _, v in pairs])
        return self._series[key]

    def first_key(self, keys: Iterable[str]) -> str | None:
        """The first of ``keys`` that has at least one finite value in this run."""
        return next((k for k in keys if self.series(k)[1]), None)

    def change(self, keys: Iterable[str]) -> float | None:
        """Last minus first value of the first key in ``keys`` that the run logged."""
        key = self.first_key(keys)
        return None if key is None else self.series(key)[1][-1] - self.series(key)[1][0]

    def mean(self, key: str) -> float | None:
        values = self.series(key)[1]
        return sum(values) / len(values) if values else None

    def median(self, key: str) -> float | None:
        """The median over the run's steps: robust to a step whose ratio divides by ~0 (APO-down's
        chosen gradient cancels at the start: a ratio of 1e27)."""
        values = sorted(self.series(key)[1])
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None

    def outcomes(self) -> list[float] | None:
        """The per-prompt outcomes of the win rate (``outcomes``), or None unless it is a non-empty list
        of numbers in [0, 1]."""
        raw = self.eval.get("outcomes")
        if not isinstance(raw, list) or not raw:
            return None
        values = [finite(v) for v in raw]
        return None if any(v is None or not 0 <= v <= 1 for v in values) else values  # type: ignore[misc]

    def prompt_outcomes(self) -> dict[Any, float] | None:
        """prompt id -> outcome (``prompt_ids`` with ``outcomes``), or None unless both are there, as
        long, and the ids distinct integers or strings."""
        values, ids = self.outcomes(), self.eval.get("prompt_ids")
        if values is None or not isinstance(ids, list) or len(ids) != len(values):
            return None
        if any(isinstance(i, bool) or not isinstance(i, int | str) for i in ids) or len(set(ids)) != len(ids):
            return None
        return dict(zip(ids, values))


def finite(v: Any) -> float | None:
    """``v`` as a finite float, else None (missing, NaN, infinite, not a number)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- loading ------------------------------------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash, or an empty line
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_mapping(path: Path, loader) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = loader(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise PoiseError(f"{path}: cannot be read ({e}); fix or delete the file.") from e
    return data if isinstance(data, dict) else {}


def _hyper_label(config: dict[str, Any]) -> str | None:
    """The method plus its hyperparameters (the config keys that are not trainer settings)."""
    from poise.training.config import TRAINER_FIELDS

    method = config.get("method")
    if not method:
        return None
    balance = config.get("balance") or []
    name = str(method) + "".join(f"+{b}" for b in balance)
    hp = {k: v for k, v in config.items() if k not in TRAINER_FIELDS}
    return name + (f" ({_kv(hp)})" if hp else "")


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(d.items()))


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder. Raises PoiseError when it holds none of the three files."""
    path = Path(run_dir)
    files = [path / n for n in ("metrics.jsonl", "config.yaml", "eval.json")]
    if not path.is_dir() or not any(f.exists() for f in files):
        raise PoiseError(f"{path}: not a run folder (no metrics.jsonl, config.yaml or eval.json in it); "
                         "pass the output_dir of a training run.")
    config = _read_mapping(files[1], yaml.safe_load)
    ev = _read_mapping(files[2], json.loads)
    prompts = path / "eval_prompts.json"  # poise eval --prompts-file --reward: its figures where eval.json has none
    if prompts.is_file():
        extra = {k: v for k, v in _read_mapping(prompts, json.loads).items() if k not in ("run",)}
        if "win_rate" in ev and "outcomes" not in ev:  # eval.json's own win rate: the prompts' outcomes are not its
            extra = {k: v for k, v in extra.items() if k not in PROMPT_KEYS}
        ev = {**extra, **ev}
    label = ev.get("label") or _hyper_label(config) or path.name
    return Run(path=path, label=str(label), name=str(label), config=config, metrics=_read_metrics(files[0]),
               eval=ev)


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Read several run folders and make their labels unique.

    Runs whose labels collide get their grid cell added when they have one, else the config keys in
    which they differ; any still alike get their folder name.
    """
    runs = [load_run(d) for d in run_dirs]
    for group in _collisions(runs):
        if len({r.cell for r in group}) > 1:
            for r in group:
                r.label += f" [{r.cell}]" if r.cell is not None else ""
            continue
        keys = _differing_keys([r.config for r in group])
        for r in group:
            r.label += f" [{_kv({k: r.config.get(k) for k in keys})}]" if keys else ""
    for group in _collisions(runs):
        for r in group:
            r.label = f"{r.label} <{r.path.name}>"
    return runs


def _collisions(runs: list[Run]) -> list[list[Run]]:
    by_label: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_label[r.label].append(r)
    return [g for g in by_label.values() if len(g) > 1]


def _differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - _NOT_LABEL_KEYS)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


# -- tables -------------------------------------------------------------------------------------------


def fmt(v: float | None, signed: bool = False) -> str:
    """A number for a table: 3 decimals below 10, fewer above; "-" when missing."""
    if v is None:
        return "-"
    digits = 3 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return f"{v:+.{min(digits, 2)}f}" if signed else f"{v:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


COMPARISON_COLUMNS = ["run", "gold reward", "reward", "win rate", "LC win rate", "mean length", "reward acc.",
                      "KL to ref", "Δ chosen logp (nats)", "Δ rejected logp (nats)",
                      "Δ others logp (nats)", "median grad ratio (rej/chosen)"]


def comparison_row(run: Run) -> dict[str, float | None]:
    """The numbers of one run's comparison-table row (None where the run lacks them)."""
    return {
        "gold reward": run.score("gold_reward"), "reward": run.score("reward_mean"), "win rate": run.score("win_rate"),
        "LC win rate": run.score("lc_win_rate"), "mean length": run.score("mean_length"),
        "reward acc.": run.score("reward_accuracy"), "KL to ref": run.score("kl_to_reference"),
        "Δ chosen logp (nats)": run.change(CHOSEN_KEYS), "Δ rejected logp (nats)": run.change(REJECTED_KEYS),
        "Δ others logp (nats)": run.change(OTHERS_KEYS), "median grad ratio (rej/chosen)": run.median(RATIO_KEY),
    }


def comparison_table(runs: Sequence[Run]) -> str:
    """One Markdown row per run: eval scores, log-prob changes (last minus first) and the gradient ratio;
    the win rate with its 95% interval over prompts where the run has one (:func:`win_rate_interval`)."""
    rows = []
    for run in runs:
        nums = comparison_row(run)
        row = [run.label] + [fmt(nums[c], signed=c.startswith("Δ")) for c in COMPARISON_COLUMNS[1:]]
        iv = win_rate_interval(run)
        if iv is not None:
            row[COMPARISON_COLUMNS.index("win rate")] = f"{fmt(iv[0])} [{fmt(iv[1])}, {fmt(iv[2])}]"
        rows.append(row)
    return _markdown(COMPARISON_COLUMNS, rows)


GRID_METRICS = (("gold_reward", "gold reward"), ("lc_win_rate", "LC win rate"))
#: Added to the grid metrics when a run in a cell has per-prompt outcomes (:func:`grid_metrics`).
WIN_RATE_METRIC = ("win_rate", "win rate")


def grid_metrics(runs: Sequence[Run]) -> tuple[tuple[str, str], ...]:
    """The (eval key, title) pairs the grid, seeds and "beats" sections compare: gold reward and LC win
    rate, and the win rate when a run in a grid cell has per-prompt outcomes (eval_prompts.json)."""
    with_outcomes = any(r.cell is not None and r.outcomes() is not None for r in runs)
    return GRID_METRICS + ((WIN_RATE_METRIC,) if with_outcomes else ())


# -- bootstrap over prompts ---------------------------------------------------------------------------


def _sides(x: Mapping[Hashable, float] | Sequence[Mapping[Hashable, float]]) -> list[Mapping[Hashable, float]]:
    return [x] if isinstance(x, Mapping) else list(x)


def bootstrap_prompts(a: Sequence[Mapping[Hashable, float]], b: Sequence[Mapping[Hashable, float]] = (), *,
                      n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> tuple[float, float, float, int]:
    """A percentile bootstrap over prompts: ``(statistic, low, high, prompts)``.

    ``a`` (and ``b``) are one ``{prompt id: outcome}`` per seed. Only the prompt ids every mapping of
    both sides has are used, in sorted order (so the order of the mappings' keys does not matter). The
    statistic is the mean over ``a``'s seeds of each seed's mean outcome over the prompts, minus the same
    for ``b`` when given. Each of the ``n`` resamples draws the prompt ids with replacement, the same
    draws for every seed of both sides (paired by prompt), and computes the statistic on them; ``low``
    and ``high`` are the resamples' ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's
    default linear interpolation).

    Exactly: with ``x[p]`` the mean over ``a``'s seeds minus the mean over ``b``'s of prompt p's outcome
    (the statistic is linear, so the mean of the seeds' means over a resample is the resample's mean
    of ``x``), ``rng = np.random.default_rng(seed)``, the resamples are
    ``x[rng.integers(0, P, size=(k, P))].mean(axis=1)`` in blocks of ``k = max(1, 2**22 // P)`` rows
    (one block for P < 2098 prompts). Raises ValueError when ``a`` is empty or no prompt is common.
    """
    if not a:
        raise ValueError("bootstrap_prompts needs at least one mapping on side a")
    common = set(a[0])
    for side in (*a[1:], *b):
        common &= set(side)
    if not common:
        raise ValueError("no prompt id is common to every mapping")
    try:
        ids = sorted(common)
    except TypeError:  # ids of mixed types
        ids = sorted(common, key=repr)
    x = np.array([[s[i] for i in ids] for s in a], dtype=float).mean(axis=0)
    if b:
        x = x - np.array([[s[i] for i in ids] for s in b], dtype=float).mean(axis=0)
    rng = np.random.default_rng(seed)
    P = len(ids)
    block = max(1, 2 ** 22 // P)
    stats = np.concatenate([x[rng.integers(0, P, size=(min(block, n - start), P))].mean(axis=1)
                            for start in range(0, n, block)])
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(low), float(high), P


def paired_bootstrap(a: Mapping[Hashable, float] | Sequence[Mapping[Hashable, float]],
                     b: Mapping[Hashable, float] | Sequence[Mapping[Hashable, float]], n: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """``(mean difference a - b, low, high)``: the 95% paired bootstrap over the prompt ids both sides
    share (:func:`bootstrap_prompts`); a side is ``{prompt id: outcome}``, or a list of them (its seeds,
    averaged)."""
    d, low, high, _ = bootstrap_prompts(_sides(a), _sides(b), n=n, seed=seed)
    return d, low, high


def bootstrap_mean(a: Mapping[Hashable, float] | Sequence[Mapping[Hashable, float]], n: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """``(mean, low, high)``: the 95% bootstrap over prompts of one side's mean outcome (seeds averaged
    over the prompts they all share; :func:`bootstrap_prompts`)."""
    m, low, high, _ = bootstrap_prompts(_sides(a), n=n, seed=seed)
    return m, low, high


def _interval(v: Any) -> tuple[float, float] | None:
    if not isinstance(v, list | tuple) or len(v) != 2:
        return None
    low, high = finite(v[0]), finite(v[1])
    return None if low is None or high is None or low > high else (low, high)


def _outcome_sides(e: Run | Seeds) -> list[dict[Any, float]] | None:
    """One {prompt id: outcome} per seed (one for a run), or None unless every run has them."""
    runs = list(e.runs.values()) if isinstance(e, Seeds) else [e]
    sides = [r.prompt_outcomes() for r in runs]
    return None if any(s is None for s in sides) else sides  # type: ignore[return-value]


def _common_count(sides: Sequence[Mapping[Hashable, float]]) -> int:
    common = set(sides[0])
    for s in sides[1:]:
        common &= set(s)
    return len(common)


def win_rate_interval(e: Run | Seeds) -> tuple[float, float, float] | None:
    """``(win rate, low, high)``, 95% over prompts, or None without per-prompt data.

    A run: its ``win_rate_ci`` when eval_prompts.json has one, else the bootstrap of its outcomes
    (:func:`bootstrap_mean`); the win rate is its ``win_rate`` (else the outcomes' mean). Several seeds:
    the bootstrap over the prompt ids all seeds share, each resample's win rate the mean over seeds of
    each seed's mean outcome; None unless every seed has outcomes with prompt ids. At least
    :data:`MIN_PROMPTS` prompts."""
    if isinstance(e, Seeds):
        sides = _outcome_sides(e)
        if sides is None or _common_count(sides) < MIN_PROMPTS:
            return None
        return bootstrap_mean(sides)
    values, ci = e.outcomes(), _interval(e.eval.get("win_rate_ci"))
    w = e.score("win_rate")
    if ci is not None and (w is not None or values is not None):
        return (w if w is not None else sum(values) / len(values), *ci)  # type: ignore[arg-type]
    if values is None or len(values) < MIN_PROMPTS:
        return None
    m, low, high = bootstrap_mean(e.prompt_outcomes() or dict(enumerate(values)))
    return (w if w is not None else m), low, high


def prompt_difference(a: Run | Seeds, b: Run | Seeds) -> tuple[float, float, float, int] | None:
    """Win rate of ``a`` minus ``b`` by the paired bootstrap over the prompts both share (each side
    averaged over its seeds): ``(difference, low, high, prompts)``, 95%; None unless every run of both
    has outcomes with prompt ids and they share at least :data:`MIN_PROMPTS` prompts."""
    sa, sb = _outcome_sides(a), _outcome_sides(b)
    if sa is None or sb is None or _common_count([*sa, *sb]) < MIN_PROMPTS:
        return None
    return bootstrap_prompts(sa, sb)


def difference(a: Run | Seeds, b: Run | Seeds, key: str) -> tuple[float, float, float, str] | None:
    """``(a - b, low, high, how)`` with its 95% interval: for the win rate the paired bootstrap over
    prompts (``how`` "prompts") when both have per-prompt outcomes, else the seed-paired t-interval
    (:func:`paired_difference`, ``how`` "seeds"); None when neither applies."""
    if key == WIN_RATE_METRIC[0]:
        d = prompt_difference(a, b)
        if d is not None:
            return d[0], d[1], d[2], "prompts"
    t = paired_difference(a, b, key)
    return None if t is None else (t[0], t[0] - t[1], t[0] + t[1], "seeds")


#: Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the next tabulated df below)."""
    if df < 1:
        return float("nan")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval); the half-width is nan for a single value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5
    return m, t975(n - 1) * sd / n ** 0.5


@dataclass
class Seeds:
    """The runs of one method in one grid cell over several seeds (``seed`` in eval.json): scores are
    their means; :meth:`ci` the 95% interval over seeds."""

    runs: dict[Any, Run]

    @property
    def method(self) -> str:
        return next(iter(self.runs.values())).method

    def values(self, key: str) -> dict[Any, float]:
        return {s: v for s, r in self.runs.items() if (v := r.score(key)) is not None}

    def score(self, key: str) -> float | None:
        v = list(self.values(key).values())
        return sum(v) / len(v) if v else None

    def ci(self, key: str) -> tuple[float, float] | None:
        v = list(self.values(key).values())
        return mean_ci(v) if v else None


def _entrants(runs: Sequence[Run]) -> dict[str, dict[str, Run | Seeds]]:
    """cell -> entrant -> run, or the :class:`Seeds` of a method run with several seeds. The entrant is
    the method, or the run's name for a method with several (non-seed) runs in one cell."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        if r.cell is not None:  # a sweep's label (eval.json), which tells adadpo from adadpo-floor1
            groups[(r.cell, str(r.eval.get("label") or r.method))].append(r)
    cells: dict[str, dict[str, Run | Seeds]] = defaultdict(dict)
    for (cell, name), members in groups.items():
        seeds = [r.eval.get("seed") for r in members]
        if len(members) > 1 and None not in seeds and len(set(map(str, seeds))) == len(members):
            cells[cell][name] = Seeds({r.eval.get("seed"): r for r in members})
        elif len(members) > 1:
            for r in members:
                cells[cell][r.label] = r
        else:
            cells[cell][name] = members[0]
    return dict(sorted(cells.items()))


def paired_difference(a: Run | Seeds, b: Run | Seeds, key: str) -> tuple[float, float, int] | None:
    """Mean and 95% half-width of ``a - b`` over the seeds both have (paired by seed); None unless both
    are :class:`Seeds` with at least two seeds in common."""
    if not isinstance(a, Seeds) or not isinstance(b, Seeds):
        return None
    va, vb = a.values(key), b.values(key)
    common = [s for s in va if s in vb]
    if len(common) < 2:
        return None
    m, h = mean_ci([va[s] - vb[s] for s in common])
    return m, h, len(common)


def _winners(entrants: dict[str, Run], key: str) -> tuple[list[str], float | None]:
    scores = {n: r.score(key) for n, r in entrants.items() if r.score(key) is not None}
    if not scores:
        return [], None
    best = max(scores.values())
    return sorted(n for n, v in scores.items() if v == best), best


def _beats(runs: Sequence[Run], baseline: str, significant: bool) -> dict[tuple[str, str], tuple[int, int, set]]:
    counts: dict[tuple[str, str], tuple[int, int, set]] = {}
    metrics = grid_metrics(runs)
    for entrants in _entrants(runs).values():
        base = entrants.get(baseline)
        for name, run in entrants.items():
            if name == baseline or base is None:
                continue
            for key, _ in metrics:
                a, b = run.score(key), base.score(key)
                if a is None or b is None:
                    continue
                k, n, hows = counts.get((name, key), (0, 0, set()))
                if significant:
                    d = difference(run, base, key)
                    k += d is not None and d[1] > 0
                    hows |= {d[3]} if d is not None else set()
                else:
                    k += a > b
                counts[(name, key)] = (k, n + 1, hows)
    return dict(sorted(counts.items()))


def beats_counts(runs: Sequence[Run], baseline: str = "dpo",
                 significant: bool = False) -> dict[tuple[str, str], tuple[int, int]]:
    """(entrant, eval key) -> (cells where it strictly beats ``baseline``, cells where both have a score).
    ``significant``: count only cells where the 95% interval of the difference lies above 0
    (:func:`difference`: for the win rate the paired bootstrap over prompts when both sides have
    per-prompt outcomes, else, and for the other keys, the seed-paired t-interval; cells where neither
    applies, e.g. fewer than two common seeds, count as not significant)."""
    return {k: (v[0], v[1]) for k, v in _beats(runs, baseline, significant).items()}


def _how(hows: set) -> str:
    if hows == {"prompts"}:
        return "95% paired bootstrap over prompts"
    if hows == {"prompts", "seeds"}:
        return "95% paired bootstrap over prompts, over seeds where a cell lacks outcomes"
    return "95% over seeds"


def beats_sentences(runs: Sequence[Run], baseline: str = "dpo") -> list[str]:
    """Lines like "adadpo beats dpo on LC win rate in 13 of 16 cells (significantly, 95% over seeds:
    in 4)"; the significance part when the runs have several seeds, or for the win rate per-prompt
    outcomes."""
    titles = dict(grid_metrics(runs))
    seeded = any(isinstance(e, Seeds) for c in _entrants(runs).values() for e in c.values())
    sig = _beats(runs, baseline, True)
    out = []
    for (name, key), (k, n) in beats_counts(runs, baseline).items():
        k_sig, _, hows = sig[(name, key)]
        extra = f" (significantly, {_how(hows)}: in {k_sig})" if seeded or hows else ""
        out.append(f"{name} beats {baseline} on {titles[key]} in {k} of {n} cell{'s' if n != 1 else ''}{extra}")
    return out


def _diff_cell(d: tuple[float, float, float, str] | None) -> str:
    if d is None:
        return "-"
    star = " *" if d[1] > 0 or d[2] < 0 else ""
    if d[3] == "prompts":
        return f"{fmt(d[0], signed=True)} [{fmt(d[1], signed=True)}, {fmt(d[2], signed=True)}]{star}"
    return f"{fmt(d[0], signed=True)} ± {fmt((d[2] - d[1]) / 2)}{star}"


def seeds_table(runs: Sequence[Run], baseline: str = "dpo") -> str | None:
    """Per cell and method run with several seeds: each grid metric as mean +- the 95% half-width over
    seeds, and the seed-paired difference to ``baseline`` with * where its interval excludes 0. The win
    rate, when the seeds have per-prompt outcomes: mean [95% interval] by the bootstrap over prompts
    (:func:`win_rate_interval`), and the paired bootstrap over prompts of the difference
    (:func:`prompt_difference`)."""
    metrics = grid_metrics(runs)
    rows, win = [], set()  # win: how the win-rate columns' intervals were made ("prompts", "seeds")
    for cell, entrants in _entrants(runs).items():
        base = entrants.get(baseline)
        for name, e in sorted(entrants.items()):
            if not isinstance(e, Seeds):
                continue
            row = [cell, name, str(len(e.runs))]
            for key, _ in metrics:
                is_win = key == WIN_RATE_METRIC[0]
                iv, ci = win_rate_interval(e) if is_win else None, e.ci(key)
                if iv is not None:
                    row.append(f"{fmt(iv[0])} [{fmt(iv[1])}, {fmt(iv[2])}]")
                else:
                    row.append("-" if ci is None else f"{fmt(ci[0])} ± {fmt(ci[1]) if ci[1] == ci[1] else '-'}")
                d = difference(e, base, key) if base is not None and name != baseline else None
                row.append(_diff_cell(d))
                if is_win:
                    win |= {"prompts" if iv is not None else "seeds"} if iv is not None or ci is not None else set()
                    win |= {d[3]} if d is not None else set()
            rows.append(row)
    if not rows:
        return None
    header = ["cell", "method", "seeds"]
    for key, title in metrics:
        bracket = key == WIN_RATE_METRIC[0] and "prompts" in win
        header += [f"{title} (mean {'[95%]' if bracket else '± 95%'})", f"− {baseline} (paired)"]
    note = ("± is the half-width of the 95% t-interval over seeds; the paired column is the mean over seeds of "
            f"(method − {baseline}) with its 95% t-interval (paired by seed); * where the interval excludes 0.")
    if "prompts" in win:
        note += (" Win rate: [low, high] is the 95% percentile interval of a bootstrap over prompts "
                 f"({BOOTSTRAP_RESAMPLES} resamples of the prompt ids all seeds share; each resample's win rate is "
                 "the mean over seeds of each seed's mean outcome; the mean shown is that of the shared prompts, which "
                 "differs from the mean of the seeds' win rates when they scored different prompts), and its paired column is the paired bootstrap "
                 f"of the difference (the same resampled prompt ids for the method and {baseline}, those both "
                 "share, each side averaged over its seeds)"
                 + ("; where a run lacks per-prompt outcomes, the t-interval over seeds as for the other columns."
                    if "seeds" in win else "."))
    return _markdown(header, rows) + "\n\n" + note


def grid_table(runs: Sequence[Run], baseline: str = "dpo") -> str:
    """Per grid cell, the winning method on gold reward and on LC win rate; then how often each method
    beats ``baseline``. Runs without a ``cell`` in eval.json are left out."""
    cells = _entrants(runs)
    if not cells:
        return "No run has a grid cell (`cell` in eval.json); no grid comparison."
    rows, metrics = [], grid_metrics(runs)
    for cell, entrants in cells.items():
        row = [cell, ", ".join(sorted(entrants))]
        for key, _ in metrics:
            names, best = _winners(entrants, key)
            row.append(f"{' = '.join(names)} ({fmt(best)})" if names else "-")
        rows.append(row)
    header = ["cell", "methods"] + [f"best {t}" for _, t in metrics]
    text = _markdown(header, rows)
    lines = beats_sentences(runs, baseline)
    if not lines and not any(baseline in e for e in cells.values()):
        lines = [f"no {baseline} run in any cell; nothing to compare with"]
    return text + "\n\n" + "\n".join(f"- {line}" for line in lines)


# -- what the numbers say -----------------------------------------------------------------------------


def _nats(x: float) -> str:
    x = abs(x)
    return f"{x:.1f}" if x >= 0.05 else f"{x:.2g}"


def _moves(runs: Sequence[Run], keys: Sequence[str], what: str) -> str | None:
    """"dpo's chosen log-prob fell by 3.2 nats; gate-dpo's rose by 0.4"."""
    parts = []
    for run in runs:
        c = run.change(keys)
        if c is None:
            continue
        verb = "stayed flat" if abs(c) < 0.005 else f"{'rose' if c > 0 else 'fell'} by {_nats(c)}"
        if not parts:
            parts.append(f"{run.label}'s {what} {verb}{'' if abs(c) < 0.005 else ' nats'}")
        else:
            parts.append(f"{run.label}'s {verb}")
    return "; ".join(parts) + " (last minus first logged value)." if parts else None


def _extremes(runs: Sequence[Run], key: str, what: str, high: str, low: str) -> str | None:
    scored = [(r.score(key), r.label) for r in runs if r.score(key) is not None]
    if len(scored) < 2:
        return None
    (lo, lo_name), (hi, hi_name) = min(scored), max(scored)
    if hi == lo:
        return f"All {len(scored)} evaluated runs have the same {what} ({fmt(hi)})."
    return f"{hi_name} has the {high} {what} ({fmt(hi)}); {lo_name} the {low} ({fmt(lo)})."


def _ratio_sentence(runs: Sequence[Run]) -> str | None:
    parts = [f"{r.median(RATIO_KEY):.2g} in {r.label}" for r in runs if r.median(RATIO_KEY) is not None]
    if not parts:
        return None
    return ("Median logit-gradient norm ratio over the steps, rejected over chosen (above 1: the push on the rejected "
            "side dominates): " + ", ".join(parts) + ".")


def _below_ref_sentence(runs: Sequence[Run]) -> str | None:
    key = "diag/chosen_below_ref_frac"
    parts = [f"{100 * r.last(key):.0f}% of {r.label}'s" for r in runs if r.last(key) is not None]
    if not parts:
        return None
    return "At the last logged step, " + ", ".join(parts) + " chosen responses were below the reference."


def _tally(runs: Sequence[Run]) -> list[str]:
    """"On gold reward adadpo wins 10 of 16 cells, dpo 6"."""
    out = []
    for key, title in grid_metrics(runs):
        winners = [_winners(entrants, key)[0] for entrants in _entrants(runs).values()]
        scored = sum(bool(w) for w in winners)
        if scored:
            ranked = sorted(Counter(n for w in winners for n in w).items(), key=lambda kv: (-kv[1], kv[0]))
            out.append(f"On {title}, {ranked[0][0]} wins {ranked[0][1]} of {scored} cells"
                       + "".join(f", {n} {k}" for n, k in ranked[1:]) + " (ties count for each).")
    return out


def summary_sentences(runs: Sequence[Run]) -> list[str]:
    """Plain sentences read off the numbers, for the report's "what the numbers say" list."""
    sentences = [
        _moves(runs, CHOSEN_KEYS, "chosen log-prob"),
        _moves(runs, REJECTED_KEYS, "rejected log-prob"),
        _moves(runs, OTHERS_KEYS, "log-prob of unrelated responses (squeezing)"),
        _ratio_sentence(runs),
        _below_ref_sentence(runs),
        _extremes(runs, "gold_reward", "gold reward", "highest", "lowest"),
        _extremes(runs, "lc_win_rate", "LC win rate", "highest", "lowest"),
        _extremes(runs, "kl_to_reference", "KL to the reference", "largest", "smallest"),
        _extremes(runs, "mean_length", "mean length", "longest", "shortest"),
    ]
    out = [s for s in sentences if s] + _tally(runs)  # the grid section has the "beats" counts
    return out or ["No numbers to compare: the runs logged no log-probs and have no eval.json."]


def build_report(runs: Sequence[Run], baseline: str = "dpo") -> str:
    """The Markdown report: the runs, the comparison table, the grid table, and the sentences."""
    lines = ["# poise report", "", f"{len(runs)} run{'s' if len(runs) != 1 else ''}:", ""]
    lines += [f"- **{r.label}**: `{r.path}`" for r in runs]
    lines += ["", "## Comparison", "", comparison_table(runs), "",
              "Δ columns: last minus first logged value (probe set when logged, else training batches); "
              "grad ratio: median over the steps of diag/logit_grad_ratio, rejected over chosen."
              + (" Win rate [low, high]: its 95% interval over prompts (win_rate_ci of eval_prompts.json, else "
                 f"a bootstrap of the run's per-prompt outcomes, {BOOTSTRAP_RESAMPLES} resamples)."
                 if any(win_rate_interval(r) is not None for r in runs) else ""), ""]
    if any(r.cell is not None for r in runs):
        lines += ["## Grid", "", grid_table(runs, baseline), ""]
        seeds = seeds_table(runs, baseline)
        if seeds:
            lines += ["## Seeds", "", seeds, ""]
    lines += ["## What the numbers say", ""] + [f"- {s}" for s in summary_sentences(runs)]
    return "\n".join(lines) + "\n"


def report_main(run_dirs: list[str], out: str | None, baseline: str = "dpo") -> str:
    """Read the run folders, write the Markdown report to ``out`` when given, and return it."""
    if not run_dirs:
        raise PoiseError("poise report: give at least one run folder.")
    text = build_report(load_runs(run_dirs), baseline)
    if out:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            fsutil.atomic_write_text(out, text)
        except OSError as e:
            raise fsutil.write_error("the report", out, e, kept="The previous report (if any) is kept.",
                                     then="run `poise report` again (or pass another --out)") from e
    return text
