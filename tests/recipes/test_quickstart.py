"""The quickstart end to end at a toy size: data, SFT, every method, evaluation, report and plots.
(The full-size run is the README's first command; its timing is in docs/results.md.)"""

import hashlib
import json

import poise.recipes.quickstart as qs
import poise.testbed.task
from poise.recipes.quickstart import Options, run_quickstart


def snapshot(folder):
    """path -> (sha256, mtime_ns) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_quickstart_small(tmp_path, capsys, monkeypatch):
    o = Options(out=str(tmp_path / "qs"), sft_prompts=96, sft_epochs=1, pairs=48, epochs=1, eval_prompts=16,
                probe_prompts=8)
    root = tmp_path / "qs"
    report = run_quickstart(o)
    text = report.read_text()
    for label, *_ in o.methods:
        assert f"| {label} |" in text
        ev = json.loads((root / "runs" / label / "eval.json").read_text())
        assert 0 <= ev["gold_reward"] <= 1 and 0 <= ev["win_rate"] <= 1 and "lc_win_rate" in ev
        assert ev["label"] == label and "kl_to_reference" in ev
    assert (root / "plots" / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "quickstart finished" in capsys.readouterr().out

    # resumable: a second call reuses every finished piece (the base model, the SFT run, each method's
    # run with its eval.json): nothing is built, trained or evaluated again, no file of theirs is
    # touched, and the report comes out the same.
    before = {d: snapshot(root / d) for d in ("base", "sft", "runs")}
    data = {k: v[0] for k, v in snapshot(root / "data").items()}

    def refuse(what):
        def f(*a, **kw):
            raise AssertionError(f"the rerun did {what} again")
        return f

    with monkeypatch.context() as m:
        m.setattr(qs, "train", refuse("training"))
        m.setattr(qs, "evaluate_run", refuse("an evaluation"))
        m.setattr(poise.testbed.task, "save_testbed_model", refuse("the base model"))
        again = run_quickstart(o)
    assert again == report and again.read_text() == text
    assert {d: snapshot(root / d) for d in before} == before
    assert {k: v[0] for k, v in snapshot(root / "data").items()} == data  # the same data, rewritten
    assert "quickstart finished" in capsys.readouterr().out
