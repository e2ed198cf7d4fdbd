"""The `lightning-sae` command: LightningCLI over every registered variant and DataModule, plus
`lightning-sae cache verify PATH`, which checks an activation cache.

Bad input ends the command with one line on stderr, `lightning-sae: error: <what was wrong and
what is valid>`, and exit status 2 (a stopped training run: 1; SIGTERM: 143), not a traceback.
That includes damaged files a user hands in: a damaged activation cache, checkpoints that are
truncated or do not fit the model, unreadable safetensors or cfg.json (`init_from`,
`mlp_weights`). LIGHTNING_SAE_DEBUG=1 re-raises instead. Misspelled or ill-typed config keys are
reported by jsonargparse, also with status 2.

`cache` is dispatched before LightningCLI sees the arguments: LightningCLI's subcommands are the
Trainer's methods (fit, validate, ...), each parsing a model, a DataModule and a Trainer, none of
which checking a directory needs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sae import console
from lightning_sae.callbacks import NonFiniteGuard
from lightning_sae.checkpoint_io import AtomicCheckpointIO
from lightning_sae.errors import (
    CheckpointError,
    LightningSAEError,
    NonFiniteLossError,
    one_line,
    unreadable_safetensors,
    unsafe_checkpoint_message,
)
from lightning_sae.evaluation import CoreEvalWriter
from lightning_sae.module import SAETrainingModule
from lightning_sae.registry import load_all_plugins

DEBUG_ENV = "LIGHTNING_SAE_DEBUG"
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1
EXIT_SIGTERM = 128 + 15


class SAEArgumentParser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # Printed above every parse error; the full usage of this CLI runs to a hundred lines and
        # would bury the error line under it. --help still prints everything.
        (file or sys.stdout).write(f"usage: {self.prog} [-h] [options]\n")


class SAECLI(LightningCLI):
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("epilog", "Also: lightning-sae cache verify PATH  (checks an activation cache; --help for more)")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.gradient_clip_val": 1.0})
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        parser.add_argument(
            "--eval_output", type=Optional[str], default=None,
            help="write SAEBench's core result JSON (eval_type_id 'core') of every validation here: after "
            "`validate`, and at the end of `fit` the last validation's (docs/metrics.md)",
        )

    def before_instantiate_classes(self) -> None:
        # Safetensors files named in the model's or DataModule's settings (mlp_weights, an
        # activation file) are opened once here, so a truncated or garbage one is reported with
        # its setting's name before any class (or a plugin's loader) reads it.
        config = self.config.get(str(self.subcommand), self.config)
        for part in ("model", "data"):
            arguments = config.get(part)
            arguments = arguments.get("init_args", arguments) if hasattr(arguments, "get") else None
            for key, value in (dict(vars(arguments)) if arguments is not None else {}).items():
                if isinstance(value, str) and value.endswith(".safetensors") and Path(value).is_file():
                    _check_safetensors(value, f"{part}.{key}")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as error:
            # torch's strict load_state_dict lists every mismatch on its own line.
            if not str(error).startswith("Error(s) in loading state_dict"):
                raise
            ckpt_path = self.config[subcommand].get("ckpt_path")
            details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            raise CheckpointError(
                f"{ckpt_path} does not fit this model ({len(details)} mismatch{'es' if len(details) > 1 else ''}; first: "
                f"{details[0] if details else error}): resume only with the model settings it was saved with"
            ) from None

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Trainer.fit/validate/... take weights_only (default None: torch's default, which an
        # environment variable can turn off). Checkpoints are only ever read as plain weights.
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, {}):
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a given checkpoint's hyperparameters first (with weights_only=True);
        # its errors name neither the file nor the problem in a user's terms.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            raise CheckpointError(unsafe_checkpoint_message(ckpt_path, error)) from None
        except (RuntimeError, EOFError, OSError) as error:  # a zip cut short: OSError "Invalid argument"
            raise CheckpointError(f"{ckpt_path} is not a readable checkpoint (truncated or corrupt?): {error}") from None
        local = ckpt_path and "://" not in str(ckpt_path) and not str(ckpt_path).startswith("registry")
        if local and ckpt_path not in ("last", "best", "hpc") and not Path(ckpt_path).is_file():
            raise CheckpointError(f"checkpoint not found: {ckpt_path} (give a .ckpt file, or 'last' to resume from the newest one)")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        # Lightning's default logger, but without its placeholder hp_metric: TensorBoard keeps a
        # run's first hyperparameter record, and ours is written at fit end with the final metrics.
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = TensorBoardLogger(save_dir=root, default_hp_metric=False)
        # Checkpoints written to a temporary name and renamed, unless another CheckpointIO is given.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if "plugins" not in kwargs and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = console.install(super().instantiate_trainer(**kwargs))
        eval_output = self._get(self.config_init, "eval_output")
        if eval_output:
            trainer.callbacks.append(CoreEvalWriter(eval_output))
        return trainer


def _root_cause(error: BaseException) -> BaseException:
    """jsonargparse wraps an error raised by a class's __init__ (trying every type a setting may
    take) in a long "Does not validate against any of the Union subtypes" message; the error the
    class raised, which says what was wrong, is its cause."""
    while str(error).startswith("Does not validate against any of the Union subtypes") and error.__cause__ is not None:
        error = error.__cause__
    return error


def _check_safetensors(path: str, setting: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{setting}: {unreadable_safetensors(path, error)}") from None


def _report(error: BaseException, status: int) -> None:
    print(f"lightning-sae: error: {one_line(_root_cause(error))}", file=sys.stderr)
    print(f"  (set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
    sys.exit(status)


def main(args: list[str] | None = None) -> LightningCLI:
    arguments = sys.argv[1:] if args is None else list(args)
    if arguments[:1] == ["cache"]:
        sys.exit(cache_main(arguments[1:]))
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        load_all_plugins()
        return _cli(args)
    try:
        load_all_plugins()
        return _cli(args)
    except SIGTERMException:
        print(
            "lightning-sae: stopped by SIGTERM; resume from the last checkpoint with --ckpt_path=last "
            "(or the path of a .ckpt file)",
            file=sys.stderr,
        )
        sys.exit(EXIT_SIGTERM)
    except NonFiniteLossError as error:
        _report(error, EXIT_TRAINING_FAILED)
    except (LightningSAEError, ValueError, OSError) as error:
        # The library's own errors and the built-ins it raises for bad settings or missing files.
        _report(error, EXIT_BAD_INPUT)
    raise AssertionError("unreachable")


# ---- lightning-sae cache verify ------------------------------------------------------------------------
EXIT_CACHE_DAMAGED = 1


def cache_main(argv: Sequence[str]) -> int:
    """`lightning-sae cache verify PATH`: 0 when every shard (and the manifest) is intact, 1 when
    something is damaged (each damaged shard on its own line), 2 when PATH holds no cache."""
    from lightning_sae.data import cache

    parser = argparse.ArgumentParser(
        prog="lightning-sae cache",
        description="Check an activation cache. Exit status: 0 intact, 1 damaged (each damaged shard is named), "
                    "2 not a cache or bad arguments.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every shard of a cache against its manifest and content hashes",
                                 description="Check every shard of an activation cache against its manifest and the "
                                             "content hashes recorded when it was written. Exit status: 0 intact, "
                                             "1 damaged, 2 not a cache.")
    verify.add_argument("path", help="the cache directory (the one holding manifest.json)")
    verify.add_argument("--level", choices=["full", "header"], default="full",
                        help="full: every byte against its hash (default); header: npy headers, lengths and token ids")
    verify.add_argument("--vocab-size", type=int, default=None,
                        help="largest token id + 1 (default: the vocabulary size the cache recorded)")
    args = parser.parse_args(list(argv))
    root = Path(args.path)

    def say(line: str) -> None:
        print(f"lightning-sae cache verify: {line}")

    names = [cache.MANIFEST] if (root / cache.MANIFEST).is_file() else sorted(p.name for p in root.glob("manifest.writer*.json"))
    if not root.is_dir() or not names:
        print(f"lightning-sae cache verify: error: {root} holds no activation cache (no manifest.json)", file=sys.stderr)
        return EXIT_BAD_INPUT
    damaged, total = [], 0
    for name in names:
        try:
            manifest = cache.read_manifest(root, name)
            problems = cache.check_shards(root, manifest, args.level, args.vocab_size or manifest.get("vocab_size"))
        except (LightningSAEError, ValueError) as error:
            say(f"damaged: {one_line(error)}")
            return EXIT_CACHE_DAMAGED
        for position, problem in sorted(problems.items()):
            say(f"damaged: {manifest['shards'][position]['file']}: {problem}")
        damaged += [manifest["shards"][position]["file"] for position in sorted(problems)]
        total += len(manifest["shards"])
        state = "complete" if manifest["complete"] else f"unfinished ({name})"
        rows = sum(shard["rows"] for shard in manifest["shards"])
        say(f"{root}: {state} cache of format {manifest['format']}, {len(manifest['shards'])} shards, {rows:,} rows of "
            f"{sorted(manifest['widths'])}, checked: {'every byte against its hash' if args.level == 'full' else 'headers'}")
    if damaged:
        say(f"{len(damaged)} of {total} shards damaged: {', '.join(damaged)}. Recompute only those with a fit's "
            "data.rebuild_damaged=true (same settings), or delete the cache directory")
        return EXIT_CACHE_DAMAGED
    say(f"all {total} shards intact")
    return 0


def _cli(args: list[str] | None) -> LightningCLI:
    console.quiet_lightning()
    return SAECLI(
        SAETrainingModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=SAEArgumentParser,
        args=args,
    )


def console_main() -> None:
    """The `lightning-sae` console script: `main` returns the CLI object (for tests and
    notebooks), which must not become the process's exit status."""
    main()


if __name__ == "__main__":
    main()
