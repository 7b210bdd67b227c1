"""poise sweep: every (cell, method) is a run; finished runs are skipped; --list prints commands."""

import json

import pytest
import yaml

from poise.errors import ConfigError
from poise.eval.sweep import load_sweep, sweep_main
from poise.recipes.quickstart import Options, prepare_data, run_sft


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    o = Options(out=str(root), sft_prompts=64, sft_epochs=1, pairs=32, eval_prompts=8, probe_prompts=4)
    files = prepare_data(o, root)
    return files, run_sft(o, root, files)


def write_sweep(tmp_path, files, model):
    spec = {"output_dir": str(tmp_path / "grid"),
            "base": {"model": str(model), "train_file": str(files["pairs"]), "eval_file": str(files["eval"]),
                     "cache_dir": str(tmp_path / "cache"), "max_length": 32, "max_prompt_length": 16,
                     "batch_size": 16, "micro_batch_size": 16, "epochs": 1, "save_steps": 0},
            "methods": {"dpo": {"method": "dpo"}, "gate": {"method": "gate-dpo", "gate_calibration_pairs": 16}},
            "grid": {"beta": [0.1, 0.5]},
            "eval": {"gold": "testbed", "prompts": 8, "max_new_tokens": 6}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_sweep_runs_every_cell_once(testbed, tmp_path, capsys):
    files, model = testbed
    path = write_sweep(tmp_path, files, model)
    runs = sweep_main(str(path))
    assert len(runs) == 4
    ev = json.loads((tmp_path / "grid" / "beta=0.5" / "gate" / "eval.json").read_text())
    assert ev["cell"] == "beta=0.5" and ev["label"] == "gate" and 0 <= ev["lc_win_rate"] <= 1
    mtime = (runs[0] / "eval.json").stat().st_mtime
    sweep_main(str(path))  # resumes: nothing is trained again
    assert (runs[0] / "eval.json").stat().st_mtime == mtime
    sweep_main(str(path), list_only=True)
    assert capsys.readouterr().out.count("--only") == 4


def test_bad_sweeps_fail_before_training(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"methods": {"x": {"method": "dpo", "betta": 1}},
                                 "base": {"model": "m", "train_file": "d"}}))
    with pytest.raises(ConfigError, match="betta"):
        load_sweep(p)
    p.write_text(yaml.safe_dump({"method": {"x": {}}}))
    with pytest.raises(ConfigError, match="unknown"):
        load_sweep(p)


def test_a_sweep_file_with_a_duplicate_key_is_refused_with_the_line(tmp_path):
    """Sweep files go through the config loader: a key given twice is an error naming the line, not a
    silent last-one-wins."""
    from poise.errors import ConfigError
    from poise.eval.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("methods:\n  dpo: {method: dpo}\nbase: {model: m}\nbase: {model: n}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml.*base") as e:
        load_sweep(path)
    assert "line" in str(e.value)
