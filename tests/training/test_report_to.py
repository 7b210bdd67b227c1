"""report_to: what TensorBoard and W&B receive is what metrics.jsonl holds, read back from the files
each writes (TensorBoard event files; a W&B offline run). The logging extra installs both:
pip install 'poise[logging]'. A back end that is not installed is a clear error before the run starts
(tests/test_bad_inputs.py::test_report_to_without_its_package_names_the_extra)."""

import json
import struct

import pytest

from poise.training.loop import train
from poise.training.runlog import read_metrics

LOSS_STEPS = 3


def test_tensorboard_receives_every_metric(make_cfg):
    pytest.importorskip("tensorboard", reason="the logging extra is not installed: pip install 'poise[logging]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(make_cfg(method="dpo", max_steps=LOSS_STEPS, report_to=["tensorboard"]))
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in rows] == list(range(1, LOSS_STEPS + 1))
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert {"rewards/margins", "grad_norm", "learning_rate"} <= set(acc.Tags()["scalars"])


def _wandb_records(path):
    """The records of a W&B run file (LevelDB-log framing: 7-byte header, 32 KiB blocks, each record
    chunk with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + n], pos + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_receives_every_metric_and_the_config(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the logging extra is not installed: pip install 'poise[logging]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    result = train(make_cfg(method="dpo", max_steps=LOSS_STEPS, report_to=["wandb"]))
    (run_file,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    logged = [h for h in history if "loss" in h]
    assert [h["_step"] for h in logged] == [r["step"] for r in rows] == list(range(1, LOSS_STEPS + 1))
    assert [h["loss"] for h in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert config.get("method") == "dpo" and config.get("max_steps") == LOSS_STEPS, config
