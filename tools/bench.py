"""One training step, side by side: lightning-sae against EleutherAI sparsify and the dense floor.

    python tools/bench.py [--tokens 4096] [--d-in 512] [--d-sae 8192] [--k 32] [--repeats 5]
                          [--device cpu|cuda] [--dtype fp32|bf16] [--variants floor,sparsify,topk,...]

Every variant gets the same input batch and its own weights and optimizer. One repeat runs each
variant once, in a fixed order, so load from other processes hits all of them alike; the table
gives medians over repeats, and every ratio is the median of the per-repeat ratios (paired).

Variants (--variants picks a subset; the default is all that are available):
  floor          the dense encoder matmul plus topk, no autograd: relu(addmm(b_enc, x - b_dec,
                 W_enc^T)) in place, then topk. Nothing the step does can be cheaper than this.
  sparsify       sparsify.SparseCoder as its trainer runs it: forward (fvu + auxk_loss / 32),
                 backward, remove_gradient_parallel_to_decoder_directions, torch.optim.Adam,
                 zero_grad, set_decoder_norm_to_unit_norm.
  topk           the library's step, through the module's own methods in the order Lightning
                 calls them: SAEModule.training_loss (sae_step: encoder, selection plugin `topk`,
                 decoder, FVU, AuxK, dead-latent tracking; the logging calls return at once
                 without a Trainer), loss.backward(), on_before_optimizer_step (gradient
                 projection), the module's optimizer_step (Adam as configure_optimizers builds it,
                 then decoder renormalisation), zero_grad and the LR scheduler. Lightning's loop
                 itself (and its gradient clipping) is not in it: see `fit`.
  sparsify+auxk  / topk+auxk: the same with AuxK active (--dead-fraction of the latents dead).
  gsae           the topk step with the g-SAE selector as configured by default (plugin
                 `gradient_topk`, beta 1, rms normalisation, shortlist "auto") and a constant
                 random gradient. On a CPU with AMX / AVX512-BF16 (or a GPU) "auto" shortlists
                 k + k/4 candidates with a bf16 W_dec g and picks the k by exact fp32 scores.
  gsae-exact     the same selector with shortlist="off": W_dec g in fp32 for every latent.
  jsae0 / jsae   the JSAE pair step (plugin `jsae`'s JSAEModule.training_loss, two SAEs around a
                 random frozen GELU MLP of width 4 D, y = MLP(x)) with lambda = 0 and lambda = 1,
                 same maintenance and optimizer as `topk`. `jsae` uses the module's default
                 jacobian_precision ("auto": bf16 products where bf16 matmuls are fast).
  jsae-exact     the lambda = 1 step with jacobian_precision="exact" (fp32 products).
  jsae-ref       the lambda = 1 step with the penalty computed as the reference implementation
                 does (see `reference_jacobian_l1`) instead of the plugin's.
  jsae-penalty   the penalty alone, forward and backward (what a training step adds): the plugin's
                 active_jacobian_l1 at the module's default precision, on fixed SAE weights, x and
                 TopK selections of both SAEs; -exact with fp32 products; -ref the reference
                 formulation on the same inputs. When these rows run, the tool also prints the
                 error of J, of the penalty and of its gradient against float64, and the
                 arithmetic floor of the jsae / jsae0 ratio (see `jsae_report`).
  fit            the topk step inside Lightning's Trainer.fit (gradient_clip_val 1.0 as the CLI
                 sets it, logging on): the step's time plus Lightning's per-step overhead. It is
                 timed from on_train_batch_start to on_train_batch_end of the last of 3 steps of a
                 fresh fit per repeat, so it cannot be interleaved as tightly as the others.

CPU ms: process CPU time per step (all threads), which shows how much of a slow wall time was
other processes' load (and OpenMP threads spinning at barriers while a sibling is descheduled).

Peak memory: the step's working memory, measured for each variant alone in a fresh process
(two warm-up steps first). On CPU (Linux), the process's resident-set high-water mark is reset (/proc/self/clear_refs, value 5) after malloc_trim(0), one step runs, and the column
shows VmHWM minus the resident size just before the step: what the step needs on top of the
weights, optimizer state and input that already exist. It counts pages, not tensors, so it is
approximate (within a few MiB) and includes the allocator's own slack. On CUDA it is
torch.cuda.max_memory_allocated() minus memory_allocated() before the step.

GPU: --device cuda --dtype bf16 runs every step under torch.autocast(bf16), with sparsify using its
Triton decoder if triton is installed (its own default). That path is written but was not run on
the machine that produced docs/performance.md (no GPU there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

# sparsify prints which decoder it picked at import; keep stdout for the table.
with contextlib.redirect_stdout(sys.stderr):
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:  # the comparison rows are skipped without it
        SparseCoder = SparseCoderConfig = None

from lightning_sae.module import SAEModule

ALL_VARIANTS = (
    "floor", "sparsify", "topk", "sparsify+auxk", "topk+auxk", "gsae", "gsae-exact",
    "jsae0", "jsae", "jsae-exact", "jsae-ref", "jsae-penalty", "jsae-penalty-exact", "jsae-penalty-ref", "fit",
)
JSAE_PENALTY_ROWS = {"jsae-penalty": "auto", "jsae-penalty-exact": "exact", "jsae-penalty-ref": "reference"}


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    description: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: float | None = None
    timed_externally: bool = False  # `fit` measures its own step time


# ---- helpers ---------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def module_optimizer(module: SAEModule, total_steps: int = 100_000):
    """The optimizer and LR schedule exactly as the module configures them for a Trainer."""
    configured = module.optimizer_and_schedule(total_steps)
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def make_module(args, device, selector=None, dead_fraction: float = 0.0) -> SAEModule:
    kwargs = {} if selector is None else {"selector": selector}
    module = SAEModule(k=args.k, d_sae=args.d_sae, widths={"x": args.d_in}, seed=args.seed, **kwargs).to(device)
    return module


def set_dead(module, name: str, fraction: float) -> None:
    """Make AuxK active with the first `fraction` of the latents dead (host-side token count too)."""
    tracker = module.get_tracker(name)
    dead = int(fraction * tracker.tokens_since_fired.numel())
    tracker.tokens_seen = max(tracker.tokens_seen, tracker.dead_tokens)
    tracker.tokens_since_fired.zero_()
    tracker.tokens_since_fired[:dead] = tracker.dead_tokens


def library_step(module, batch: dict[str, torch.Tensor], args, device, dead_fraction: float | None):
    """The training step through the module's own methods, in the order Lightning calls them."""
    optimizer, scheduler = module_optimizer(module)
    with torch.no_grad():
        for name in module.sae_names:
            module.get_sae(name).initialize_decoder_bias(batch[module.sae_inputs[name]], "mean")
    module.b_dec_initialized.fill_(True)

    def step():
        if dead_fraction is not None:
            for name in module.sae_names:
                set_dead(module, name, dead_fraction)

        def closure():
            with autocast(device, args.dtype):  # Lightning's forward_context wraps training_step only
                loss = module.training_loss(batch)
            loss.backward()
            module.on_before_optimizer_step(optimizer)
            return loss

        module.optimizer_step(0, 0, optimizer, closure)  # optimizer.step(closure), then decoder renormalisation
        optimizer.zero_grad()
        scheduler.step()

    return step


