"""A tiny tokenizer and model built offline, for tests, examples and smoke runs.

Nothing here touches the network: :func:`build_tiny_tokenizer` trains a byte-level BPE on a few
sentences with the ``tokenizers`` library, and :func:`build_tiny_model` makes a randomly
initialised two-layer Llama sized to that tokenizer. Both are deterministic and take well under a
second once ``transformers`` is imported.

The tokenizer's special tokens are ``<pad>`` (id 0), ``<bos>`` (id 1), ``<eos>`` (id 2) and the chat
role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Its chat template renders::

    <bos><|user|>\\nHello<eos><|assistant|>\\nHi there<eos>

and, with ``add_generation_prompt=True``, ends with ``<|assistant|>\\n`` so that the rendering of a
prompt is a prefix of the rendering of the prompt followed by the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: Jinja chat template of the tiny tokenizer (see the module docstring for what it renders).
CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good answer is short, clear and kind.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
The cat sat on the mat and looked at the rain. The dog slept by the warm fire.
Please explain why the sky is blue. Sunlight is scattered by the air, and blue light is
scattered more than red light, so the sky looks blue to us during the day.
I think that you should drink water, sleep well and walk every day to stay healthy.
Sorry, I cannot help with that. Here is a better way to say it: thank you for asking.
One, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 100 2024.
User: hello! Assistant: Hi, how can I help you today? User: tell me a story, please.
Once upon a time there was a small robot who wanted to learn how to write good poems.
"""


def build_tiny_tokenizer(
    texts: list[str] | None = None,
    *,
    vocab_size: int = 512,
    chat_template: bool = True,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline.

    Args:
        texts: training texts; a small built-in English corpus when None.
        vocab_size: upper bound on the vocabulary (a small corpus may yield fewer merges).
        chat_template: attach the simple chat template described in the module docstring.
        add_bos: prepend ``<bos>`` when encoding with special tokens (like Llama); when False the
            tokenizer has no BOS token at all (like Qwen). ``<bos>`` keeps id 1 either way.

    Any text can be encoded: the 256 byte symbols are always in the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts if texts is not None else [DEFAULT_CORPUS], trainer=trainer)
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS if add_bos else None,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def build_tiny_model(
    tokenizer_or_vocab_size: PreTrainedTokenizerFast | int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised float32 Llama sized to a tokenizer (or to a vocabulary size).

    The pad/bos/eos ids come from the tokenizer (0/1/2 when only a vocabulary size is given). The
    weights depend only on ``seed``; the global torch RNG is left as it was.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, ids = tokenizer_or_vocab_size, (0, 1, 2)
    else:
        tok = tokenizer_or_vocab_size
        vocab_size, ids = len(tok), (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        pad_token_id=ids[0],
        bos_token_id=ids[1],
        eos_token_id=ids[2],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()
