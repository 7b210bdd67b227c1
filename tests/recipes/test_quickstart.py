"""The quickstart end to end at a toy size: data, SFT, every method, evaluation, report and plots.
(The full-size run is the README's first command; its timing is in docs/results.md.)"""

import json

from poise.recipes.quickstart import Options, run_quickstart


def test_quickstart_small(tmp_path, capsys):
    o = Options(out=str(tmp_path / "qs"), sft_prompts=96, sft_epochs=1, pairs=48, epochs=1, eval_prompts=16,
                probe_prompts=8)
    report = run_quickstart(o)
    text = report.read_text()
    for label, *_ in o.methods:
        assert f"| {label} |" in text
        ev = json.loads((tmp_path / "qs" / "runs" / label / "eval.json").read_text())
        assert 0 <= ev["gold_reward"] <= 1 and 0 <= ev["win_rate"] <= 1 and "lc_win_rate" in ev
        assert ev["label"] == label and "kl_to_reference" in ev
    assert (tmp_path / "qs" / "plots" / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "quickstart finished" in capsys.readouterr().out
    # resumable: a second call reuses every finished piece
    run_quickstart(o)
