"""The C08 / C11 prompt has exactly the requested number of tokens whatever the Python version
ships as documentation: the documents are cycled until the count is reached, then cut."""

from __future__ import annotations

import pytest

from turboquant.eval.prose import prose_token_ids, stdlib_docs


def utf8_bytes(text: str) -> list[int]:
    """A byte-level tokenizer: one token per UTF-8 byte."""
    return list(text.encode("utf-8"))


@pytest.mark.synthetic
@pytest.mark.parametrize("n_tokens", [1, 2048, 50_000])
def test_prose_reaches_exactly_the_target_even_from_a_short_corpus(n_tokens):
    docs = ["A short document of the standard library.", "Another one, shorter."]  # 62 bytes
    ids = prose_token_ids(utf8_bytes, n_tokens, docs=docs)
    assert len(ids) == n_tokens
    assert bytes(ids).decode() == ("\n\n".join(docs * 1000))[:n_tokens]
    assert prose_token_ids(utf8_bytes, n_tokens, docs=docs) == ids  # deterministic


@pytest.mark.synthetic
def test_prose_refuses_bad_requests():
    with pytest.raises(ValueError, match=r"n_tokens must be an integer >= 1, got 0"):
        prose_token_ids(utf8_bytes, 0)
    with pytest.raises(ValueError, match="n_tokens must be an integer >= 1, got 2.5"):
        prose_token_ids(utf8_bytes, 2.5)
    with pytest.raises(ValueError, match="docs must hold at least one non-empty text"):
        prose_token_ids(utf8_bytes, 10, docs=["", ""])
    with pytest.raises(ValueError, match="no more than for half of it: it cannot reach n_tokens=10"):
        prose_token_ids(lambda text: [0], 10, docs=["x"])


@pytest.mark.synthetic
def test_stdlib_docs_are_real_prose_in_a_fixed_order():
    docs = stdlib_docs()
    assert docs == stdlib_docs() and len(docs) > 20
    assert all(len(d) >= 200 for d in docs) and sum(map(len, docs)) > 20_000


@pytest.mark.model
def test_c08_c11_prompt_has_exactly_2048_tokens_of_the_model_tokenizer(lm):
    encode = lambda text: lm.tokenizer(text).input_ids
    ids = prose_token_ids(encode, 2048)
    assert len(ids) == 2048
    # the kept prefix is the tokenizer's own encoding of the text, not a cut through a word
    assert ids[:1500] == encode(lm.tokenizer.decode(ids))[:1500]
