"""Shared fixtures for the data-layer tests: tiny tokenizers and file writers."""

import json

import pytest

from poise.model.tiny import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    """The tiny tokenizer: BOS added, chat template."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tok_nobos():
    """The tiny tokenizer without a BOS token."""
    return build_tiny_tokenizer(add_bos=False)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path; each row is a dict, or a str written as is."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
