"""Every write is atomic and a failure to write is a clean stop (docs/reliability.md): a full disk or a
failing torch writer during a checkpoint or the final model save exits 2 through ``poise train`` with a
message naming the path, the cause and the fix, keeps the previous checkpoint and the previous model, and
leaves no temporary folder; the small writes (reference cache, eval/report/plot files) go through
poise/fsutil.py."""

import errno
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import PreTrainedModel

from poise import fsutil
from poise.cli import main
from poise.errors import PoiseError

TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                          "data/0: file write failed")


def cfg_file(make_cfg, tmp_path, **kw):
    cfg = make_cfg(method="dpo", save_steps=1, diagnostics=False, **kw).to_dict()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Path(cfg["output_dir"])


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if ".tmp" in p.name or ".old" in p.name)


def fail_final_model_save(monkeypatch, error):
    real = PreTrainedModel.save_pretrained

    def save(self, folder, *a, **kw):
        if Path(folder).name.startswith(".model.tmp-"):
            Path(folder, "model.safetensors").write_bytes(b"half")  # a half-written file, then the failure
            raise error
        return real(self, folder, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), TORCH_FULL],
                         ids=["enospc", "torch-writer"])
def test_a_failed_final_model_save_keeps_the_previous_model(make_cfg, tmp_path, monkeypatch, capsys, error):
    path, run_dir = cfg_file(make_cfg, tmp_path, max_steps=2)
    assert main(["train", str(path)]) == 0
    before = load_file(str(run_dir / "model" / "model.safetensors"))
    capsys.readouterr()
    fail_final_model_save(monkeypatch, error)
    assert main(["train", str(path), "resume=true", "max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "could not write the final model" in err and str(run_dir / "model") in err
    assert ("No space left on device" if isinstance(error, OSError) else "PytorchStreamWriter failed") in err
    assert "Free space" in err and "resume=true" in err and "Traceback" not in err
    after = load_file(str(run_dir / "model" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert leftovers(run_dir) == []
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()  # the work is kept: a resume finishes it
    monkeypatch.undo()
    assert main(["train", str(path), "resume=true", "max_steps=3"]) == 0
    assert (run_dir / "model" / "config.json").is_file() and leftovers(run_dir) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), TORCH_FULL],
                         ids=["enospc", "torch-writer"])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(make_cfg, tmp_path, monkeypatch, capsys, error):
    path, run_dir = cfg_file(make_cfg, tmp_path, max_steps=3)
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **kw):
        if Path(str(f)).name == "training_state.pt":
            calls["n"] += 1
            if calls["n"] == 2:
                raise error
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 2" in err and str(run_dir) in err
    assert ("No space left on device" if isinstance(error, OSError) else "PytorchStreamWriter failed") in err
    assert "previous checkpoint is kept" in err and "resume=true" in err and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (run_dir / "model").exists() and leftovers(run_dir) == []


def test_a_runtime_error_that_is_not_a_write_failure_is_not_disguised_as_one():
    assert fsutil.is_write_failure(OSError(errno.EROFS, "Read-only file system"))
    assert fsutil.is_write_failure(TORCH_FULL)
    assert fsutil.is_write_failure(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                                                "StorageFull, message: \"No space left on device\" })"))
    assert not fsutil.is_write_failure(RuntimeError("shape mismatch"))


def test_atomic_file_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "eval.json"
    fsutil.atomic_write_text(target, "old")
    with pytest.raises(OSError):
        with fsutil.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_atomic_folder_keeps_the_old_folder_on_failure_and_replaces_it_on_success(tmp_path):
    final = tmp_path / "model"
    with fsutil.atomic_folder(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_folder(final) as tmp:
            (tmp / "a").write_text("half")
            raise TORCH_FULL
    assert (final / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with fsutil.atomic_folder(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_reference_cache_that_cannot_be_written_is_a_clean_stop(make_cfg, tmp_path, monkeypatch):
    import poise.model.reference as ref

    def full(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ref, "save_file", full)
    path, run_dir = cfg_file(make_cfg, tmp_path, max_steps=1)
    with pytest.raises(PoiseError, match=r"could not write the reference cache file .*No space left on device.*"
                                         r"Free space"):
        main(["--debug", "train", str(path)])
    cache = tmp_path / "cache" / "reference"
    assert [p.name for p in cache.iterdir()] == []


def test_the_report_write_is_atomic_and_a_failure_is_named(tmp_path, monkeypatch):
    from poise.eval import report

    monkeypatch.setattr(report, "build_report", lambda runs, baseline: "# report\n")
    monkeypatch.setattr(report, "load_runs", lambda dirs: [])
    out = tmp_path / "r" / "report.md"
    report.report_main(["x"], str(out))
    assert out.read_text() == "# report\n" and sorted(p.name for p in out.parent.iterdir()) == ["report.md"]

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "fsync_file", full)
    with pytest.raises(PoiseError, match=r"could not write the report .*report.md \(No space left on device\)"):
        report.report_main(["x"], str(out))
    assert out.read_text() == "# report\n" and sorted(p.name for p in out.parent.iterdir()) == ["report.md"]
