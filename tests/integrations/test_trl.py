"""poise.integrations.trl: TRL's DPOTrainer with a poise objective, on a tiny model (CPU, a few steps).

The wiring is checked against two independent computations: TRL's own sigmoid loss (plain DPO must
give TRL's number on the same batch) and poise's own log-prob engine (AdaDPO's and Balanced-DPO's
parameter gradients must be those of ``poise.model.logprobs.token_logps`` + the objective). The same JSONL
files train in TRL and in ``poise train`` and tokenize to the same pairs.
"""

import json
import math
import random
import sys

import pytest

trl = pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'poise[trl]'); its integration "
                          "tests need it")

import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402

import poise  # noqa: E402
from poise.api import train as poise_train  # noqa: E402
from poise.data import load_rows, tokenize_rows  # noqa: E402
from poise.errors import ConfigError  # noqa: E402
from poise.integrations.trl import STATE_FILE, DPOConfig, DPOTrainer  # noqa: E402
from poise.model.logprobs import pair_logps, sequence_logps, token_logps  # noqa: E402
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

WORDS = "the cat sat on a mat and dog ran to big red box when it was warm".split()


def _rows(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))),
             "chosen": " " + " ".join(rng.choices(WORDS[:8], k=rng.randint(2, 5))),
             "rejected": " " + " ".join(rng.choices(WORDS[8:], k=rng.randint(3, 8)))} for _ in range(n)]