def sparsify_step(x: torch.Tensor, args, device, dead_fraction: float | None):
    cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k)
    torch.manual_seed(args.seed)
    coder = SparseCoder(args.d_in, cfg, device=device, dtype=torch.float32)
    with torch.no_grad():
        coder.b_dec.copy_(x.float().mean(0))
    optimizer = torch.optim.Adam(coder.parameters(), lr=2e-4 / (args.d_sae / 2**14) ** 0.5)
    dead_mask = None
    if dead_fraction is not None:
        dead_mask = torch.zeros(args.d_sae, dtype=torch.bool, device=device)
        dead_mask[: int(dead_fraction * args.d_sae)] = True

    def step():
        with autocast(device, args.dtype):
            out = coder(x, dead_mask=dead_mask)
            loss = out.fvu + out.auxk_loss / 32  # sparsify's default auxk_alpha
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        coder.set_decoder_norm_to_unit_norm()

    return step


def floor_step(module: SAEModule, x: torch.Tensor, args, device):
    sae = module.get_sae("sae")

    @torch.no_grad()
    def step():
        with autocast(device, args.dtype):
            pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.t()).relu_()
            pre.topk(args.k, dim=1, sorted=False)

    return step


def gsae_selector(beta: float, shortlist: str = "auto"):
    """The g-SAE plugin's selector; None if the plugin is not installed."""
    from lightning_sae.registry import create_selector

    try:
        return create_selector("gradient_topk", beta=beta, shortlist=shortlist)
    except ValueError:  # the registry's error when no plugin provides the name
        return None


