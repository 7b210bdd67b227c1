"""poise.eval.report: run folders read leniently, tables with the right numbers and winners."""

from __future__ import annotations

import pytest
from helpers import curve, make_run

from poise.errors import PoiseError
from poise.eval.report import (
    beats_counts,
    comparison_row,
    comparison_table,
    grid_table,
    load_run,
    load_runs,
    report_main,
    summary_sentences,
)

# LC win rate and gold reward per cell and method; dpo is missing from cell "e".
GRID = {
    "a": {"dpo": (0.50, 1.0), "adadpo": (0.60, 1.5), "gate-dpo": (0.40, 0.5)},
    "b": {"dpo": (0.50, 1.0), "adadpo": (0.55, 0.9), "gate-dpo": (0.45, 1.1)},
    "c": {"dpo": (0.50, 1.0), "adadpo": (0.52, 1.2), "gate-dpo": (0.60, 0.9)},
    "d": {"dpo": (0.50, 1.0), "adadpo": (0.45, 0.8), "gate-dpo": (None, 0.9)},
    "e": {"adadpo": (0.70, 2.0), "gate-dpo": (0.80, 1.0)},
}


@pytest.fixture
def grid_runs(tmp_path):
    dirs = []
    for cell, methods in GRID.items():
        for method, (lc, gold) in methods.items():
            ev = {"method": method, "label": method, "cell": f"lr={cell},beta=0.1", "gold_reward": gold}
            if lc is not None:
                ev["lc_win_rate"] = lc
            dirs.append(make_run(tmp_path, f"{method}-{cell}", config={"method": method}, eval=ev))
    return load_runs(dirs)


def test_label_from_eval_then_config_then_folder(tmp_path):
    a = make_run(tmp_path, "a", config={"method": "adadpo"}, eval={"label": "adadpo (floor 1)"})
    b = make_run(tmp_path, "b", config={"method": "adadpo", "ada_floor": 1.0, "beta": 0.1,
                                        "learning_rate": 5e-7, "balance": []})
    c = make_run(tmp_path, "c", metrics=curve("loss", [1.0]))
    d = make_run(tmp_path, "d", config={"method": "dpo", "balance": ["gate"]})
    assert load_run(a).label == "adadpo (floor 1)"
    assert load_run(b).label == "adadpo (ada_floor=1, beta=0.1)"  # learning_rate is a trainer setting
    assert load_run(c).label == "c"
    assert load_run(d).label == "dpo+gate"


def test_load_runs_makes_labels_unique(tmp_path):
    x = make_run(tmp_path, "x", config={"method": "dpo", "learning_rate": 5e-6, "seed": 0})
    y = make_run(tmp_path, "y", config={"method": "dpo", "learning_rate": 1e-6, "seed": 0})
    z1 = make_run(tmp_path, "z1", config={"method": "ipo"})
    z2 = make_run(tmp_path, "z2", config={"method": "ipo"})
    labels = [r.label for r in load_runs([x, y, z1, z2])]
    assert labels == ["dpo [learning_rate=5e-06]", "dpo [learning_rate=1e-06]", "ipo <z1>", "ipo <z2>"]


def test_not_a_run_folder(tmp_path):
    with pytest.raises(PoiseError, match="not a run folder"):
        load_run(tmp_path)
    with pytest.raises(PoiseError, match="not a run folder"):
        load_run(tmp_path / "missing")
    bad = make_run(tmp_path, "bad", eval={})
    (bad / "eval.json").write_text("{not json")
    with pytest.raises(PoiseError, match="eval.json"):
        load_run(bad)


