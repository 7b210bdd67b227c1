"""The one generation routine: left-padded batches, seeded sampling that leaves the global RNG as it
was, the testbed's former seeding reproduced exactly, string prompts tokenized as the data pipeline
does, cut at the first EOS."""

import random

import pytest
import torch

from poise.model.generate import generate, generate_ids, prompt_ids
from poise.model.tiny import build_tiny_tokenizer
from poise.testbed.task import build_testbed_model, build_testbed_tokenizer, make_prompts

PROMPT = "copy: ant bee cat dog ="


@pytest.fixture(scope="module")
def tok():
    return build_testbed_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_testbed_model(tok, seed=0)


def test_generate_greedy_returns_strings_deterministically(model, tok):
    prompts = make_prompts(12, seed=0)
    out = generate(model, tok, prompts, max_new_tokens=5)
    assert len(out) == 12 and all(isinstance(text, str) for text in out)
    assert out == generate(model, tok, prompts, max_new_tokens=5)
    # left padding: batched greedy decoding equals one prompt at a time
    assert out == generate(model, tok, prompts, max_new_tokens=5, batch_size=1)
    assert not model.training


def test_generate_sampling_is_seeded(model, tok):
    prompts = make_prompts(8, seed=1)
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # seeded inside, the global RNG is restored
    assert a == generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a != generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=4)
    with pytest.raises(ValueError):
        generate(model, tok, prompts, max_new_tokens=8, temperature=-1.0)


class _FixedModel(torch.nn.Module):
    """A stand-in whose generate appends fixed token ids to every prompt (and remembers its inputs)."""

    def __init__(self, new_ids):
        super().__init__()
        self.new_ids = torch.tensor(new_ids)
        self.device = torch.device("cpu")
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids, attention_mask, kw))
        return torch.cat([input_ids, self.new_ids.expand(input_ids.shape[0], -1)], dim=1)


def test_generate_cuts_at_eos_and_drops_special_tokens(tok):
    ant, bee = (tok.convert_tokens_to_ids("Ġ" + w) for w in ("ant", "bee"))
    fixed = _FixedModel([ant, tok.pad_token_id, bee, tok.eos_token_id, ant])
    assert generate(fixed, tok, [PROMPT, "sort: ant ram seal ="], max_new_tokens=8) == [" ant bee"] * 2
    # the ids: everything before the first EOS, as generated
    assert generate_ids(fixed, tok, [PROMPT], max_new_tokens=8) == [[ant, tok.pad_token_id, bee]]


def test_the_global_rng_is_left_as_it_was(model, tok):
    """Greedy or sampled, the CPU generator (and Python's) are where the caller left them: the next
    draw is the one it would have been without the call."""
    prompts = make_prompts(6, seed=2)
    for temperature in (0.0, 0.8):
        torch.manual_seed(123)
        random.seed(5)
        expected = torch.rand(4), random.random()
        torch.manual_seed(123)
        random.seed(5)
        generate_ids(model, tok, prompts, max_new_tokens=4, temperature=temperature, seed=9, batch_size=4)
        got = torch.rand(4), random.random()
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_the_same_seed_gives_the_same_completions_whatever_came_before(model, tok):
    prompts = make_prompts(10, seed=3)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=11, batch_size=4)
    a = generate_ids(model, tok, prompts, **kw)
    torch.rand(1000)  # the global stream moves on; the seeded sampling does not depend on it
    b = generate_ids(model, tok, prompts, **kw)
    assert a == b and any(a)
    assert generate_ids(model, tok, prompts, **{**kw, "seed": 12}) != a


def _former_testbed_generate(model, tok, prompts, *, seed, temperature, batch_size, max_new_tokens):
    """The testbed's former ``generate``: torch seeded once with ``seed`` (every generator), the batches
    (the tokenizer's own left padding) run in order, the text cut at EOS and decoded."""
    texts = []
    side = tok.padding_side
    devices = [model.device.index] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            tok.padding_side = "left"
            enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
            tok.padding_side = side
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def test_sampling_reproduces_the_former_testbed_seeding(model, tok):
    """Committed testbed results were sampled by the former seeding: the routine draws the same tokens."""
    prompts = make_prompts(20, seed=4)
    kw = dict(temperature=0.9, seed=5, batch_size=8, max_new_tokens=7)
    model.eval()
    expected = _former_testbed_generate(model, tok, prompts, **kw)
    assert generate(model, tok, prompts, **kw) == expected


