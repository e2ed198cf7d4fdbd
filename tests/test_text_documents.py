"""Local text is read as documents (issue 20): a hard-wrapped .txt file is one document, or one per
paragraph, never one per line unless asked; packing puts BOS only where a document starts and
keeps the newlines."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from data_fixtures import _isolated_caches, sentences  # noqa: F401
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_sae.data.text import dataset_texts, pack_contexts, paragraphs

BOOK = [
    " ".join(sentences(6, seed=10)),
    " ".join(sentences(4, seed=11)),
    " ".join(sentences(5, seed=12)),
]


def wrapped(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=40)


def book_text() -> str:
    # Paragraphs hard-wrapped at 40 columns, separated by a blank line, by two, and by a line of
    # spaces: what a plain-text novel looks like.
    first, second, third = (wrapped(p) for p in BOOK)
    return f"{first}\n\n{second}\n\n\n{third}\n   \n"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE: newlines are tokens of their own (the word-level test tokenizer drops them)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences(200) + [book_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book_text())
    other = tmp_path / "notes.txt"
    other.write_text(wrapped(" ".join(sentences(3, seed=13))) + "\n")
    return path, other


def test_a_txt_file_is_one_document_with_its_newlines(book):
    path, other = book
    assert list(dataset_texts(str(path))) == [book_text()]
    assert list(dataset_texts(str(path.parent / "*.txt"), streaming=True)) == [book_text(), other.read_text()]


def test_paragraph_documents_split_on_blank_lines_only(book):
    path, _ = book
    docs = list(dataset_texts(str(path), txt_documents="paragraphs"))
    assert docs == [wrapped(p) for p in BOOK]
    assert all("\n" in doc for doc in docs)  # the wrapped lines stay one paragraph
    assert paragraphs("a\n  b\n\n\tc\n \n") == ["a\n  b", "\tc"]  # indentation kept, blank lines split


def test_lines_are_documents_only_when_asked(book):
    path, _ = book
    lines = [line for line in book_text().splitlines() if line]
    assert [doc for doc in dataset_texts(str(path), txt_documents="lines") if doc.strip()] == [line for line in lines if line.strip()]
    with pytest.raises(ValueError, match="txt_documents must be one of"):
        next(dataset_texts(str(path), txt_documents="sentences"))
    with pytest.raises(ValueError, match="not loader_options.sample_by"):
        next(dataset_texts(str(path), loader_options={"sample_by": "line"}))


@pytest.mark.parametrize("txt_documents", ["file", "paragraphs"])
def test_packing_puts_bos_only_where_a_document_starts(book, txt_documents):
    path, _ = book
    tokenizer = byte_level_tokenizer()
    bos, size = tokenizer.bos_token_id, 16
    docs = list(dataset_texts(str(path), txt_documents=txt_documents))
    ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    stream = [token for doc in ids for token in [bos] + doc]  # written out independently

    raw = list(pack_contexts(docs, tokenizer, size, prepend_bos=False))
    assert len(raw) == len(stream) // size  # every full context, the partial one dropped
    assert torch.cat(raw).tolist() == stream[: size * len(raw)]
    assert int((torch.cat(raw) == bos).sum()) == sum(1 for i in range(0, size * len(raw)) if stream[i] == bos) <= len(docs)
    # The text comes back with its newlines: the wrapped lines were not joined.
    text = tokenizer.decode(torch.cat(raw).tolist(), skip_special_tokens=True)
    assert "\n" in text and text == "".join(docs)[: len(text)]

    with_bos = list(pack_contexts(docs, tokenizer, size, prepend_bos=True))
    bodies = [context[1:] for context in with_bos]
    assert all(context[0] == bos for context in with_bos)
    # Inside each context body, BOS only at document starts: there are as many as documents
    # begin there (a document starting right at a context's start shares the prepended BOS).
    assert int((torch.cat(bodies) == bos).sum()) <= len(docs) - 1  # none at all for one file
    plain = [t for t in stream if t != bos]
    assert [t for t in torch.cat(bodies).tolist() if t != bos] == plain[: sum(int((b != bos).sum()) for b in bodies)]


def test_one_bos_per_line_is_what_the_issue_saw(book):
    """Why the default matters: line documents put a BOS at every wrapped line."""
    path, _ = book
    tokenizer = byte_level_tokenizer()
    bos = tokenizer.bos_token_id

    def bos_share(mode: str) -> float:
        contexts = torch.stack(list(pack_contexts(dataset_texts(str(path), txt_documents=mode), tokenizer, 16, prepend_bos=False)))
        return (contexts == bos).float().mean().item()

    assert bos_share("lines") > 5 * bos_share("file")


def test_json_rows_stay_one_document_each_and_loader_options_reach_local_files(tmp_path):
    rows = [{"text": wrapped(p)} for p in BOOK]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(dataset_texts(str(tmp_path / "a.jsonl"), txt_documents="paragraphs")) == [r["text"] for r in rows]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n\nna\xefve".encode("latin-1"))
    assert list(dataset_texts(str(latin), loader_options={"encoding": "latin-1"})) == ["caf\xe9\n\nna\xefve"]
    (tmp_path / "t.csv").write_text("id;text\n1;first\n2;second\n")
    assert list(dataset_texts(str(tmp_path / "t.csv"), loader_options={"delimiter": ";"})) == ["first", "second"]
