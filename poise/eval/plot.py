"""Curves and bars of several runs, overlaid (``poise plot RUN_DIRS...``): one PNG per panel.

Panels: chosen and rejected log-prob curves, the rejected/chosen gradient-norm ratio, the log-prob of
unrelated responses (squeezing), eval scores and mean length from eval.json, and any metric asked for.
A panel that no run has data for is skipped. Each run keeps its colour in every panel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from poise import fsutil  # noqa: E402
from poise.errors import PoiseError  # noqa: E402
from poise.eval.report import CHOSEN_KEYS, OTHERS_KEYS, RATIO_KEY, REJECTED_KEYS, Run, fmt, load_runs  # noqa: E402

DPI = 100
PANEL_SIZE = (8.0, 5.0)
STEP_LABEL = "step (optimizer steps)"
LOGP_LABEL = "log-prob (nats)"
EVAL_BARS = (("gold_reward", "gold reward"), ("reward_mean", "reward (poise eval --reward)"), ("win_rate", "win rate"),
             ("lc_win_rate", "LC win rate"))

Colors = dict[str, tuple]
Draw = Callable[[Axes, Sequence[Run], Colors, bool], bool]


def run_colors(runs: Sequence[Run]) -> Colors:
    """One colour per run label, in the order of the runs (tab10, then tab20 for more than ten)."""
    labels = list(dict.fromkeys(r.label for r in runs))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


class _PlainLog(LogFormatter):
    """Log-axis tick labels as plain numbers (0.6, 2, 6) rather than 6x10^-1 or 6e-01."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def _smooth(steps: list[float], values: list[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """A moving average over about 2% of the points, for curves of more than 100 points."""
    if len(values) <= 100:
        return None
    w = max(2, len(values) // 50)
    return np.asarray(steps[w - 1:]), np.convolve(values, np.ones(w) / w, mode="valid")


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs of one method in one grid cell over several seeds (``seed`` in eval.json) together; every
    other run alone."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        key = ("seeds", r.cell, r.name) if r.eval.get("seed") is not None else ("run", id(r))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _band(ax: Axes, group: Sequence[Run], color, key: str, suffix: str, log: bool) -> bool:
    """The mean over the seeds of ``group`` as a line, their range as a band, on the steps all logged."""
    series = [dict(zip(*r.series(key))) for r in group if r.first_key([key])]
    if len(series) < 2:
        return False
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if log:
        steps = [t for t in steps if all(s[t] > 0 for s in series)]
    if not steps:
        return False
    values = np.array([[s[t] for t in steps] for s in series])
    label = f"{group[0].name} (mean of {len(series)} seeds; band: their range){suffix}"
    ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)
    ax.plot(steps, values.mean(0), color=color, lw=1.8, marker="o" if len(steps) < 30 else None, ms=3, label=label)
    return True


def _curves(ax: Axes, runs: Sequence[Run], colors: Colors, keys: Sequence[str], *, log: bool = False,
            legend: bool = True) -> list[str]:
    """Plot, for each run, the first of ``keys`` it logged; runs of several seeds as a mean and a band.
    Returns the keys used (empty: no data)."""
    used = []
    for group in seed_groups(runs):
        run = group[0]
        key = run.first_key(keys)
        if key is None:
            continue
        suffix = "" if key == keys[0] or len(keys) == 1 else " (training batches)"
        if len(group) > 1 and _band(ax, group, colors[run.label], key, suffix, log):
            used.append(key)
            continue
        steps, values = run.series(key)
        if log:  # a log axis shows positive values only
            kept = [(s, v) for s, v in zip(steps, values) if v > 0]
            if not kept:
                continue
            steps, values = [s for s, _ in kept], [v for _, v in kept]
        suffix = "" if key == keys[0] or len(keys) == 1 else " (training batches)"
        smooth = _smooth(list(steps), list(values))
        color = colors[run.label]
        if smooth is None:
            ax.plot(steps, values, color=color, lw=1.6, marker="o" if len(values) < 30 else None, ms=3,
                    label=run.label + suffix)
        else:
            ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
            ax.plot(*smooth, color=color, lw=1.8, label=run.label + suffix)
        used.append(key)
    if used:
        ax.set_xlabel(STEP_LABEL)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_PlainLog())
            ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.grid(which="minor", axis="y", alpha=0.15)
        if legend:
            ax.legend(fontsize=8, loc="best")
    return used


def _source(used: list[str]) -> str:
    probe = [k.startswith("probe/") for k in used]
    if not used:
        return ""
    return " (probe set)" if all(probe) else " (training batches)" if not any(probe) else " (probe set / batches)"


def draw_chosen(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    used = _curves(ax, runs, colors, CHOSEN_KEYS, legend=legend)
    ax.set(title=f"Chosen log-prob{_source(used)}", ylabel=LOGP_LABEL)
    return bool(used)


def draw_rejected(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    used = _curves(ax, runs, colors, REJECTED_KEYS, legend=legend)
    ax.set(title=f"Rejected log-prob{_source(used)}", ylabel=LOGP_LABEL)
    return bool(used)


def draw_others(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    used = _curves(ax, runs, colors, OTHERS_KEYS, legend=legend)
    ax.set(title="Log-prob of unrelated responses (squeezing)", ylabel=LOGP_LABEL)
    return bool(used)


def draw_ratio(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    used = _curves(ax, runs, colors, (RATIO_KEY,), log=True, legend=False)
    if used:
        ax.axhline(1.0, color="0.3", ls="--", lw=1.2, label="balanced (ratio 1)")
        if legend:
            ax.legend(fontsize=8, loc="best")
    ax.set(title="Logit-gradient norm ratio, rejected / chosen", ylabel="ratio (log scale; 1 = balanced)")
    return bool(used)


def _label_bar(ax: Axes, x: float, v: float) -> None:
    ax.annotate(fmt(v), (x, v), xytext=(0, 2 if v >= 0 else -2), textcoords="offset points",
                ha="center", va="bottom" if v >= 0 else "top", fontsize=8)


def _run_handles(runs: Sequence[Run], colors: Colors) -> list[Line2D]:
    return [Line2D([], [], color=colors[g[0].label], lw=6, label=g[0].label if len(g) == 1 else
                   f"{g[0].name} ({len(g)} seeds)") for g in seed_groups(runs)]


def _legend_columns(runs: Sequence[Run], width_chars: int) -> int:
    return max(1, min(len(runs), width_chars // (max(len(r.label) for r in runs) + 6)))


def _bar_legend(ax: Axes, runs: Sequence[Run], colors: Colors) -> None:
    """A legend below the axes: bars fill the plot, and a twin axis would hide a legend inside it."""
    ax.legend(handles=_run_handles(runs, colors), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08),
              ncol=_legend_columns(runs, 90), frameon=False)


def _align_zero(a: Axes, b: Axes) -> None:
    """Set the y-limits of two twin axes so that 0 sits at the same height on both."""
    (lo1, hi1), (lo2, hi2) = a.get_ylim(), b.get_ylim()
    if min(hi1, hi2) <= 0:
        return
    f = max(0.0, -lo1 / (hi1 - lo1), -lo2 / (hi2 - lo2))  # the share of the axis below zero
    a.set_ylim(-f * hi1 / (1 - f), hi1)
    b.set_ylim(-f * hi2 / (1 - f), hi2)


def draw_eval(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    """Grouped bars: gold reward on the left axis, win rates (their own scale) on the right axis."""
    groups = [(k, t) for k, t in EVAL_BARS if any(r.score(k) is not None for r in runs)]
    ax.set_title("Gold reward and win rates")
    if not groups:
        return False
    runs = [r for r in runs if any(r.score(k) is not None for k, _ in groups)]
    has_gold = groups[0][0] == "gold_reward"
    has_rates = len(groups) > int(has_gold)
    rate_ax = ax.twinx() if has_gold and has_rates else ax
    width = 0.8 / len(runs)
    for gi, (key, _) in enumerate(groups):
        target = ax if key == "gold_reward" else rate_ax
        for ri, run in enumerate(runs):
            v = run.score(key)
            if v is not None:
                x = gi + (ri - (len(runs) - 1) / 2) * width
                target.bar(x, v, width * 0.95, color=colors[run.label])
                if len(runs) <= 5:  # more would overlap
                    _label_bar(target, x, v)
    ax.set_xticks(range(len(groups)), [t for _, t in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.margins(y=0.12)
    rate_ax.margins(y=0.12)
    if has_gold:
        ax.set_ylabel("gold reward (reward-model score)")
        ax.axhline(0, color="0.5", lw=0.8)
    if has_rates:
        rates = [r.score(k) for r in runs for k, _ in groups[int(has_gold):] if r.score(k) is not None]
        rate_ax.set_ylabel("win rate (vs. the comparison model)")
        rate_ax.hlines(0.5 if max(rates) <= 1 else 50.0, int(has_gold) - 0.5, len(groups) - 0.5, color="0.3",
                       ls="--", lw=1)  # a tie
    if has_gold and has_rates:
        ax.axvline(0.5, color="0.6", lw=0.8)
        ax.set_title("Gold reward (left axis) and win rates (right axis)")
        _align_zero(ax, rate_ax)
    if legend:
        _bar_legend(rate_ax, runs, colors)
    return True


def draw_length(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
    ax.set_title("Mean response length")
    scored = [(r, r.score("mean_length")) for r in runs if r.score("mean_length") is not None]
    scored = [(i, r, v) for i, (r, v) in enumerate(scored)]
    if not scored:
        return False
    for i, run, v in scored:
        ax.bar(i, v, 0.7, color=colors[run.label])
        _label_bar(ax, i, v)
    labels = [r.label for _, r, _ in scored]
    if len(labels) <= 6 and max(map(len, labels)) <= 16:
        ax.set_xticks([i for i, _, _ in scored], labels, rotation=20, ha="right", rotation_mode="anchor", fontsize=8)
    else:  # long labels would overlap under the bars: the legend names them
        ax.set_xticks([])
        if legend:
            _bar_legend(ax, [r for _, r, _ in scored], colors)
    ax.set_ylabel("mean length (words)")  # testbed and instruct gold scorers count words
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.1)
    return True


def draw_key(key: str) -> Draw:
    """A panel of one metric's curve, for ``keys`` asked for on the command line."""

    def draw(ax: Axes, runs: Sequence[Run], colors: Colors, legend: bool = True) -> bool:
        used = _curves(ax, runs, colors, (key,), legend=legend)
        ax.set(title=key, ylabel=key)
        return bool(used)

    return draw