def test_changes_are_last_minus_first(tmp_path):
    rows = curve("probe/chosen_logp", [-10.0, -11.0, -13.2]) + curve("logps/chosen", [-50.0, -40.0])
    rows += curve("logps/rejected", [-20.0, -25.5]) + curve("probe/others_logp", [-30.0, -29.0, -31.5])
    rows += curve("diag/logit_grad_ratio", [1.0, 2.0, 6.0])
    run = load_run(make_run(tmp_path, "r", config={"method": "dpo"}, metrics=rows))
    nums = comparison_row(run)
    assert nums["Δ chosen logp (nats)"] == pytest.approx(-3.2)  # the probe set wins over logps/chosen
    assert nums["Δ rejected logp (nats)"] == pytest.approx(-5.5)  # no probe: the training batches
    assert nums["Δ others logp (nats)"] == pytest.approx(-1.5)
    assert nums["median grad ratio (rej/chosen)"] == pytest.approx(2.0)  # robust to one huge step
    assert nums["gold reward"] is None
    table = comparison_table([run])
    row = table.splitlines()[2]
    assert row.startswith("| dpo | - | - |")
    assert "| -3.20 | -5.50 | -1.50 | 2.000 |" in row


def test_nan_missing_and_broken_lines_are_tolerated(tmp_path):
    rows = curve("probe/chosen_logp", [-5.0, float("nan"), -4.0, None, float("inf")])
    rows.insert(2, {"step": 2, "eval/loss": 0.5})  # an eval-only row
    raw = ['{"step": 9, "probe/chosen_logp": NaN}', '{"step": 10, "probe/chosen_lo']  # cut short
    d = make_run(tmp_path, "r", config={"method": "gate-dpo"}, metrics=rows, raw_lines=raw,
                 eval={"gold_reward": None, "win_rate": float("nan"), "lc_win_rate": "n/a", "cell": "c1"})
    run = load_run(d)
    assert comparison_row(run)["Δ chosen logp (nats)"] == pytest.approx(1.0)
    assert run.score("win_rate") is None and run.score("gold_reward") is None
    text = report_main([str(d)], None)
    assert "gate-dpo's chosen log-prob rose by 1.0 nats" in text
    assert "no dpo run in any cell" in text
    empty = make_run(tmp_path, "empty", config={"method": "dpo"}, metrics=[])
    assert "No numbers to compare" in report_main([str(empty)], None)


def test_grid_winners_and_counts(grid_runs):
    counts = beats_counts(grid_runs, "dpo")
    assert counts[("adadpo", "lc_win_rate")] == (3, 4)
    assert counts[("adadpo", "gold_reward")] == (2, 4)
    assert counts[("gate-dpo", "lc_win_rate")] == (1, 3)  # no LC win rate in cell d
    assert counts[("gate-dpo", "gold_reward")] == (1, 4)
    text = grid_table(grid_runs)
    assert "adadpo beats dpo on LC win rate in 3 of 4 cells" in text
    assert "adadpo beats dpo on gold reward in 2 of 4 cells" in text
    assert "gate-dpo beats dpo on LC win rate in 1 of 3 cells" in text
    assert "gate-dpo beats dpo on gold reward in 1 of 4 cells" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| lr=")}
    assert rows["lr=a,beta=0.1"].endswith("| adadpo (1.500) | adadpo (0.600) |")
    assert rows["lr=c,beta=0.1"].endswith("| adadpo (1.200) | gate-dpo (0.600) |")
    assert rows["lr=d,beta=0.1"].endswith("| dpo (1.000) | dpo (0.500) |")
    assert rows["lr=e,beta=0.1"].endswith("| adadpo (2.000) | gate-dpo (0.800) |")
    assert "| dpo = gate-dpo (0.500) |" not in text


def test_grid_against_another_baseline_and_ties(tmp_path):
    dirs = [make_run(tmp_path, f"{m}{c}", eval={"method": m, "cell": c, "gold_reward": g, "lc_win_rate": 0.5})
            for c, m, g in [("1", "ipo", 1.0), ("1", "dpo", 1.0), ("2", "ipo", 2.0), ("2", "dpo", 1.0)]]
    runs = load_runs(dirs)
    text = grid_table(runs, baseline="ipo")
    assert "dpo beats ipo on gold reward in 0 of 2 cells" in text
    assert "dpo beats ipo on LC win rate in 0 of 2 cells" in text
    assert "| dpo = ipo (1.000) | dpo = ipo (0.500) |" in text  # ties name every winner
    tally = summary_sentences(runs)
    assert "On gold reward, ipo wins 2 of 2 cells, dpo 1 (ties count for each)." in tally


