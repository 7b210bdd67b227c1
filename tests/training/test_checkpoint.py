"""Checkpoints: written whole or not at all, verified by checksum on load, a damaged one skipped."""

import torch

from poise.model.tiny import build_tiny_model
from poise.training.checkpoint import latest_good, load_training_state, save_checkpoint, verify


def save(run, step, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(run, step, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                           trainer_state={"step": step, "objective": {"gate": {"tau": 0.1, "seen": []}}}, keep=3)


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    model = build_tiny_model(40, hidden_size=16, num_layers=1)
    first, second = save(tmp_path, 1, model), save(tmp_path, 2, model)
    assert latest_good(tmp_path) == second and verify(second) is None
    weights = second / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum" in verify(second)
    with caplog.at_level("WARNING", logger="poise"):
        assert latest_good(tmp_path) == first
    assert any("damaged" in r.getMessage() for r in caplog.records)
    state, tstate = load_training_state(first)  # weights_only=True load of optimizer, scheduler, RNG
    assert tstate["objective"]["gate"]["tau"] == 0.1 and "optimizer" in state


def test_half_written_checkpoint_is_invisible_and_pruned(tmp_path):
    model = build_tiny_model(40, hidden_size=16, num_layers=1)
    save(tmp_path, 1, model)
    half = tmp_path / "checkpoints" / ".tmp-step-00000002-999"
    half.mkdir()
    (half / "trainer_state.json").write_text("{")
    assert latest_good(tmp_path).name == "step-00000001"
    save(tmp_path, 3, model)
    assert not half.exists()
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-00000001", "step-00000003"]
