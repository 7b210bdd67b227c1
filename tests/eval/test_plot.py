"""poise.eval.plot: PNG panels written for the data there is, skipped for the data there is not."""

from __future__ import annotations

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
from helpers import curve, make_run

from poise.errors import PoiseError
from poise.eval.plot import PANELS, draw_chosen, draw_eval, draw_ratio, plot_main, plot_overview, run_colors
from poise.eval.report import load_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    if path.read_bytes()[:8] != PNG_SIGNATURE:
        return False
    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300


@pytest.fixture
def runs(tmp_path):
    """Two full runs (probe log-probs, ratio, eval.json) and one with batch log-probs only."""
    full = {}
    for name, dc, ratio in [("dpo", -3.0, 4.0), ("adadpo", 0.5, 1.0)]:
        rows = curve("probe/chosen_logp", [-60 + dc * i / 9 for i in range(10)])
        rows += curve("probe/rejected_logp", [-70 - i for i in range(10)])
        rows += curve("probe/others_logp", [-100 - 0.1 * i for i in range(10)])
        rows += curve("diag/logit_grad_ratio", [ratio * (1 + i / 150) for i in range(150)])
        rows += curve("balance/kappa_mean", [1.0, 1.2]) if name == "adadpo" else []
        rows.append({"step": 3, "eval/loss": 0.4})
        full[name] = make_run(tmp_path, name, config={"method": name}, metrics=rows,
                              eval={"label": name, "gold_reward": 1.0 + ratio / 10, "win_rate": 0.6,
                                    "lc_win_rate": float("nan"), "mean_length": 300.0 + 10 * ratio})
    batches = make_run(tmp_path, "batches", config={"method": "gate-dpo"},
                       metrics=curve("logps/chosen", [-50.0, float("nan"), -49.0])
                       + curve("logps/rejected", [-55.0, -58.0])
                       + curve("diag/logit_grad_ratio", [0.0, -1.0, float("nan")]))  # nothing for a log axis
    return [str(full["dpo"]), str(full["adadpo"]), str(batches)]


def test_plot_main_writes_every_panel(runs, tmp_path):
    out = tmp_path / "plots"
    files = plot_main(runs, str(out), keys=["balance/kappa_mean", "not/logged"], overview=False)
    names = [f.name for f in files]
    assert names == ["chosen_logp.png", "rejected_logp.png", "grad_ratio.png", "others_logp.png",
                     "eval_scores.png", "mean_length.png", "key_balance_kappa_mean.png"]
    assert all(f.parent == out and is_png(f) for f in files)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing for a key no run logged


def test_panels_without_data_are_skipped(tmp_path):
    a = make_run(tmp_path, "a", config={"method": "dpo"}, metrics=curve("logps/chosen", [-5.0, -6.0]))
    b = make_run(tmp_path, "b", config={"method": "ipo"}, metrics=curve("loss", [0.7, 0.6]))
    files = plot_main([str(a), str(b)], str(tmp_path / "out"))
    assert [f.name for f in files] == ["chosen_logp.png", "overview.png"]
    assert all(is_png(f) for f in files)
    assert plot_main([str(b)], str(tmp_path / "none")) == []  # no panel, no overview
    with pytest.raises(PoiseError, match="at least one run"):
        plot_main([], str(tmp_path / "none"))


def test_overview_from_folders_with_empty_panels(runs, tmp_path):
    path = plot_overview(runs[2:], tmp_path / "sub" / "overview.png")  # batches only: 4 panels say "no run"
    assert is_png(path)
    img = mpimg.imread(path)
    assert img.shape[1] > 1.5 * img.shape[0]  # a wide 2x3 grid


def test_colours_follow_labels_across_panels(runs):
    loaded = load_runs(runs)
    colors = run_colors(loaded)
    assert len(set(colors.values())) == 3
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3)
    try:
        assert draw_chosen(ax1, loaded, colors) and draw_ratio(ax2, loaded, colors) and draw_eval(ax3, loaded, colors)
        for ax in (ax1, ax2):
            for line in ax.get_lines():
                label = line.get_label()
                if label in colors:
                    assert line.get_color() == colors[label]
        labels = [t.get_text() for t in ax1.get_legend().get_texts()]
        assert labels == ["dpo", "adadpo", "gate-dpo (training batches)"]  # no probe set: batch log-probs
        assert ax2.get_yscale() == "log"
        assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 1.0 for line in ax2.get_lines())
        ratio_labels = [t.get_text() for t in ax2.get_legend().get_texts()]
        assert "gate-dpo" not in ratio_labels  # its ratios are zero, negative or NaN
        bar_colors = {tuple(p.get_facecolor()[:3]) for p in ax3.patches}
        assert bar_colors == {tuple(colors[k][:3]) for k in ("dpo", "adadpo")}
    finally:
        plt.close(fig)


def test_long_curves_are_smoothed_and_short_ones_marked(runs):
    loaded = load_runs(runs[:1])  # dpo: 150 ratio points, 10 probe points
    fig, (ax1, ax2) = plt.subplots(1, 2)
    try:
        draw_ratio(ax2, loaded, run_colors(loaded))
        raw, smooth = [ln for ln in ax2.get_lines() if ln.get_linestyle() != "--"]
        assert len(raw.get_xdata()) == 150 and raw.get_alpha() < 0.5
        assert len(smooth.get_xdata()) == 150 - 3 + 1 and smooth.get_label() == "dpo"
        draw_chosen(ax1, loaded, run_colors(loaded))
        (line,) = ax1.get_lines()
        assert line.get_marker() == "o" and list(line.get_ydata())[-1] == pytest.approx(-63.0)
    finally:
        plt.close(fig)


def test_panel_names_are_the_file_names():
    assert [name for name, _ in PANELS] == ["chosen_logp", "rejected_logp", "grad_ratio", "others_logp",
                                            "eval_scores", "mean_length"]


def test_seeds_are_drawn_as_a_mean_and_a_band(tmp_path):
    """Three seeds of one method in one cell: one line (their mean) and one band (their range), one
    legend entry; a run without seeds stays a line of its own."""
    from matplotlib.collections import PolyCollection

    dirs = []
    for seed, shift in enumerate((-1.0, 0.0, 1.0)):
        dirs.append(make_run(tmp_path, f"dpo-{seed}", config={"method": "dpo"},
                             metrics=curve("probe/chosen_logp", [-60 + shift + i for i in range(5)]),
                             eval={"label": "dpo", "cell": "c", "seed": seed}))
    dirs.append(make_run(tmp_path, "alone", config={"method": "adadpo"},
                         metrics=curve("probe/chosen_logp", [-50.0, -49.0]), eval={"label": "adadpo"}))
    runs = load_runs(dirs)
    fig, ax = plt.subplots()
    assert draw_chosen(ax, runs, run_colors(runs))
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["dpo (mean of 3 seeds; band: their range)", "adadpo"]
    assert list(lines[0].get_ydata()) == [-60.0, -59.0, -58.0, -57.0, -56.0]  # the mean of the three seeds
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(-61.0) and ys.max() == pytest.approx(-55.0)
    plt.close(fig)