def test_grid_without_cells(tmp_path):
    run = load_run(make_run(tmp_path, "r", config={"method": "dpo"}, eval={"gold_reward": 1.0}))
    assert "no grid comparison" in grid_table([run])


def test_two_runs_of_one_method_in_a_cell_compete_by_label(tmp_path):
    dirs = [make_run(tmp_path, f"{n}-{c}", eval={"method": m, "label": n, "cell": c, "lc_win_rate": v + d})
            for c, d in [("c1", 0.0), ("c2", 0.01)]
            for n, m, v in [("dpo", "dpo", 0.5), ("ada-f1", "adadpo", 0.6), ("ada-f0", "adadpo", 0.4)]]
    runs = load_runs(dirs)
    assert runs[1].label == "ada-f1 [c1]" and runs[1].name == "ada-f1"
    counts = beats_counts(runs)
    assert counts == {("ada-f0", "lc_win_rate"): (0, 2), ("ada-f1", "lc_win_rate"): (2, 2)}


def test_report_main_writes_the_report(tmp_path):
    dpo = make_run(tmp_path, "dpo", config={"method": "dpo", "beta": 0.1},
                   metrics=curve("probe/chosen_logp", [-20.0, -21.0, -23.2])
                   + curve("diag/chosen_below_ref_frac", [0.1, 0.8]),
                   eval={"label": "DPO", "gold_reward": 0.5, "lc_win_rate": 0.4, "kl_to_reference": 3.0,
                         "mean_length": 400.0})
    gate = make_run(tmp_path, "gate", config={"method": "gate-dpo"},
                    metrics=curve("probe/chosen_logp", [-20.0, -19.6]) + curve("diag/logit_grad_ratio", [1.0]),
                    eval={"label": "gate-dpo", "gold_reward": 0.9, "lc_win_rate": 0.55,
                          "kl_to_reference": 1.0, "mean_length": 300.0})
    out = tmp_path / "reports" / "report.md"
    text = report_main([str(dpo), str(gate)], str(out))
    assert out.read_text() == text
    for heading in ("# poise report", "## Comparison", "## What the numbers say"):
        assert heading in text
    assert "## Grid" not in text
    assert "- DPO's chosen log-prob fell by 3.2 nats; gate-dpo's rose by 0.4" in text
    assert "gate-dpo has the highest gold reward (0.900); DPO the lowest (0.500)." in text
    assert "DPO has the largest KL to the reference (3.000); gate-dpo the smallest (1.000)." in text
    assert "DPO has the longest mean length (400); gate-dpo the shortest (300)." in text
    assert "80% of DPO's chosen responses were below the reference" in text
    assert "rejected over chosen (above 1: the push on the rejected side dominates): 1 in gate-dpo." in text
    with pytest.raises(PoiseError):
        report_main([], None)


def test_report_with_grid_has_counts(grid_runs, tmp_path):
    text = report_main([str(r.path) for r in grid_runs], None)
    assert "## Grid" in text
    assert "- adadpo beats dpo on LC win rate in 3 of 4 cells\n" in text
    assert "- **dpo [lr=a,beta=0.1]**:" in text  # same label, told apart by the cell
    assert "On LC win rate, adadpo wins 2 of 5 cells, gate-dpo 2, dpo 1 (ties count for each)." in text


