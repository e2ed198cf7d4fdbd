"""Text sources and packing them into fixed-length token contexts.

Sources: the embedded corpus "python-docs" (English that ships with Python: the pydoc topic
pages plus the docstrings of standard-library modules, read with `ast` so nothing is imported
and nothing downloaded), or any `datasets` dataset: a hub name, a local folder, or local
text/json/jsonl/parquet/csv files given as a path or glob.

What one document is decides where BOS goes (packing puts one where each document starts):

- `.txt` files: by `txt_documents`: "file" (the default) makes each file one document, newlines
  and all, so wrapped prose stays one text; "paragraphs" splits each file on blank lines (lines
  holding only whitespace), keeping the newlines inside a paragraph; "lines" makes every line a
  document (the `datasets` text loader's own default, right only for one-text-per-line files).
- `.json`/`.jsonl`/`.parquet`/`.csv` files and hub datasets: one row is one document.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from lightning_sae.errors import DataError

EMBEDDED_CORPUS = "python-docs"
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SKIPPED_STDLIB_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
TXT_DOCUMENTS = ("file", "paragraphs", "lines")
"""What one document of a local .txt file is; see the module docstring."""
# The `datasets` text loader's sample_by for each; paragraphs are split here (its own paragraph
# mode splits on exactly "\n\n", so a third newline or a line of spaces starts a paragraph).
_SAMPLE_BY = {"file": "document", "paragraphs": "document", "lines": "line"}
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")


def _stdlib_document(path: Path) -> str:
    """Module docstring followed by the class and function docstrings of one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(doc for doc in (ast.get_docstring(node) for node in nodes) if doc)