def _conversational(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, tok, Dataset.from_list(_rows(8))


def _args(tmp_path, cls=DPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, logging_steps=1,
                gradient_checkpointing=False, seed=0, beta=0.1)
    base.update(kw)
    return cls(**base)


def _trainer(tiny, tmp_path, cls=DPOTrainer, config=DPOConfig, **kw):
    root, tok, ds = tiny
    return cls(model=str(root / "model"), args=_args(tmp_path, config, **kw), train_dataset=ds, processing_class=tok)


def _batch(trainer, n=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def _perturb(model, seed=1, scale=0.05):
    """Move the policy away from the reference, the same way for every trainer (in training mode,
    where the trainers log their metrics under "train")."""
    model.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_loss_equals_trls_sigmoid_loss(tiny, tmp_path, precompute):
    """The same batch, policy and reference: poise's dpo through the integration gives TRL's loss and
    TRL's reward margins (so the log-probs, masks and reference are wired as TRL wires them)."""
    ours = _trainer(tiny, tmp_path, poise_method="dpo", precompute_ref_log_probs=precompute)
    theirs = _trainer(tiny, tmp_path, cls=trl.DPOTrainer, config=trl.DPOConfig, precompute_ref_log_probs=precompute)
    _perturb(ours.model)
    _perturb(theirs.model)
    batch = _batch(ours)
    with torch.no_grad():
        a = ours.compute_loss(ours.model, batch)
        b = theirs.compute_loss(theirs.model, batch)
    assert abs(a.item() - math.log(2)) > 1e-3  # the policy differs from the reference
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    for key in ("rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert ours._metrics["train"][key][-1] == pytest.approx(theirs._metrics["train"][key][-1], rel=1e-5, abs=1e-6)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def _independent_loss(trainer, batch, method):
    """poise's own engine on the same token ids: token_logps (with sum_p2) + the objective."""
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    pol = token_logps(trainer.model, ids, att, comp, stats=["sum_p2"])
    ref = sequence_logps(trainer.ref_model, ids, att, comp)
    b = ids.shape[0] // 2
    return poise.objective(method, beta=0.1)(pair_logps(pol, ref_sums=(ref[:b], ref[b:]))).loss


@pytest.mark.parametrize("method", ["adadpo", "balanced-dpo"])
def test_gradient_is_poises_balanced_gradient(tiny, tmp_path, method):
    """The parameter gradient through TRL is that of poise's objective on poise's own log-probs, and
    it is not DPO's (kappa and the branch weights are far from 1 after the perturbation)."""
    trainer = _trainer(tiny, tmp_path, poise_method=method)
    _perturb(trainer.model, scale=0.2)
    batch = _batch(trainer)
    got = _grads(trainer.model, trainer.compute_loss(trainer.model, batch))
    want = _grads(trainer.model, _independent_loss(trainer, batch, method))
    dpo = _grads(trainer.model, _independent_loss(trainer, batch, "dpo"))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got - want).abs().max()
    assert (want - dpo).norm() > 1e-3 * dpo.norm()


@pytest.mark.parametrize("method", ["adadpo", "gate-dpo", "dpo"])
def test_training_steps(tiny, tmp_path, method):
    kw = {"gate_calibration_pairs": 4} if method == "gate-dpo" else None
    trainer = _trainer(tiny, tmp_path, poise_method=method, poise_kwargs=kw)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3 and all(math.isfinite(r["loss"]) for r in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    assert {"rewards/margins", "logps/chosen", "nll_loss", "entropy", "mean_token_accuracy"} <= set(logs[-1])
    if method == "adadpo":
        assert "balance/kappa_mean" in logs[-1] and logs[-1]["balance/kappa_mean"] > 0
    if method == "gate-dpo":  # calibrated before step 1 on the first 4 pairs; the gate acts from step 1
        tau = trainer.poise_state["gate"]["tau"]
        assert tau > 0 and len(trainer.poise_state["gate"]["seen"]) == 4
        assert all(r["gate/tau"] == pytest.approx(tau, rel=1e-6) for r in logs)
    assert "poise" in trainer.model.model_tags and method in trainer.model.model_tags


def test_gate_state_is_checkpointed_and_restored(tiny, tmp_path):
    kw = dict(poise_method="gate-dpo", poise_kwargs={"gate_calibration_pairs": 4}, save_strategy="steps",
              save_steps=2, max_steps=2)
    first = _trainer(tiny, tmp_path, **kw)
    first.train()
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["gate"]["tau"] == first.poise_state["gate"]["tau"] > 0
    second = _trainer(tiny, tmp_path, **{**kw, "max_steps": 3})
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert second.poise_state["gate"]["tau"] == saved["gate"]["tau"]


def test_settings_poise_would_ignore_are_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="loss_type"):
        _trainer(tiny, tmp_path, loss_type="ipo")
    with pytest.raises(ConfigError, match="label_smoothing in poise_kwargs"):
        _trainer(tiny, tmp_path, label_smoothing=0.1)
    with pytest.raises(ConfigError, match="unknown method 'adadop'.*adadpo"):
        _trainer(tiny, tmp_path, poise_method="adadop")
    with pytest.raises(ConfigError, match="gate_tau"):
        _trainer(tiny, tmp_path, poise_method="adadpo", poise_kwargs={"gate_tau": 0.1})


def test_beta_dpo_is_refused_with_the_poise_trainer_named(tiny, tmp_path):
    """beta-DPO's beta follows the whole step's mean margin: TRL's step has no pre-pass for it."""
    for kw in ({"poise_method": "beta-dpo"}, {"poise_method": "dpo", "poise_kwargs": {"balance": ["dynbeta"]}}):
        with pytest.raises(ConfigError, match="whole optimizer step.*poise train configs/beta-dpo.yaml"):
            _trainer(tiny, tmp_path, **kw)


def test_method_and_hyperparameters_resolution(tiny, tmp_path):
    """Default adadpo with TRL's beta; the trainer's keywords win over the config's fields; balancers
    compose with a base loss; JSON strings (TRL's CLI) are accepted."""
    plain = _trainer(tiny, tmp_path, cls=DPOTrainer, config=trl.DPOConfig, beta=0.05)
    assert plain.poise_objective.name == "dpo+ada" and plain.poise_objective.hyperparameters["beta"] == 0.05
    cfg = _args(tmp_path, poise_method="ipo", poise_kwargs='{"balance": ["gate"], "beta": 0.3}')
    root, tok, ds = tiny
    t = DPOTrainer(model=str(root / "model"), args=cfg, train_dataset=ds, processing_class=tok)
    assert t.poise_objective.name == "ipo+gate" and t.poise_objective.hyperparameters["beta"] == 0.3
    t = DPOTrainer(str(root / "model"), None, cfg, train_dataset=ds, processing_class=tok,
                   poise_method="simpo", poise_kwargs={"beta": 2.5})
    assert t.poise_objective.name == "simpo" and not t.poise_objective.needs_reference


def test_import_without_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "poise.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'poise\[trl\]'"):
        __import__("poise.integrations.trl")


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_same_jsonl_trains_in_trl_and_in_poise(tiny, tmp_path, fmt):
    """One JSONL file: datasets.load_dataset for TRL, train_file for poise. Both tokenize it to the
    same pairs, and both train on it."""
    root, tok, _ = tiny
    rows = _rows(8, seed=3)
    rows = rows if fmt == "standard" else _conversational(rows)
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    trainer = DPOTrainer(model=str(root / "model"), args=_args(tmp_path, max_steps=2), train_dataset=ds,
                         processing_class=tok)
    ours = tokenize_rows(load_rows(str(path)), tok, max_length=1024, max_prompt_length=512).pairs
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset] == \
        [(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in ours]
    trainer.train()
    assert "balance/kappa_mean" in trainer.state.log_history[-2]
    res = poise_train({"model": str(root / "model"), "train_file": str(path), "method": "adadpo",
                           "output_dir": str(tmp_path / "poise-run"), "cache_dir": str(tmp_path / "cache"),
                           "batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
                           "save_steps": 0, "diagnostics": False})
    assert res.steps == 2 and math.isfinite(res.metrics["loss"]) and "balance/kappa_mean" in res.metrics