def test_seeds_give_means_intervals_and_significance_by_hand(tmp_path):
    """Two cells, dpo and adadpo over 3 seeds. Cell a: adadpo - dpo = +0.10, +0.12, +0.08 (mean 0.10, sd
    0.02, half-width t(2) * 0.02 / sqrt(3) = 4.303 * 0.011547 = 0.0497: significant); cell b: +0.1, -0.1,
    +0.03 (mean 0.01: not)."""
    from poise.eval.report import mean_ci, seeds_table

    lc = {("a", "dpo"): [0.50, 0.50, 0.50], ("a", "adadpo"): [0.60, 0.62, 0.58],
          ("b", "dpo"): [0.50, 0.55, 0.45], ("b", "adadpo"): [0.60, 0.45, 0.48]}
    dirs = []
    for (cell, method), values in lc.items():
        for seed, v in enumerate(values):
            ev = {"method": method, "label": method, "cell": cell, "seed": seed, "lc_win_rate": v,
                  "gold_reward": v}
            dirs.append(make_run(tmp_path, f"{cell}-{method}-{seed}", config={"method": method}, eval=ev))
    runs = load_runs(dirs)
    m, h = mean_ci([0.10, 0.12, 0.08])
    assert m == pytest.approx(0.10) and h == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-4)
    assert beats_counts(runs)[("adadpo", "lc_win_rate")] == (2, 2)  # the means: 0.60 > 0.50, 0.51 > 0.50
    assert beats_counts(runs, significant=True)[("adadpo", "lc_win_rate")] == (1, 2)
    text = seeds_table(runs)
    assert "| a | adadpo | 3 | 0.600 ± 0.050 | +0.10 ± 0.050 * |" in text
    assert "| b | adadpo | 3 | 0.510 ±" in text and "+0.01 ±" in text
    report = report_main([str(d) for d in dirs], None)
    assert "## Seeds" in report and "in 2 of 2 cells (significantly, 95% over seeds: in 1)" in report


def test_a_sweep_with_seeds_runs_each_cell_once_per_seed(tmp_path):
    from poise.errors import ConfigError
    from poise.eval.sweep import load_sweep

    path = tmp_path / "s.yaml"
    base = "output_dir: out\nbase: {model: m, train_file: t.jsonl}\nmethods: {dpo: {method: dpo}}\ngrid: {beta: [0.1, 0.2]}\n"
    path.write_text(base + "seeds: [0, 1, 2]\n")
    _, cells = load_sweep(path)
    assert [c.id for c in cells][:3] == ["beta=0.1/dpo/seed-0", "beta=0.1/dpo/seed-1", "beta=0.1/dpo/seed-2"]
    assert [c.config["seed"] for c in cells[:3]] == [0, 1, 2] and {c.cell for c in cells} == {"beta=0.1", "beta=0.2"}
    for bad in ("seeds: 3\n", "seeds: [0, 0]\n", "seeds: [a]\n"):
        path.write_text(base + bad)
        with pytest.raises(ConfigError, match="seeds is a list of distinct integers"):
            load_sweep(path)


def test_seeds_group_by_the_sweep_label_not_the_method(tmp_path):
    """adadpo and adadpo-floor1 (both method adadpo) over 2 seeds: two entrants with their own seeds."""
    from poise.eval.report import Seeds, _entrants

    dirs = []
    for label, base in (("dpo", 0.5), ("adadpo", 0.6), ("adadpo-floor1", 0.7)):
        for seed in (0, 1):
            dirs.append(make_run(tmp_path, f"{label}-{seed}", config={"method": label.split("-")[0]},
                                 eval={"method": label.split("-")[0], "label": label, "cell": "c", "seed": seed,
                                       "lc_win_rate": base + 0.01 * seed, "gold_reward": base}))
    entrants = _entrants(load_runs(dirs))["c"]
    assert sorted(entrants) == ["adadpo", "adadpo-floor1", "dpo"]
    assert all(isinstance(e, Seeds) and len(e.runs) == 2 for e in entrants.values())
    assert entrants["adadpo-floor1"].score("lc_win_rate") == pytest.approx(0.705)
