"""Errors on the command line: one paragraph naming the file, row and field, exit code 2, no Python
traceback (``--debug`` shows it), and no run folder left behind."""

import json
import subprocess
import sys

import pytest

from poise.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=32).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run(*args):
    return subprocess.run([sys.executable, "-m", "poise", *args], capture_output=True, text=True, timeout=120)


def run_here(capsys, *args):
    """The CLI's main() in this process (faster than a subprocess; same code path)."""
    from poise.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def cfg(tmp_path, model_dir, data):
    (tmp_path / "d.jsonl").write_text(data)
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                 f"cache_dir: {tmp_path / 'cache'}\n"
                 "method: dpo\nbatch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\n")
    return p


GOOD = json.dumps({"prompt": "the cat", "chosen": " sat", "rejected": " ran"}) + "\n"


@pytest.mark.parametrize("data,expect", [
    (GOOD + '{"prompt": "a", "chosen": "b"\n', ["d.jsonl", "line 2", "JSON"]),
    (GOOD + json.dumps({"prompt": "a", "chosen": " x", "rejected": " x"}) + "\n", ["line 2", "identical"]),
    (GOOD + json.dumps({"prompt": "a", "chosen": "  ", "rejected": " x"}) + "\n", ["line 2", "chosen"]),
    (GOOD + json.dumps({"prompt": "a", "chosen": 3, "rejected": " x"}) + "\n", ["line 2", "chosen"]),
])
def test_bad_rows(tmp_path, model_dir, data, expect, capsys):
    code, err = run_here(capsys, "train", str(cfg(tmp_path, model_dir, data)))
    assert code == 2, err
    for word in expect:
        assert word in err, err
    assert not (tmp_path / "run").exists()


def test_skip_mode_counts_rows(tmp_path, model_dir, caplog):
    from poise.cli import main

    data = GOOD * 2 + json.dumps({"prompt": "a", "chosen": " x", "rejected": " x"}) + "\n"
    with caplog.at_level("INFO", logger="poise"):
        assert main(["train", str(cfg(tmp_path, model_dir, data)), "on_bad_row=skip"]) == 0
    assert any("kept 2 of 3 rows; skipped 1" in r.getMessage() for r in caplog.records)


def test_real_command_line_has_no_traceback_unless_debug(tmp_path, model_dir):
    path = str(cfg(tmp_path, model_dir, GOOD + "{broken\n"))
    out = run("train", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "line 2" in out.stderr
    out = run("--debug", "train", path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def _broken(args):
    raise ValueError("something poise did not expect\nsecond line")


def test_an_internal_error_says_it_is_a_bug_and_where_the_log_is(tmp_path, monkeypatch, capsys):
    import tempfile

    import poise.cli as cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "ls", (_broken, *cli.COMMANDS["ls"][1:]))
    monkeypatch.setitem(sys.modules, "poise.training.runfolder", None)  # no run folder opened by this command
    assert cli.main(["ls"]) == 1
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    logs = list(tmp_path.glob("poise-error-*.log"))
    assert len(logs) == 1
    assert first == ("poise: internal error (a bug in poise, not in your input): ValueError: something poise did "
                     f"not expect. The full traceback is in {logs[0]}; please report it.")
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "_broken" in text and "second line" in text
    assert "Traceback (most recent call last)" in err  # still shown, after the line
    with pytest.raises(ValueError, match="something poise did not expect"):
        cli.main(["--debug", "ls"])


def test_an_internal_error_in_a_run_goes_to_the_run_folder(tmp_path, monkeypatch, capsys):
    import poise.cli as cli
    import poise.training.runfolder as runfolder

    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def broken(args):
        runfolder.begin(run_dir)
        raise KeyError("missing")

    monkeypatch.setitem(cli.COMMANDS, "ls", (broken, *cli.COMMANDS["ls"][1:]))
    assert cli.main(["ls"]) == 1
    logs = list(run_dir.glob("poise-error-*.log"))
    assert len(logs) == 1 and "KeyError: 'missing'" in logs[0].read_text()
    assert capsys.readouterr().err.splitlines()[0].endswith(f"The full traceback is in {logs[0]}; please report it.")


def test_the_command_line_loads_torch_only_inside_main():
    """`import poise.cli` (what the console script does before calling main) loads neither torch nor the
    trainer: every heavy import happens inside main(), whose handler turns a Ctrl-C at any moment of
    loading into exit 130 and one line instead of a KeyboardInterrupt traceback."""
    import subprocess
    import sys

    code = "import sys, poise, poise.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