#: The main panels: (file stem, drawing function), in the order of the overview's 2x3 grid.
PANELS: list[tuple[str, Draw]] = [
    ("chosen_logp", draw_chosen), ("rejected_logp", draw_rejected), ("grad_ratio", draw_ratio),
    ("others_logp", draw_others), ("eval_scores", draw_eval), ("mean_length", draw_length),
]


def _save(fig, path: Path, tight: bool = True) -> Path:
    path = Path(path)
    try:  # a temporary file renamed over the plot: a kill never leaves half a PNG
        with fsutil.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight" if tight else None, format=path.suffix.lstrip(".") or None)
    except OSError as e:
        raise fsutil.write_error("the plot", path, e, kept="The previous plot (if any) is kept.",
                                 then="run `poise plot` again (or pass another output folder)") from e
    finally:
        plt.close(fig)
    return path


def _key_stem(key: str) -> str:
    return "key_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _as_runs(runs: Sequence[Run | str | Path]) -> list[Run]:
    if not runs:
        raise PoiseError("poise plot: give at least one run folder.")
    if all(isinstance(r, Run) for r in runs):
        return list(runs)  # type: ignore[arg-type]
    return load_runs([r.path if isinstance(r, Run) else r for r in runs])


def plot_overview(runs: Sequence[Run | str | Path], out_path: str | Path) -> Path:
    """One 2x3 figure of the main panels, with one legend for all of them. Panels without data say so."""
    runs = _as_runs(runs)
    colors = run_colors(runs)
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    for ax, (_, draw) in zip(axes.flat, PANELS):
        if not draw(ax, runs, colors, False):
            ax.text(0.5, 0.5, "no run logged this", ha="center", va="center", transform=ax.transAxes,
                    color="0.4", fontsize=11)
            ax.set(xticks=[], yticks=[], ylabel="")
    ncol = _legend_columns(runs, 150)
    rows = -(-len(runs) // ncol)
    fig.legend(handles=_run_handles(runs, colors), loc="upper center", ncol=ncol, fontsize=10,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.98 - 0.028 * rows))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out, tight=False)  # tight_layout has placed everything already


def plot_main(run_dirs: list[str], out_dir: str, keys: list[str] | None = None, *,
              overview: bool = True) -> list[Path]:
    """Write one PNG per panel (and ``overview.png``) to ``out_dir``; return the files written.

    ``keys`` adds one curve panel per metric (e.g. ``balance/kappa_mean``). A panel that no run has
    data for writes no file.
    """
    runs = _as_runs(run_dirs)
    colors = run_colors(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = PANELS + [(_key_stem(k), draw_key(k)) for k in dict.fromkeys(keys or [])]
    written = []
    for stem, draw in panels:
        fig, ax = plt.subplots(figsize=PANEL_SIZE)
        if draw(ax, runs, colors, True):
            written.append(_save(fig, out / f"{stem}.png"))
        else:
            plt.close(fig)
    if overview and written:
        written.append(plot_overview(runs, out / "overview.png"))
    return written
