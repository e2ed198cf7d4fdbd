"""What verifying an activation cache costs: one epoch read with verify off, header and full,
and the hash functions that full verification could use, in one run.

    python tools/bench_verify.py [--tokens 262144] [--width 576] [--cache-dtype float32] [--repeats 3]

A cache of `--tokens` tokens at `--width` (576: SmolLM2-135M's residual width) is written once by
the real path (ActivationDataModule, a one-layer random Llama of that width, the python-docs
text: nothing downloaded). Then, `--repeats` times, in rotating order so that other load on the
machine hits every mode alike:

  epoch read     a fresh DataModule's setup (where verification runs) plus one pass over every
                 training batch (batch_size 4096, shuffled) and every validation batch: the time
                 until the data of one epoch has been served, with verify off / header / full
  cold           the same after asking the kernel to drop the cache's pages (posix_fadvise
                 DONTNEED), so the files come from disk: the case of a cache larger than memory
  hashes         reading and hashing every shard file once with xxh3-128 (what full uses),
                 BLAKE2b, SHA-256, SHA-1 and CRC-32 (the standard library's)
  training epoch (--train) one epoch of a TopK SAE fit on the same cache (k 32, 16 x width
                 latents, no validation, no logging) with the default verify "background"
                 (every byte hashed in a thread while the fit starts; a batch waits only for
                 shards not yet verified) and with verify "header", interleaved, `--fit-repeats`
                 times: the ratio is what the default costs a training epoch; the time batches
                 spent waiting for the verifier is printed too
  writer costs   taking and releasing the cache's writer lock (flock), and reserving one shard's
                 space (posix_fallocate) next to writing that shard's bytes through a memory map

Prints medians, each mode's cost relative to verify off, and the load average before and after
(the machine may be shared: compare ratios measured in one run, never absolute times).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import mmap
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from lightning_sae.data import ActivationDataModule
from lightning_sae.data.cache import file_hash
from lightning_sae.data.text import python_docs
from lightning_sae.data_request import DataRequest


class _Trainer:
    """What the DataModule asks of a trainer: the training module's data request, rank 0 of 1."""

    global_rank, world_size = 0, 1

    class lightning_module:  # noqa: N801
        @staticmethod
        def data_request() -> DataRequest:
            return DataRequest()