def jsae_module(args, device, lam: float, precision: str = "auto"):
    """JSAEModule around a random frozen GELU MLP (D -> 4D -> D); None if the plugin is missing."""
    try:
        from lightning_sae_jsae import FrozenMLP, JSAEModule
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(args.seed + 1)
    d_mlp = 4 * args.d_in
    mlp = FrozenMLP(
        torch.randn(d_mlp, args.d_in, generator=generator) / args.d_in**0.5,
        torch.randn(args.d_in, d_mlp, generator=generator) / d_mlp**0.5,
        family="gelu",
    )
    module = JSAEModule(
        k=args.k, d_sae=args.d_sae, widths={"x": args.d_in, "y": args.d_in}, mlp=mlp,
        jacobian_coefficient=lam, jacobian_warmup_fraction=0.0, jacobian_precision=precision, seed=args.seed,
    ).to(device)  # no warm-up: lambda_t is the coefficient from the first step, with no Trainer
    return module


def reference_jacobian_l1(
    mlp, x: torch.Tensor, W_dec_in: torch.Tensor, in_indices: torch.Tensor, W_enc_out: torch.Tensor, out_indices: torch.Tensor
) -> torch.Tensor:
    """mean |J| the way the JSAE reference implementation (the paper's SAELens fork) computes it,
    written here from its description: every input latent's decoder direction is mapped through
    the MLP's first projection and every output latent's encoder row pulled back through its second
    ([M, d_mlp] each), each token gathers its k rows of both, and one einsum with the MLP's slopes
    phi'(u) gives the [N, k_out, k_in] blocks; autograd differentiates all of it. Plain MLPs only
    (the reference rejects gated ones)."""
    slopes = mlp.slopes(x)  # phi'(W_in x + b_in), constant w.r.t. the SAEs
    decoder_through_mlp = W_dec_in @ mlp.W_in.T  # [M_in, d_mlp]
    encoder_through_mlp = W_enc_out @ mlp.W_out  # [M_out, d_mlp]
    J = torch.einsum("nad,nd,nbd->nba", decoder_through_mlp[in_indices], slopes, encoder_through_mlp[out_indices])
    return J.abs().mean()


def reference_jacobian(
    mlp, x: torch.Tensor, W_dec_in: torch.Tensor, in_indices: torch.Tensor, W_enc_out: torch.Tensor, out_indices: torch.Tensor
) -> torch.Tensor:
    """J itself by the reference formulation (for the error table; no gradient)."""
    with torch.no_grad():
        slopes = mlp.slopes(x)
        return torch.einsum("nad,nd,nbd->nba", (W_dec_in @ mlp.W_in.T)[in_indices], slopes, (W_enc_out @ mlp.W_out)[out_indices])