def _stable_order(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _python_docs_entries() -> tuple[tuple[str, str | Path], ...]:
    """(key, topic name or stdlib file) in the corpus's order; listed once per process."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in stdlib.rglob("*.py") if not _SKIPPED_STDLIB_PARTS.intersection(p.relative_to(stdlib).parts)
    ]
    entries = [("topic:" + name, name) for name in topics] + [("module:" + str(p.relative_to(stdlib)), p) for p in files]
    return tuple(sorted(entries, key=lambda entry: _stable_order(entry[0])))


def python_docs() -> Iterator[str]:
    """The embedded corpus, in a fixed order that interleaves topic pages and module docs (so the
    validation contexts, taken first, look like the training ones)."""
    from pydoc_data.topics import topics

    for key, item in _python_docs_entries():
        text = topics[item] if isinstance(item, str) else _stdlib_document(item)
        if text.strip():
            yield text


def python_docs_identity() -> str:
    # The corpus is whatever this Python ships, so its version is part of the data's identity.
    return f"{EMBEDDED_CORPUS}@python{sys.version_info.major}.{sys.version_info.minor}"


def local_files(dataset: str) -> list[str]:
    """Files named by `dataset` as a path or glob ([] when it names no local file)."""
    if os.path.isfile(dataset):
        return [dataset]
    return sorted(f for f in glob.glob(dataset) if os.path.isfile(f)) if glob.has_magic(dataset) else []


def paragraphs(text: str) -> list[str]:
    """`text` split on blank lines (lines holding only whitespace), newlines inside kept."""
    return [part.strip("\n") for part in _BLANK_LINES.split(text) if part.strip()]


def dataset_texts(
    dataset: str,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    *,
    txt_documents: str = "file",
    loader_options: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """Documents of the embedded corpus or of a `datasets` dataset, one string each.

    Args:
        txt_documents: what one document of local .txt files is: "file", "paragraphs" or "lines"
            (see the module docstring).
        loader_options: extra keyword arguments for `datasets.load_dataset`, for local files as
            for hub datasets (e.g. {"encoding": "latin-1"} for .txt, {"delimiter": ";"} for .csv).
    """
    if txt_documents not in TXT_DOCUMENTS:
        raise ValueError(f"txt_documents must be one of {list(TXT_DOCUMENTS)}, got {txt_documents!r}")
    if dataset == EMBEDDED_CORPUS:
        yield from python_docs()
        return
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    options = dict(loader_options or {})
    files = local_files(dataset)
    valid = (f"give '{EMBEDDED_CORPUS}', a `datasets` hub name, a local folder, or local "
             f"{'/'.join(s.lstrip('.') for s in _BUILDERS)} files as a path or glob")
    split_paragraphs = False
    try:
        if files:
            suffixes = {Path(f).suffix.lower() for f in files}
            builders = {_BUILDERS.get(s) for s in suffixes}
            if len(builders) != 1 or None in builders:
                raise ValueError(f"local files must share one type among {sorted(_BUILDERS)}; got {sorted(suffixes)}")
            if all(os.path.getsize(f) == 0 for f in files):
                raise DataError(f"dataset '{dataset}' is empty: {files} hold no data")
            builder = builders.pop()
            if builder == "text":
                if "sample_by" in options:
                    raise ValueError("give txt_documents ('file', 'paragraphs' or 'lines'), not loader_options.sample_by")
                options["sample_by"] = _SAMPLE_BY[txt_documents]
                split_paragraphs = txt_documents == "paragraphs"
            data = load_dataset(builder, dataset_config, data_files=files, split=split, streaming=streaming, **options)
        else:  # a hub name or a local folder that `datasets` knows how to read
            data = load_dataset(dataset, dataset_config, split=split, streaming=streaming, **options)
    except (OSError, DatasetGenerationError) as error:
        reason = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
        raise DataError(f"cannot read dataset '{dataset}' ({reason}): {valid}") from error
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise DataError(f"dataset '{dataset}' is empty: split '{split}' has no rows") from error
    columns = data.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"dataset '{dataset}' has no column '{text_column}'; its columns are {columns}")
    empty = True
    for row in data:
        text = row[text_column]
        for document in paragraphs(text) if split_paragraphs and text else [text]:
            if document:
                empty = False
                yield document
    if empty:
        raise DataError(f"dataset '{dataset}' is empty: no row of split '{split}' has text in column '{text_column}'")


def pack_contexts(
    texts: Iterable[str],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    batch_docs: int = 64,
) -> Iterator[Tensor]:
    """Tokenise documents into one stream and cut it into LongTensor contexts of `context_size`
    tokens. BOS goes where each document starts (without a BOS token, EOS goes where each ends),
    and nowhere else: a document's text is tokenised whole, newlines included. With
    `prepend_bos` each context starts with BOS followed by context_size - 1 stream tokens (the
    SAELens convention; a context may then begin inside a document). The final partial context
    is dropped."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos needs a tokenizer with a BOS token; set prepend_bos false")
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}")
    body = context_size - 1 if prepend_bos else context_size
    buffer: list[int] = []
    docs: list[str] = []

    def cut() -> Iterator[Tensor]:
        start = 0
        while True:
            # A document's BOS right after the prepended BOS would just repeat it.
            if prepend_bos and start < len(buffer) and buffer[start] == bos:
                start += 1
            if len(buffer) - start < body:
                break
            chunk = buffer[start : start + body]
            start += body
            yield torch.tensor(([bos] if prepend_bos else []) + chunk, dtype=torch.long)
        del buffer[:start]

    def tokenize() -> Iterator[Tensor]:
        # verbose=False: documents longer than the model's context are expected, we cut them.
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            if bos is not None:
                buffer.append(bos)
            buffer.extend(ids)
            if bos is None and eos is not None:
                buffer.append(eos)
        docs.clear()
        yield from cut()

    # Batches of documents grow from 1 to batch_docs, so the first contexts come after one
    # document's work, not 64 (a stream or a validation pass often needs only a few).
    wanted = 1
    for text in texts:
        docs.append(text)
        if len(docs) >= wanted:
            yield from tokenize()
            wanted = min(2 * wanted, batch_docs)
    if docs:
        yield from tokenize()