def make_model(root: Path, width: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = root / "model"
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    documents = [text for _, text in zip(range(400), python_docs())]
    tokenizer.train_from_iterator(documents, trainers.WordLevelTrainer(vocab_size=8192, special_tokens=["<unk>", "<bos>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def datamodule(model: Path, cache: Path, args: argparse.Namespace, verify: str) -> ActivationDataModule:
    dm = ActivationDataModule(model=str(model), layer=0, context_size=128, num_tokens=args.tokens, validation_fraction=0.05,
                              cache_dir=str(cache), cache_dtype=args.cache_dtype, shard_tokens=65_536, batch_size=4096,
                              device="cpu", model_batch_size=32, verify=verify)
    dm.trainer = _Trainer()  # type: ignore[assignment]
    return dm


def epoch_read(model: Path, cache: Path, args: argparse.Namespace, verify: str) -> tuple[float, float]:
    """(seconds in setup, seconds serving every batch once)."""
    started = time.perf_counter()
    dm = datamodule(model, cache, args, verify)
    dm.setup("fit")
    opened = time.perf_counter()
    rows = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            rows += batch["x"].shape[0]
    assert rows > 0
    return opened - started, time.perf_counter() - opened


def training_epoch(model: Path, cache: Path, args: argparse.Namespace, verify: str = "off") -> tuple[float, float]:
    """(seconds of one training epoch's fit, seconds its batches waited for the background verifier)."""
    import lightning as L

    from lightning_sae.module import SAEModule

    dm = datamodule(model, cache, args, verify)
    dm.trainer = None
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        default_root_dir=str(cache.parent),  # where the fit's end writes its SAE
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(SAEModule(k=32, expansion_factor=16, spliced_eval_contexts=0), datamodule=dm)
    seconds = time.perf_counter() - started
    verifier = dm._readers["train"].verifier
    return seconds, (verifier.waited if verifier is not None else 0.0)


def writer_costs(cache: Path, args: argparse.Namespace, repeats: int = 200) -> dict[str, float]:
    """Median seconds: the writer lock taken and released; one shard's space reserved; the same
    shard's bytes written through a memory map (what the reservation precedes)."""
    import numpy as np

    from lightning_sae.data import cache as cache_module

    lock = []
    for _ in range(repeats):
        started = time.perf_counter()
        with cache_module.writer_lock(cache):
            pass
        lock.append(time.perf_counter() - started)
    rows = 65_536 * 127 // 128  # one shard of shard_tokens 65536 at context 128, BOS excluded
    reserve, write = [], []
    for _ in range(max(3, args.repeats)):
        path = cache / ".bench_reserve.tmp"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, args.width))
        started = time.perf_counter()
        cache_module._reserve(cache, "bench", {path: array.nbytes})
        reserve.append(time.perf_counter() - started)
        started = time.perf_counter()
        array[:] = 1.0
        array.flush()
        write.append(time.perf_counter() - started)
        del array
        path.unlink()
    return {"lock": statistics.median(lock), "reserve": statistics.median(reserve), "write": statistics.median(write),
            "shard_bytes": rows * args.width * 4}


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def drop_pages(cache: Path) -> None:
    gc.collect()  # the last DataModule's memory maps: mapped pages cannot be dropped
    for path in cache.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _mapped(path: Path, consume) -> None:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        consume(data)


HASHES = {
    "xxh3_128 (full's)": lambda path: file_hash(path),
    "blake2b": lambda path: _mapped(path, lambda data: hashlib.blake2b(data).hexdigest()),
    "sha256": lambda path: _mapped(path, lambda data: hashlib.sha256(data).hexdigest()),
    "sha1": lambda path: _mapped(path, lambda data: hashlib.sha1(data).hexdigest()),
    "crc32 (zlib)": lambda path: _mapped(path, zlib.crc32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-page measurements")
    parser.add_argument("--train", action="store_true", help="also time training epochs (minutes on a small CPU)")
    parser.add_argument("--fit-repeats", type=int, default=2, help="training epochs per verify mode (interleaved)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        root = Path(tmp)
        model, cache = make_model(root, args.width), root / "cache"
        built = time.perf_counter()
        dm = datamodule(model, cache, args, "full")
        dm.prepare_data()
        size = sum(path.stat().st_size for path in cache.glob("shard_*"))
        print(f"cache: {args.tokens:,} tokens x {args.width} {args.cache_dtype}, {size / 1e6:.0f} MB in "
              f"{len(list(cache.glob('shard_*.x.npy')))} shards (written in {time.perf_counter() - built:.0f} s)")
        print(f"machine: {os.cpu_count()} CPUs (shared with other jobs), torch threads 1, python {sys.version.split()[0]}; "
              f"load average at start {load_average()}")

        modes = ["off", "header", "background", "full"]
        cases = [(mode, False) for mode in modes] + ([] if args.no_cold else [(mode, True) for mode in modes])
        times: dict[tuple[str, bool], list[tuple[float, float]]] = {case: [] for case in cases}
        hashes: dict[str, list[float]] = {name: [] for name in HASHES}
        epoch_read(model, cache, args, "off")  # warm-up: imports, page cache
        for repeat in range(args.repeats):
            for case in cases[repeat % len(cases):] + cases[: repeat % len(cases)]:
                if case[1]:
                    drop_pages(cache)
                else:
                    epoch_read(model, cache, args, "off")  # the pages in memory again
                times[case].append(epoch_read(model, cache, args, case[0]))
            for name, digest in HASHES.items():
                started = time.perf_counter()
                for path in sorted(cache.glob("shard_*")):
                    digest(path)
                hashes[name].append(time.perf_counter() - started)

        print(f"\nepoch read: a fresh DataModule's setup (verification runs there) + every train and validation "
              f"batch once; medians of {args.repeats}")
        print("                         setup    batches    total   cost vs off (total)   (vs off's batches alone)")
        for cold in ([False] if args.no_cold else [False, True]):
            base_setup, base_read = (statistics.median(t[i] for t in times[("off", cold)]) for i in (0, 1))
            for mode in modes:
                setup, read = (statistics.median(t[i] for t in times[(mode, cold)]) for i in (0, 1))
                extra = setup + read - base_setup - base_read
                print(f"  {'cold' if cold else 'warm'} verify={mode:6s} {setup:7.3f} s {read:7.3f} s {setup + read:7.3f} s   "
                      f"{extra / (base_setup + base_read):+8.1%}            ({extra / base_read:+.1%})")
        if args.train:
            fits: dict[str, list[tuple[float, float]]] = {"header": [], "background": []}
            order = list(fits)
            for repeat in range(args.fit_repeats):  # interleaved: header, background, background, header, ...
                for mode in order if repeat % 2 == 0 else order[::-1]:
                    fits[mode].append(training_epoch(model, cache, args, mode))
            header, background = (statistics.median(t[0] for t in fits[mode]) for mode in order)
            waited = statistics.median(t[1] for t in fits["background"])
            check = statistics.median(t[0] for t in times[("full", False)]) - statistics.median(t[0] for t in times[("off", False)])
            print(f"\none training epoch (TopK, k 32, {16 * args.width} latents, torch threads {torch.get_num_threads()}), "
                  f"median of {args.fit_repeats}, interleaved:")
            print(f"  verify=header {header:.1f} s   verify=background (default) {background:.1f} s   ratio "
                  f"{background / header:.3f}; batches waited {waited:.3f} s for the verifier "
                  f"({waited / header:.2%} of an epoch); each fit: {fits}")
            print(f"  (verify=full's hashing before the first batch took {check:.3f} s = {check / header:.2%} of the header epoch)")
        costs = writer_costs(cache, args)
        print(f"\nwriting: the writer lock taken and released {costs['lock'] * 1e6:.0f} us (median of 200); reserving one "
              f"shard ({costs['shard_bytes'] / 1e6:.0f} MB, posix_fallocate) {costs['reserve'] * 1e3:.1f} ms against "
              f"{costs['write'] * 1e3:.1f} ms to write its bytes through a memory map ({costs['reserve'] / costs['write']:.1%})")
        print(f"\nhashing every shard file once (warm pages), median of {args.repeats}:")
        for name, values in hashes.items():
            value = statistics.median(values)
            print(f"  {name:18s} {value:7.3f} s   {size / value / 1e9:6.2f} GB/s")
        print(f"\nload average at the end {load_average()}")


if __name__ == "__main__":
    main()
