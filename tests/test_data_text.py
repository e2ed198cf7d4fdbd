"""Text sources and packing into contexts."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from data_fixtures import _isolated_caches, make_tokenizer, sentences  # noqa: F401

from lightning_sae.data.text import dataset_texts, pack_contexts, python_docs


def test_packing_prepends_bos_and_keeps_the_stream_in_order():
    tokenizer = make_tokenizer()
    docs = sentences(50)
    contexts = list(pack_contexts(docs, tokenizer, context_size=10, batch_docs=7))
    assert all(c.shape == (10,) and c.dtype == torch.long and c[0] == tokenizer.bos_token_id for c in contexts)
    assert all(c[1] != tokenizer.bos_token_id for c in contexts)  # no doubled BOS at a context start
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
    # The bodies are the separator-joined stream (less separators that fell at a context start).
    body = [t for c in contexts for t in c[1:].tolist() if t != tokenizer.bos_token_id]
    plain = [t for t in stream if t != tokenizer.bos_token_id]
    assert len(body) > 300 and body == plain[: len(body)]
    # How documents are batched for the tokenizer does not change the contexts.
    assert all(torch.equal(a, b) for a, b in zip(contexts, pack_contexts(docs, tokenizer, 10, batch_docs=1)))


def test_packing_without_bos_cuts_the_raw_stream():
    tokenizer = make_tokenizer()
    contexts = list(pack_contexts(sentences(20), tokenizer, context_size=8, prepend_bos=False))
    stream = []
    for doc in sentences(20):  # BOS where each document starts
        stream += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert torch.cat(contexts).tolist() == stream[: 8 * len(contexts)]


def test_local_json_and_parquet_files_with_a_text_column(tmp_path):
    rows = [{"body": text, "id": i} for i, text in enumerate(sentences(5))]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(dataset_texts(str(tmp_path / "a.jsonl"), text_column="body")) == sentences(5)
    assert list(dataset_texts(str(tmp_path / "*.jsonl"), text_column="body", streaming=True)) == sentences(5)
    import pandas

    pandas.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    assert list(dataset_texts(str(tmp_path / "b.parquet"), text_column="body")) == sentences(5)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body', 'id'\]"):
        list(dataset_texts(str(tmp_path / "a.jsonl")))


def test_embedded_corpus_is_english_from_python_itself():
    first = list(itertools.islice(python_docs(), 20))
    assert first == list(itertools.islice(python_docs(), 20))  # a fixed order
    assert sum(len(d) for d in first) > 10_000
    assert sum(" the " in d for d in first) >= 15
