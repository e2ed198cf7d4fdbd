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
import re
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

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse explains a misspelled option or an unknown class name by listing every
        # type it tried ("Does not validate against any of the Union subtypes ..."); one line
        # with the closest valid name says it better.
        line = explain_parse_error(message) if self.exit_on_error else None
        if line is None:
            return super().error(message, ex)
        words = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "").split()
        command = " ".join(["lightning-sae", *words[1:]])  # prog starts with argv[0], whatever runs the CLI
        print(f"lightning-sae: error: {line} ({command} --help lists every option)", file=sys.stderr)
        self.exit(EXIT_BAD_INPUT)


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
        _remember_trainer(trainer)
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
        # The library's own errors and the built-ins it raises for bad settings or missing files
        # (an error may carry its own status: caching stopped by SIGTERM exits 143).
        _report(error, getattr(error, "exit_status", EXIT_BAD_INPUT))
    except RuntimeError as error:
        lost = lost_rank_message(error)
        if lost is None:
            raise
        print(f"lightning-sae: error: {lost}", file=sys.stderr)
        sys.exit(EXIT_TRAINING_FAILED)
    raise AssertionError("unreachable")


# ---- one line for a lost DDP rank ----------------------------------------------------------------------
_trainer: L.Trainer | None = None
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "ProcessGroupNCCL", "Socket Timeout", "timed out")


def _remember_trainer(trainer: L.Trainer) -> None:
    """The Trainer of this command, for the lost-rank line (its process group is gone by then)."""
    global _trainer
    _trainer = trainer


def lost_rank_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone (a gloo "Connection
    closed by peer", an NCCL abort), naming the lost rank where this process can know it: rank 0
    launched the others and sees which exited; any rank of two knows the other; a rank whose
    launcher died knows it was rank 0. None for any other RuntimeError."""
    import torch.distributed as dist

    trainer = _trainer
    if trainer is None or trainer.world_size < 2:
        return None
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(error, backend_error) or any(text in str(error) for text in _PEER_GONE)):
        return None
    rank, world = trainer.global_rank, trainer.world_size
    lost = _lost_ranks(trainer, rank, world)
    who = (f"rank {lost[0]}" if len(lost) == 1 else f"ranks {lost}") if lost else "another rank"
    return (f"{who} of {world} stopped during the run (at about global step {trainer.global_step}), so rank {rank} "
            f"cannot go on without it (its collective failed: {str(error).splitlines()[0][:120]}). Resume every rank "
            "from the last checkpoint with --ckpt_path=last")


def _lost_ranks(trainer: L.Trainer, rank: int, world: int) -> list[int]:
    import time

    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    if rank == 0 and procs:
        deadline = time.monotonic() + 2  # the peer's socket may close a moment before it exits
        while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
            time.sleep(0.05)
        return [number + 1 for number, proc in enumerate(procs) if proc.poll() is not None]
    if rank != 0 and os.getppid() == 1:  # the launcher, rank 0, is gone (we were reparented)
        return [0]
    return [1 - rank] if world == 2 else []


# ---- one line for a misspelled option or an unknown class name ------------------------------------------
_NOT_ACCEPTED = re.compile(r"Problem with given class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted")
_NOT_A_CLASS = re.compile(r"Expected a path but (\S+) either not accessible or invalid")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_NESTED = re.compile(r"NestedArg\(key='([\w.]+)', val='([^']*)'\)")


def explain_parse_error(message: str) -> str | None:
    """One line for the parse errors whose jsonargparse message buries the point: an option a
    class does not take (the closest it does take), or a class name nothing registered has (the
    registered names and the closest). None for any other error, which is printed as it is."""
    import difflib

    parser_key = _PARSER_KEY.search(message)
    group = parser_key.group(1) if parser_key else None
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted and group:
        class_path, option = not_accepted.groups()
        group = ".".join(_PARSER_KEY.findall(message[: not_accepted.start()]))  # model.selector for a selector's option
        valid = _init_options(class_path)
        close = difflib.get_close_matches(option, valid, n=1, cutoff=0.5)
        hint = f"did you mean --{group}.{close[0]}?" if close else f"its options are {', '.join(valid)}"
        return f"--{group}.{option} is not an option of {_class_label(class_path)}: {hint}"
    unknown = _NOT_A_CLASS.search(message)
    if unknown and group in ("model", "data"):
        name = unknown.group(1)
        nested = _NESTED.search(message)
        if nested and nested.group(1) == "selector" and nested.group(2) == name:
            return _unknown_name(f"--{group}.selector", name, "selector", _registered("selectors"))
        if group == "model" and not nested:
            return _unknown_name("--model", name, "variant", _registered("variants"))
        if group == "data" and not nested:
            return _unknown_name("--data", name, "DataModule", ["ActivationDataModule", "TensorDataModule"])
    return None


def _unknown_name(option: str, name: str, kind: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"{option}={name}: no {kind} is registered under that name{hint} The registered {kind}s are "
            f"{', '.join(names) or 'none'} (or give a class path, package.module.Class)")


def _registered(which: str) -> list[str]:
    from lightning_sae.registry import SELECTORS, VARIANTS, load_plugins

    return sorted(load_plugins(SELECTORS if which == "selectors" else VARIANTS))


def _class_label(class_path: str) -> str:
    cls = _import_class(class_path)
    if cls is not None and cls.__module__ == "lightning_sae.registered":
        real = cls.__bases__[0]
        return f"{cls.__name__} ({real.__module__}.{real.__qualname__})"
    return class_path


def _import_class(class_path: str) -> type | None:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_options(class_path: str) -> list[str]:
    """The keyword arguments a class's __init__ takes, following **kwargs up its bases."""
    import inspect

    cls, names = _import_class(class_path), []
    for klass in (cls.__mro__ if cls is not None else ()):
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


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