@dataclass
class PenaltyProblem:
    """One training step's penalty inputs: the pair's weights, x and both SAEs' TopK selections."""

    mlp: object
    x: torch.Tensor
    W_dec_in: torch.Tensor
    in_indices: torch.Tensor
    W_enc_out: torch.Tensor
    out_indices: torch.Tensor

    def arguments(self) -> tuple:
        return self.mlp, self.x, self.W_dec_in, self.in_indices, self.W_enc_out, self.out_indices


def penalty_problem(args, device, x: torch.Tensor) -> PenaltyProblem | None:
    module = jsae_module(args, device, 1.0)
    if module is None:
        return None
    with torch.no_grad():
        y = module.mlp(x)
        code_in, code_out = module.get_sae("sae_in").encode(x), module.get_sae("sae_out").encode(y)
    W_dec_in = module.get_sae("sae_in").W_dec.detach().clone().requires_grad_(True)
    W_enc_out = module.get_sae("sae_out").W_enc.detach().clone().requires_grad_(True)
    return PenaltyProblem(module.mlp, x, W_dec_in, code_in.indices, W_enc_out, code_out.indices)


def penalty_step(problem: PenaltyProblem, precision: str):
    """The penalty and its gradient w.r.t. both weight matrices, as a training step needs them."""
    from lightning_sae_jsae import active_jacobian_l1

    def step():
        problem.W_dec_in.grad = problem.W_enc_out.grad = None
        if precision == "reference":
            penalty = reference_jacobian_l1(*problem.arguments())
        else:
            penalty = active_jacobian_l1(*problem.arguments(), precision=precision)
        penalty.backward()

    return step


def use_reference_penalty(module) -> None:
    """Make a JSAEModule train with the reference formulation of the penalty."""
    def jacobian_l1(x, code_in, code_out):
        sae_in, sae_out = module.get_sae("sae_in"), module.get_sae("sae_out")
        return reference_jacobian_l1(module.mlp, x, sae_in.W_dec, code_in.indices, sae_out.W_enc, code_out.indices)

    module.jacobian_l1 = jacobian_l1


class _StepTimer:
    def __init__(self):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self):
                self.times: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                synchronize(pl_module.device)
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                synchronize(pl_module.device)
                self.times.append(time.perf_counter() - self.start)

        self.callback = Timer()


def fit_step(module: SAEModule, x: torch.Tensor, args, device, root: str):
    """Three steps of a real Trainer.fit per call; records the last step's time."""
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    with torch.no_grad():
        module.get_sae("sae").initialize_decoder_bias(x, "mean")
    module.b_dec_initialized.fill_(True)
    batches = [{"x": x}] * 3
    times: list[float] = []

    def step():
        timer = _StepTimer().callback
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=3,
            precision="bf16-mixed" if args.dtype == "bf16" else "32-true",
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=root,
            callbacks=[timer],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(sys.stderr):
                trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        times.append(timer.times[-1])

    return step, times


# ---- memory ------------------------------------------------------------------------------------------
_libc = None


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak(step: Callable[[], None], device: torch.device) -> float | None:
    """Bytes the step needs above what was resident before it (see the module docstring)."""
    global _libc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return float(peak - before) * 1024


# ---- the run -------------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