def test_string_prompts_are_tokenized_as_the_data_pipeline_does(tok):
    """Left-padded ids and mask; a string prompt gets BOS once, also when it already starts with it
    (a chat rendering does); strings and their ids give the same inputs."""
    fixed = _FixedModel([tok.eos_token_id])
    texts = ["copy: ant =", "<bos>sort: pig ant eel ="]
    assert generate_ids(fixed, tok, texts, max_new_tokens=1) == [[], []]
    ids, mask, kw = fixed.calls[-1]
    short, long = prompt_ids(tok, texts[0]), prompt_ids(tok, texts[1])
    assert long[0] == tok.bos_token_id and long[1] != tok.bos_token_id
    pad = len(long) - len(short)
    assert ids[0].tolist() == [tok.pad_token_id] * pad + list(short) and ids[1].tolist() == list(long)
    assert mask[0].tolist() == [0] * pad + [1] * len(short) and mask[1].tolist() == [1] * len(long)
    assert kw["do_sample"] is False and kw["pad_token_id"] == tok.pad_token_id
    generate_ids(fixed, tok, [short, long], max_new_tokens=1)
    assert torch.equal(fixed.calls[-1][0], ids) and torch.equal(fixed.calls[-1][1], mask)


def test_prompt_ids_without_a_bos_token():
    tok = build_tiny_tokenizer(["ant bee cat"], vocab_size=64, add_bos=False)
    assert prompt_ids(tok, "ant bee") == tuple(tok("ant bee", add_special_tokens=False)["input_ids"])


