"""Outlier positions left out (issue 31, item 2): by token id, by position and by activation
norm, identically in the cache and the stream, in validation and in the spliced-in evaluation,
and part of the cache's identity.

The reference is computed another way: the model's activations at every position of every
context (no exclusion at all), filtered by rules written out here with plain Python loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from data_fixtures import _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401

from lightning_sae.data.cache import CacheMismatchError, ShardReader, read_manifest
from lightning_sae.data.extract import Exclusion, Extractor, rows_from
from lightning_sae.data_request import DataRequest
from lightning_sae.spliced import TOTAL_FIELDS, spliced_totals

REQUEST = DataRequest(reads={"x": None, "y": "mlp_out"})
TOKENS, POSITIONS, NORM = [5, 9], [-1, 1], 1.3
RULES = dict(exclude_tokens=TOKENS, exclude_positions=POSITIONS, exclude_norm_above=NORM)


def reference_mask(contexts: torch.Tensor, x: torch.Tensor, bos: int) -> torch.Tensor:
    """[C, T] kept positions by the rules, one position at a time; the median is the lower
    middle value of the context's positions that the token and position rules keep."""
    keep = torch.zeros(contexts.shape, dtype=torch.bool)
    length = contexts.shape[1]
    for c in range(contexts.shape[0]):
        by_tokens = [t for t in range(length) if int(contexts[c, t]) not in (*TOKENS, bos)
                     and t not in [p % length for p in POSITIONS]]
        norms = [float(x[c, t].norm()) for t in by_tokens]
        median = sorted(norms)[(len(norms) - 1) // 2]
        for t, norm in zip(by_tokens, norms):
            keep[c, t] = norm <= NORM * median
    return keep


@pytest.fixture
def setup(tiny_root, tmp_path):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    cached = datamodule(model, text, tmp_path / "cache", REQUEST, **RULES)
    cached.prepare_data()
    cached.setup("fit")
    plan = cached.context_plan()
    val = torch.stack(list(plan.validation()))
    train = torch.stack(list(plan.training()))
    extractor = Extractor(cached.load_language_model(), None, cached.routing().roles)
    full = {split: extractor(contexts) for split, contexts in (("val", val), ("train", train))}
    bos = cached.load_tokenizer().bos_token_id
    masks = {split: reference_mask(contexts, full[split]["x"], bos) for split, contexts in (("val", val), ("train", train))}
    return dict(model=model, text=text, cached=cached, full=full, masks=masks, contexts={"val": val, "train": train},
                cache_dir=tmp_path / "cache")


def test_the_rules_leave_out_some_positions_of_each_kind(setup):
    masks, contexts, x = setup["masks"]["train"], setup["contexts"]["train"], setup["full"]["train"]["x"]
    assert 0 < int(masks.sum()) < masks.numel()
    assert not masks[:, [1, -1]].any() and not masks[torch.isin(contexts, torch.tensor(TOKENS))].any()
    # The norm rule alone leaves out some positions that the token and position rules keep.
    norm_only = torch.ones_like(masks)
    norm_only[:, [0, 1, -1]] = False
    norm_only &= ~torch.isin(contexts, torch.tensor(TOKENS + [1]))
    assert (norm_only & ~masks).any()
    assert x.norm(dim=-1)[norm_only & ~masks].min() > x.norm(dim=-1)[masks].median()


def test_cached_rows_are_exactly_the_kept_positions(setup):
    manifest = read_manifest(setup["cache_dir"])
    assert manifest["settings"]["exclusion"] == {"tokens": TOKENS, "positions": POSITIONS, "norm_above": NORM}
    for split in ("val", "train"):
        reader = ShardReader(setup["cache_dir"], manifest, split, ["x", "y"])
        mask = setup["masks"][split]
        assert reader.num_rows == int(mask.sum())
        rows = reader(torch.arange(reader.num_rows))
        for key in ("x", "y"):
            torch.testing.assert_close(rows[key], setup["full"][split][key][mask], rtol=1e-5, atol=1e-5)


def test_streamed_rows_are_exactly_the_kept_positions(setup):
    streamed = datamodule(setup["model"], setup["text"], None, REQUEST, source="stream", buffer_tokens=64, **RULES)
    streamed.setup("fit")
    val = torch.cat([batch["x"] for batch in streamed.val_dataloader()])
    torch.testing.assert_close(val, setup["full"]["val"]["x"][setup["masks"]["val"]], rtol=1e-5, atol=1e-5)
    first_fill = torch.cat([batch["x"] for batch in itertools.islice(iter(streamed.train_dataloader()), 2)])
    expected = setup["full"]["train"]["x"][setup["masks"]["train"]][:64]
    order = lambda rows: rows[torch.argsort(rows[:, 0])]  # noqa: E731  (the buffer shuffles rows)
    torch.testing.assert_close(order(first_fill), order(expected), rtol=1e-5, atol=1e-5)


def test_a_resumed_stream_counts_rows_after_the_norm_rule(setup):
    cached = setup["cached"]
    extractor = Extractor(cached.load_language_model(), None, cached.routing().roles)
    exclusion = cached.exclusion
    contexts = setup["contexts"]["train"]
    whole = torch.cat([chunk["x"] for chunk in rows_from(iter(contexts), extractor, exclusion, 4)])
    resumed = torch.cat([chunk["x"] for chunk in rows_from(iter(contexts), extractor, exclusion, 4, start_row=150)])
    torch.testing.assert_close(resumed, whole[150:])


def test_other_exclusion_settings_never_reuse_a_cache(setup, tmp_path):
    other = datamodule(setup["model"], setup["text"], setup["cache_dir"], REQUEST, exclude_tokens=TOKENS)
    with pytest.raises(CacheMismatchError, match="exclusion"):
        other.prepare_data()
    # Left to choose its own directory, each setting gets its own cache.
    plain = datamodule(setup["model"], setup["text"], None, REQUEST)
    ruled = datamodule(setup["model"], setup["text"], None, REQUEST, **RULES)
    assert plain._cache_path(plain._settings(plain.routing())) != ruled._cache_path(ruled._settings(ruled.routing()))
    assert "exclusion" not in plain._settings(plain.routing())  # caches made before the option keep their identity


def test_the_rules_travel_with_the_cache_and_into_the_saved_cfg(setup):
    from lightning_sae.data import ActivationDataModule

    reopened = ActivationDataModule.from_cache(setup["cache_dir"], device="cpu")
    assert (reopened.exclude_tokens, reopened.exclude_positions, reopened.exclude_norm_above) == (TOKENS, POSITIONS, NORM)
    assert setup["cached"].metadata["exclude"] == {"tokens": TOKENS, "positions": POSITIONS, "norm_above": NORM}


def test_spliced_evaluation_ignores_the_same_positions(setup):
    cached, contexts = setup["cached"], setup["contexts"]["val"]
    hook = cached.routing().roles["x"]
    totals = spliced_totals(cached.load_language_model(), contexts, None, hook, {"id": lambda rows, grad: rows},
                            exclusion=cached.exclusion, progress=False)["id"]
    counted = dict(zip(TOTAL_FIELDS, totals.tolist()))
    mask = setup["masks"]["val"]
    assert counted["kl_tokens"] == int(mask.sum())
    assert counted["ce_tokens"] == int(mask[:, :-1].sum())


def test_exclusion_of_bos_alone_is_the_token_rule():
    tokens = torch.tensor([[1, 4, 5, 1, 7]])
    keep = Exclusion(token_ids=(1,)).token_mask(tokens)
    assert keep.tolist() == [[False, True, True, False, True]]