def bench_inputs(args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch every variant reads, and the constant gradient the g-SAE rows use."""
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.d_in, generator=generator).to(device)
    grad = torch.randn(args.tokens, args.d_in, generator=generator).to(device)
    return x, grad


def build_variants(args, device) -> tuple[list[Variant], list[str]]:
    notes: list[str] = []
    wanted = [name.strip() for name in args.variants.split(",")] if args.variants else list(ALL_VARIANTS)
    unknown = set(wanted) - set(ALL_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    x, grad = bench_inputs(args, device)
    variants: list[Variant] = []
    for name in wanted:
        if name.startswith("sparsify") and SparseCoder is None:
            notes.append(f"{name}: skipped, sparsify is not installed")
            continue
        if name == "floor":
            variants.append(Variant(name, floor_step(make_module(args, device), x, args, device), "relu(addmm) + topk, no grad"))
        elif name in ("sparsify", "sparsify+auxk"):
            dead = args.dead_fraction if name.endswith("auxk") else None
            variants.append(Variant(name, sparsify_step(x, args, device, dead), "SparseCoder fwd+bwd+Adam+maintenance"))
        elif name in ("topk", "topk+auxk"):
            dead = args.dead_fraction if name.endswith("auxk") else None
            variants.append(Variant(name, library_step(make_module(args, device), {"x": x}, args, device, dead), "SAEModule step"))
        elif name in ("gsae", "gsae-exact"):
            selector = gsae_selector(args.gsae_beta, "off" if name == "gsae-exact" else "auto")
            if selector is None:
                notes.append(f"{name}: not measured, plugin gsae is not installed")
                continue
            notes.append(f"{name}: {selector!r}")
            module = make_module(args, device, selector=selector)
            variants.append(Variant(name, library_step(module, {"x": x, "grad": grad}, args, device, None), "SAEModule step, g-SAE selector"))
        elif name in ("jsae", "jsae0", "jsae-exact", "jsae-ref"):
            module = jsae_module(args, device, 0.0 if name == "jsae0" else 1.0, "exact" if name == "jsae-exact" else "auto")
            if module is None:
                notes.append(f"{name}: not measured, plugin jsae is not installed")
                continue
            if name == "jsae-ref":
                use_reference_penalty(module)
            with torch.no_grad():
                y = module.mlp(x)
            variants.append(Variant(name, library_step(module, {"x": x, "y": y}, args, device, None), "JSAE pair step"))
        elif name in JSAE_PENALTY_ROWS:
            problem = penalty_problem(args, device, x)
            if problem is None:
                notes.append(f"{name}: not measured, plugin jsae is not installed")
                continue
            variants.append(Variant(name, penalty_step(problem, JSAE_PENALTY_ROWS[name]), "JSAE penalty fwd+bwd"))
        elif name == "fit":
            root = tempfile.mkdtemp(prefix="lsae-bench-")
            step, times = fit_step(make_module(args, device), x, args, device, root)
            variant = Variant(name, step, "Trainer.fit, clip 1.0", timed_externally=True)
            variant.times = times
            variants.append(variant)
    return variants, notes


def run(args) -> None:
    # The modules log through self.log, which without a Trainer warns and returns.
    warnings.filterwarnings("ignore", message=".*self.log.*")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variants, notes = build_variants(args, device)
    for variant in variants:  # warm-up: lazy state (Adam moments), allocator, kernels
        for _ in range(args.warmup if variant.name != "fit" else 1):
            variant.step()
        if variant.timed_externally:
            variant.times.clear()
    for _ in range(args.repeats):
        for variant in variants:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            variant.step()
            synchronize(device)
            if not variant.timed_externally:
                variant.times.append(time.perf_counter() - start)
                variant.cpu_times.append(time.process_time() - cpu_start)
    if not args.no_memory:
        for variant in variants:
            if variant.name != "fit":
                variant.peak_bytes = probe_peak_in_subprocess(args, variant.name)
    print_table(args, device, variants, notes)
    if any(variant.name.startswith("jsae") for variant in variants):
        for line in jsae_report(args, device, {variant.name: variant for variant in variants}):
            print(line)


def probe_peak_in_subprocess(args, name: str) -> float | None:
    """Peak step memory of one variant, measured alone in a fresh process (no other variant's
    weights, optimizer state or allocator slack around)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", "--variants", name]
    for flag in ("tokens", "d_in", "d_sae", "k", "device", "dtype", "threads", "dead_fraction", "gsae_beta", "seed"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("PEAK "):
            value = line.split()[1]
            return None if value == "n/a" else float(value)
    return None


def memory_probe(args) -> None:
    warnings.filterwarnings("ignore", message=".*self.log.*")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants, _ = build_variants(args, device)
    if not variants:
        print("PEAK n/a")
        return
    variant = variants[0]
    for _ in range(2):  # Adam's moments and every lazy buffer exist before the measured step
        variant.step()
    peak = measure_peak(variant.step, device)
    print(f"PEAK {peak if peak is not None else 'n/a'}")


def paired_ratio(numerator: Variant | None, denominator: Variant | None, clock: str = "wall") -> float | None:
    """Median over repeats of the per-repeat ratio, by wall time or by process CPU time (which,
    with one thread, does not count time spent descheduled by other processes)."""
    if numerator is None or denominator is None:
        return None
    if clock == "cpu":
        pairs = list(zip(numerator.cpu_times, denominator.cpu_times))
    else:
        pairs = list(zip(numerator.times, denominator.times))
    return statistics.median(a / b for a, b in pairs) if pairs else None


def print_table(args, device, variants: list[Variant], notes: list[str]) -> None:
    by_name = {v.name: v for v in variants}
    floor = by_name.get("floor")
    print(f"machine: {machine_description(device)}")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"load average at the end (1/5/15 min): {load}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(
        f"shape: N={args.tokens} tokens, D={args.d_in}, M={args.d_sae}, k={args.k}; device {device.type}, "
        f"{'bf16 autocast' if args.dtype == 'bf16' else 'fp32'}; {args.repeats} repeats (medians), "
        f"AuxK rows with {args.dead_fraction:.0%} of latents dead"
    )
    header = (
        f"| {'variant':<14} | {'tokens/s':>9} | {'ms/step':>8} | {'CPU ms':>7} | {'vs sparsify':>11} | "
        f"{'vs floor':>8} | {'step peak MiB':>13} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for variant in variants:
        if not variant.times:
            continue
        seconds = statistics.median(variant.times)
        reference = by_name.get("sparsify+auxk" if variant.name.endswith("auxk") else "sparsify")
        # tokens/s ratio = sparsify's time / this variant's time, paired per repeat
        comparable = variant.name in ("floor", "sparsify", "topk", "sparsify+auxk", "topk+auxk", "fit")
        speedup = paired_ratio(reference, variant) if reference is not None and comparable and variant.name != "fit" else None
        if variant.name == "fit" and reference is not None:
            speedup = statistics.median(reference.times) / seconds
        vs_floor = statistics.median(variant.times) / statistics.median(floor.times) if floor is not None else None
        if floor is not None and variant.name != "fit":
            vs_floor = paired_ratio(variant, floor)
        peak = f"{variant.peak_bytes / 2**20:.0f}" if variant.peak_bytes is not None else "n/a"
        cpu = f"{1e3 * statistics.median(variant.cpu_times):.0f}" if variant.cpu_times else "-"
        print(
            f"| {variant.name:<14} | {args.tokens / seconds:>9.0f} | {1e3 * seconds:>8.1f} | {cpu:>7} | "
            f"{_fmt(speedup, 'x'):>11} | {_fmt(vs_floor, 'x'):>8} | {peak:>13} |"
        )
    extra = []
    pairs = (
        ("gsae", "topk", 1.3), ("gsae-exact", "topk", 1.3), ("topk+auxk", "topk", None), ("jsae", "jsae0", 1.5),
        ("jsae-exact", "jsae0", None), ("jsae-ref", "jsae0", None), ("jsae-ref", "jsae", None), ("jsae-penalty-ref", "jsae-penalty", None),
        ("jsae-penalty-ref", "jsae-penalty-exact", None), ("jsae-penalty-exact", "jsae-penalty", None), ("fit", "topk", None),
    )
    for name, base, target in pairs:
        if name in by_name and base in by_name:
            if name == "fit":
                ratio = statistics.median(by_name[name].times) / statistics.median(by_name[base].times)
            else:
                ratio = paired_ratio(by_name[name], by_name[base])
            bound = f" (target <= {target}x)" if target else ""
            cpu = paired_ratio(by_name[name], by_name[base], "cpu") if name != "fit" else None
            by_cpu = f"; by CPU time {cpu:.2f}x" if cpu is not None else ""
            extra.append(f"{name} / {base} step time: {ratio:.2f}x{bound}{by_cpu}")
    for line in extra + notes:
        print(line)


# ---- the JSAE penalty: accuracy and arithmetic floor ------------------------------------------------
def gemm_rate(rows: int, inner: int, cols: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Multiply-adds per second of one [rows, inner] x [inner, cols] matmul (median of repeats), per
    wall-clock second and per process-CPU second."""
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(repeats + 1):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        synchronize(device)
        times["wall"].append(time.perf_counter() - start)
        times["cpu"].append(time.process_time() - cpu_start)
    return {clock: rows * inner * cols / statistics.median(values[1:]) for clock, values in times.items()}


def penalty_multiply_adds(N: int, k_in: int, k_out: int, D: int, d_mlp: int, U_in: int, U_out: int) -> int:
    """Multiply-adds of the penalty and its gradient for a plain MLP (R = d_mlp): the slopes
    (N D d_mlp), the two row tables forward and backward (2 (U_in + U_out) D d_mlp), the per-token
    block forward and its two backward products (3 N k_out k_in d_mlp). The reference formulation
    makes the tables for every latent (U = M)."""
    return N * D * d_mlp + 2 * (U_in + U_out) * D * d_mlp + 3 * N * k_out * k_in * d_mlp


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.double().norm() / reference.double().norm())


def jsae_report(args, device, by_name: dict[str, Variant]) -> list[str]:
    """Error of J, of the penalty and of its gradient against float64 for each way of computing
    the penalty (when the penalty rows ran), and the arithmetic floor of the jsae / jsae0 ratio."""
    from lightning_sae_jsae import active_jacobian, active_jacobian_l1
    from lightning_sae_jsae.jacobian import product_dtype

    x, _ = bench_inputs(args, device)
    problem = penalty_problem(args, device, x)
    if problem is None:
        return []
    lines = []
    # The error table reads the first --error-tokens tokens: per-entry statistics need no more, and
    # float64 at full size takes minutes on a busy CPU.
    few = slice(0, args.error_tokens)
    sample = PenaltyProblem(problem.mlp, x[few], problem.W_dec_in, problem.in_indices[few], problem.W_enc_out, problem.out_indices[few])
    N, k_in, k_out = problem.in_indices.shape[0], problem.in_indices.shape[1], problem.out_indices.shape[1]
    D, d_mlp = problem.mlp.d_in, problem.mlp.d_mlp
    U_in, U_out = torch.unique(problem.in_indices).numel(), torch.unique(problem.out_indices).numel()
    default = product_dtype("auto", problem.W_dec_in)
    if any(name in by_name for name in JSAE_PENALTY_ROWS):
        exact64 = PenaltyProblem(
            copy.deepcopy(sample.mlp).double(), sample.x.double(), sample.W_dec_in.detach().double().requires_grad_(True), sample.in_indices,
            sample.W_enc_out.detach().double().requires_grad_(True), sample.out_indices,
        )
        J64 = active_jacobian(*exact64.arguments()).detach()
        penalty_step(exact64, "exact")()
        grad64 = torch.cat([exact64.W_dec_in.grad.flatten(), exact64.W_enc_out.grad.flatten()])
        lines.append(
            f"JSAE penalty against float64 (first {sample.x.shape[0]} tokens of the batch; relative Frobenius error of J and of "
            "the gradient w.r.t. W_dec_in and W_enc_out; sign(J) differs: fraction of entries; same signs: the gradient "
            "against float64 autograd of sum(sign * J) / count with this row's signs):"
        )
        lines.append("| penalty | products | J rel. error | sign(J) differs | penalty rel. error | gradient rel. error | same signs |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, precision in JSAE_PENALTY_ROWS.items():
            if precision == "reference":
                J = reference_jacobian(*sample.arguments())
                label = "fp32 (reference formulation)"
            else:
                with torch.no_grad():
                    J = active_jacobian(*sample.arguments(), precision=precision)
                label = str(product_dtype(precision, sample.W_dec_in)).replace("torch.", "")
            penalty_step(sample, precision)()
            grad = torch.cat([sample.W_dec_in.grad.flatten(), sample.W_enc_out.grad.flatten()])
            with torch.no_grad():
                if precision == "reference":
                    penalty = float(reference_jacobian_l1(*sample.arguments()))
                else:
                    penalty = float(active_jacobian_l1(*sample.arguments(), precision=precision))
            p64 = float(J64.abs().mean())
            signs = torch.sign(J.double())
            flips = float((signs != torch.sign(J64)).double().mean())
            # |J|'s subgradient at an entry within rounding of 0 is any value in [-1, 1]: the float64
            # gradient of sum(signs * J) with this row's own signs separates the products' rounding
            # from that choice.
            same = torch.autograd.grad(
                (signs * active_jacobian(*exact64.arguments())).sum() / J64.numel(), (exact64.W_dec_in, exact64.W_enc_out)
            )
            same = torch.cat([g.flatten() for g in same])
            lines.append(
                f"| {name} | {label} | {relative(J - J64, J64):.2e} | {flips:.2e} | {abs(penalty - p64) / p64:.2e} | "
                f"{relative(grad - grad64, grad64):.2e} | {relative(grad - same, same):.2e} |"
            )
            del J
    if "jsae0" in by_name and any(name in by_name for name in ("jsae", "jsae-exact", "jsae-ref")):
        # Both clocks: with one thread, CPU time is the steadier one on a shared machine.
        work = penalty_multiply_adds(N, k_in, k_out, D, d_mlp, U_in, U_out)
        rates = {dtype: gemm_rate(U_in, D, d_mlp, dtype, device) for dtype in (torch.float32, torch.bfloat16)}
        lines.append(
            f"penalty work: {work / 1e9:.1f} G multiply-adds (U_in={U_in}, U_out={U_out} distinct active latents); "
            f"GEMM rate here [U, D] x [D, d_mlp], per wall / CPU second: fp32 {rates[torch.float32]['wall'] / 1e9:.0f} / "
            f"{rates[torch.float32]['cpu'] / 1e9:.0f} G/s, bf16 {rates[torch.bfloat16]['wall'] / 1e9:.0f} / {rates[torch.bfloat16]['cpu'] / 1e9:.0f} G/s"
        )
        for clock in ("wall", "cpu"):
            base = statistics.median(by_name["jsae0"].times if clock == "wall" else by_name["jsae0"].cpu_times)
            floors = {dtype: 1 + work / rate[clock] / base for dtype, rate in rates.items()}
            lines.append(
                f"by {clock} time: jsae0 step {1e3 * base:.0f} ms; arithmetic floor of jsae / jsae0 (jsae0 + the penalty's "
                f"multiply-adds at the GEMM rate): exact fp32 {floors[torch.float32]:.2f}x, all-bf16 {floors[torch.bfloat16]:.2f}x"
            )
            for name in ("jsae", "jsae-exact", "jsae-ref"):
                if name in by_name:
                    ratio = paired_ratio(by_name[name], by_name["jsae0"], clock)
                    lines.append(
                        f"  {name} / jsae0 = {ratio:.2f}x = {ratio / floors[torch.float32]:.2f} x the exact-fp32 floor "
                        f"(target <= 1.2), {ratio / floors[torch.bfloat16]:.2f} x the bf16 floor"
                    )
        lines.append(f"jsae default products here: {str(default).replace('torch.', '')}")
    return lines


def _fmt(value: float | None, suffix: str) -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast(bf16) around every forward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    parser.add_argument("--dead-fraction", type=float, default=0.25, help="fraction of latents dead in the +auxk rows")
    parser.add_argument("--gsae-beta", type=float, default=1.0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--error-tokens", type=int, default=1024, help="tokens of the JSAE error table (float64 reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