def test_the_model_mode_is_restored_and_arguments_are_checked(model, tok):
    model.train()
    generate_ids(model, tok, [PROMPT], max_new_tokens=2)
    assert model.training
    model.eval()
    generate_ids(model, tok, [PROMPT], max_new_tokens=2)
    assert not model.training
    assert generate_ids(model, tok, [], max_new_tokens=2) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate_ids(model, tok, [PROMPT], max_new_tokens=2, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_device_rng_is_left_as_it_was_and_the_seeding_is_the_former_one(tok):
    model = build_testbed_model(tok, seed=0).cuda().eval()
    prompts = make_prompts(8, seed=2)
    kw = dict(max_new_tokens=5, temperature=1.0, seed=3, batch_size=4)
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    a = generate(model, tok, prompts, **kw)
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(gpu, torch.cuda.get_rng_state())
    assert a == generate(model, tok, prompts, **kw)
    assert a == _former_testbed_generate(model, tok, prompts, **kw)


# -- the vLLM backend, against a stand-in of vLLM's API ------------------------------------------------


class _FakeVLLM:
    """A stand-in ``vllm`` module: ``SamplingParams`` and ``LLM`` record what they are given; completion k
    of a prompt is ``[its last id, 100 + k, EOS, 7]`` (what follows EOS must be cut)."""

    def __init__(self, eos):
        import types

        fake = self
        self.params, self.llm_kwargs, self.requests, self.closed = [], None, None, False

        class SamplingParams:
            def __init__(self, **kw):
                fake.params.append(kw)
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.requests = prompts
                out = []
                for p, sp in zip(prompts, sampling_params):
                    ids = p["prompt_token_ids"]
                    outputs = [types.SimpleNamespace(token_ids=(ids[-1], 100 + k, eos, 7), text="?")
                               for k in range(sp.kw["n"])]
                    out.append(types.SimpleNamespace(prompt_token_ids=list(ids), outputs=outputs))
                return out

            def __del__(self):
                fake.closed = True

        self.module = types.ModuleType("vllm")
        self.module.SamplingParams, self.module.LLM = SamplingParams, LLM


@pytest.fixture
def fake_vllm(monkeypatch, tok):
    import sys

    fake = _FakeVLLM(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return fake


@pytest.mark.parametrize("temperature", [0.0, None, 0.7])
def test_vllm_gets_the_hf_settings_and_the_same_prompt_ids(fake_vllm, tok, temperature):
    """The SamplingParams equal what the HF path passes to model.generate: temperature (greedy at 0 or
    None), top-p 1 and top-k off, max_new_tokens, EOS; the prompts go as the same token ids."""
    texts = [PROMPT, "sort: ant ram seal ="]
    hf = _FixedModel([tok.eos_token_id])
    generate_ids(hf, tok, texts, max_new_tokens=9, temperature=temperature, seed=4, backend="hf")
    hf_ids, hf_mask, hf_kw = hf.calls[-1]
    generate_ids(None, tok, texts, max_new_tokens=9, temperature=temperature, seed=4, backend="vllm",
                 model_path="some/model")
    assert fake_vllm.llm_kwargs == {"model": "some/model", "dtype": "auto", "seed": 4}
    assert [r["prompt_token_ids"] for r in fake_vllm.requests] == [list(prompt_ids(tok, t)) for t in texts]
    for r, row, mask in zip(fake_vllm.requests, hf_ids, hf_mask):  # HF's left-padded rows, padding dropped
        assert r["prompt_token_ids"] == row[mask.bool()].tolist()
    for p in fake_vllm.params:
        assert p["max_tokens"] == hf_kw["max_new_tokens"] == 9
        assert p["stop_token_ids"] == [hf_kw["eos_token_id"]] == [tok.eos_token_id]
        assert p["n"] == 1 and p["skip_special_tokens"] is True
        if hf_kw["do_sample"]:
            assert p["temperature"] == pytest.approx(hf_kw["temperature"], rel=1e-12)
            assert p["top_p"] == hf_kw["top_p"] == 1.0
            assert p["top_k"] == -1 and hf_kw["top_k"] == 0  # both: no top-k cut
        else:
            assert p["temperature"] == 0.0 and hf_kw["temperature"] is None
    assert len({p["seed"] for p in fake_vllm.params}) == 2  # each prompt its own stream
    assert fake_vllm.closed  # the engine is let go after the call


def test_vllm_completions_come_back_in_the_callers_order(fake_vllm, tok):
    """Copies of a prompt are one request with n = the copies; completion k goes to copy k; the ids are
    cut before EOS and decoded by the caller's tokenizer with special tokens skipped."""
    a, b, c = (list(prompt_ids(tok, t)) for t in (PROMPT, "sort: ant ram seal =", "copy: eel ="))
    prompts = [a, b, a, c, a, b]
    got = generate_ids(None, tok, prompts, max_new_tokens=5, temperature=1.0, seed=2, backend="vllm",
                       model_path="m")
    assert [r["prompt_token_ids"] for r in fake_vllm.requests] == [a, b, c]
    assert [p["n"] for p in fake_vllm.params] == [3, 2, 1]
    assert got == [[a[-1], 100], [b[-1], 100], [a[-1], 101], [c[-1], 100], [a[-1], 102], [b[-1], 101]]
    texts = generate(None, tok, prompts, max_new_tokens=5, temperature=1.0, seed=2, backend="vllm", model_path="m")
    assert texts == [tok.decode(row, skip_special_tokens=True) for row in got]
    # the same seed asks vLLM for the same per-prompt seeds; another seed for others
    seeds = [p["seed"] for p in fake_vllm.params[-3:]]
    generate_ids(None, tok, prompts, max_new_tokens=5, temperature=1.0, seed=2, backend="vllm", model_path="m")
    assert [p["seed"] for p in fake_vllm.params[-3:]] == seeds
    generate_ids(None, tok, prompts, max_new_tokens=5, temperature=1.0, seed=3, backend="vllm", model_path="m")
    assert not set(p["seed"] for p in fake_vllm.params[-3:]) & set(seeds)
    # greedy: one completion per distinct prompt, shared by its copies
    got = generate_ids(None, tok, prompts, max_new_tokens=5, backend="vllm", model_path="m")
    assert [p["n"] for p in fake_vllm.params[-3:]] == [1, 1, 1]
    assert got == [[a[-1], 100], [b[-1], 100], [a[-1], 100], [c[-1], 100], [a[-1], 100], [b[-1], 100]]


def test_vllm_reads_the_dtype_and_options(fake_vllm, tok):
    model = _FixedModel([tok.eos_token_id]).to(torch.bfloat16)
    model.dtype = torch.bfloat16
    generate_ids(model, tok, [PROMPT], max_new_tokens=2, model_path="m", vllm_options={"gpu_memory_utilization": 0.4})
    assert fake_vllm.llm_kwargs == {"model": "m", "dtype": "bfloat16", "seed": 0, "gpu_memory_utilization": 0.4}
    assert not model.calls  # auto chose vLLM: the HF model did not generate


def test_auto_picks_hf_without_vllm_a_gpu_or_a_folder(monkeypatch, tok):
    import sys

    from poise.errors import ConfigError
    from poise.model.generate import choose_backend

    fake = _FakeVLLM(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto", "m") == "vllm" and choose_backend("auto", None) == "hf"
    assert choose_backend("hf", "m") == "hf"
    hf = _FixedModel([tok.eos_token_id])
    generate_ids(hf, tok, [PROMPT], max_new_tokens=2)  # no folder: HF
    assert len(hf.calls) == 1 and fake.llm_kwargs is None
    with pytest.raises(ConfigError, match="model_path"):
        choose_backend("vllm", None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # vLLM, no GPU
    assert choose_backend("auto", "m") == "hf"
    generate_ids(hf, tok, [PROMPT], max_new_tokens=2, model_path="m")
    assert len(hf.calls) == 2 and fake.llm_kwargs is None
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        generate_ids(hf, tok, [PROMPT], max_new_tokens=2, model_path="m", backend="vllm")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # a GPU, no vLLM
    assert choose_backend("auto", "m") == "hf"
    with pytest.raises(ConfigError, match="pip install vllm"):
        choose_backend("vllm", "m")
    with pytest.raises(ConfigError, match="backend 'gpu'"):
        choose_backend("gpu")
    with pytest.raises(ConfigError, match="needs the model"):
        generate_ids(None, tok, [PROMPT], max_new_tokens=2, model_path="m")


def test_vllm_is_imported_only_inside_functions():
    """``import poise`` never imports vLLM: no module imports it at its top level."""
    import ast
    from pathlib import Path

    import poise

    for path in Path(poise.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "vllm" for n in names), path
