"""make bench: vae-cli's training step against a plain reference step, and the matmul floor.

For jensen, prior_iwae, elbo and iwae at the default config (batch 256, 128 samples, decoder
2 -> 512 -> 512 -> 512 -> 784), steps per second of

    reference       written straight from the formulas: torch.distributions Bernoulli(logits)
                    .log_prob over a (batch, n_samples, 784) tensor, independent samples per
                    image, a plain nn.Sequential, one forward and backward over the whole batch
    vae-cli         vae_cli.stages.training.train_step, as `vae-train` runs it
    vae-cli shared  the same with objective.shared_samples=true (prior objectives only)
    vae-cli compiled  with compile=true (--compile)
    w/o ...         vae-cli with one change taken back (jensen and prior_iwae; not with --quick):
                    the fused likelihood, micro-batches, denormal flushing, in-place ELU. The
                    heap setting is process-wide: compare a run with --no-heap-tuning instead.

timed in one process, one step of each variant per round (so a disturbance hits them all),
warm-up excluded, medians. Also: FLOPs per step from the layer sizes (2mnk per forward matmul,
backward twice the forward), this machine's matmul rate (a large float32 matmul timed in the
same rounds), so the floor (FLOPs / rate) and the fraction of it reached; the matmul seconds of
a profiled step and the rest of the step; the peak memory of a step, as live tensor bytes (the
profiler's memory timeline) and as resident memory (a fresh subprocess per variant); the
seconds of the quadrature and importance estimators; then each target of issue 6, met or not.
Writes bench.json.

    python benchmarks/bench.py [--quick] [--compile] [--set KEY=VALUE ...]

It only times: experiments (shared against independent samples at equal wall time: docs/compare_shared.py)
live beside the results they make.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import distributions as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

# The profiler's memory timeline names its allocation actions only in this private module.
from torch.profiler._memory_profiler import Action

import vae_cli
from vae_cli.commands.app import compose_config as compose_app_config
from vae_cli.errors import DataError
from vae_cli.maths.models import build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import N_PIXELS
from vae_cli.run.config import data_config, model_spec, objective_options, validate
from vae_cli.run.data import Images, load_images
from vae_cli.run.datafiles import SPLIT_SIZES
from vae_cli.run.files import write_json
from vae_cli.run.machine import (
    MATMUL_SIZE,
    describe_device,
    machine_facts,
    set_process_speed_settings,
    synchronize,
    time_matmul,
)
from vae_cli.stages.evaluation import evaluate
from vae_cli.stages.training import apply_speed_options, micro_batch_size, step_flops, train_step

OBJECTIVE_NAMES = ("jensen", "prior_iwae", "elbo", "iwae")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_mkl_linear"}
PROFILED_STEPS = 3
# vae-cli with one of its changes taken back, to show what each bought
ABLATIONS = {
    "w/o fused lik.": "the fused likelihood",
    "w/o micro-batches": "micro-batches",
    "w/o denormal flush": "flushing denormals",
    "w/o in-place ELU": "in-place ELU",
}
ABLATED_OBJECTIVES = ("jensen", "prior_iwae")
# Targets of issue 6 for the default config on the CPU
TARGET_SPEEDUP = 1.5  # jensen and prior_iwae steps against the reference step
TARGET_OTHER_OVER_MATMUL = 0.30
TARGET_MEMORY_FACTOR = 1.5  # peak over (logits + the activations backward needs)
TARGET_SHARED_SPEEDUP = 50.0
TARGET_EVAL_SECONDS = 60.0  # the default K=2 model's end-of-training evaluation, all 10k test images
FULL_TEST_SET = SPLIT_SIZES["test"]


# --- configs and data ----------------------------------------------------------------------------


def compose_config(args, overrides: list[str]):
    """The config `vae-train` composes from these overrides and the --set ones."""
    cfg = compose_app_config(overrides + args.set)
    validate(cfg)
    return cfg


def load_batches(cfg, n: int, device: torch.device) -> tuple[list[torch.Tensor], Images, str]:
    """n training batches and the images they come from: MNIST when its files are there, else
    random binary images (the speed does not depend on the pixel values)."""
    try:
        images = load_images(data_config(cfg), cfg.seed, device)
    except DataError as exc:
        g = torch.Generator().manual_seed(0)
        means = torch.rand(N_PIXELS, generator=g) * 0.5
        test = torch.bernoulli(means.expand(1000, N_PIXELS), generator=g)
        images = Images(
            train=test.to(device),
            test=test.to(device),
            test_labels=torch.zeros(len(test), dtype=torch.long, device=device),
            pixel_means=means.to(device),
            pixel_sd=(means * (1 - means)).sqrt().to(device),
            binarization="static",
            source=f"random binary images ({exc})",
        )
    return [images.batch(cfg.batch_size) for _ in range(n)], images, images.source


# --- the reference step, straight from the formulas ----------------------------------------------


def plain_mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ELU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class Reference(nn.Module):
    """Decoder (and encoder) as plain nn.Sequential; every density a torch.distributions object."""

    def __init__(self, cfg, uses_encoder: bool):
        super().__init__()
        m = cfg.model
        self.K = cfg.K
        self.decoder = plain_mlp([cfg.K] + [m.hidden] * m.depth + [N_PIXELS])
        self.encoder = plain_mlp([N_PIXELS] + [m.hidden] * m.depth + [2 * cfg.K]) if uses_encoder else None

    def loss(self, name: str, x: torch.Tensor, S: int) -> torch.Tensor:
        B = x.shape[0]
        # validate_args=False: the default support check would add passes over (B, S, 784) to the reference.
        prior = dist.Normal(
            torch.zeros(self.K, device=x.device), torch.ones(self.K, device=x.device), validate_args=False
        )
        if self.encoder is None:
            z = prior.sample((B, S))  # (B, S, K): independent samples per image
        else:
            mu, logvar = self.encoder(x).chunk(2, -1)
            q = dist.Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
            z = q.rsample((S,)).transpose(0, 1)  # (B, S, K)
        x_bsd = x.unsqueeze(1).expand(B, S, N_PIXELS)
        log_px_z = dist.Bernoulli(logits=self.decoder(z), validate_args=False).log_prob(x_bsd).sum(-1)  # (B, S)
        if name == "jensen":
            return -log_px_z.mean()
        if name == "prior_iwae":
            return -(torch.logsumexp(log_px_z, 1) - math.log(S)).mean()
        if name == "elbo":
            kl = dist.kl_divergence(q, dist.Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=False)).sum(
                -1
            )
            return -(log_px_z.mean(1) - kl).mean()
        log_w = log_px_z + prior.log_prob(z).sum(-1) - q.log_prob(z.transpose(0, 1)).sum(-1).T
        return -(torch.logsumexp(log_w, 1) - math.log(S)).mean()


# --- variants --------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way to run a training step on a batch: step(x) -> loss."""

    name: str
    objective: str
    cfg: Any
    device: torch.device
    step: Callable[[torch.Tensor], float]
    model: nn.Module
    pass_rows: int  # decoder rows of one forward pass (a micro-batch)
    shared: bool
    options: dict[str, Any]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_step_s: float = math.nan


def make_variant(kind: str, objective: str, args, device: torch.device, pixel_means: torch.Tensor) -> Variant:
    overrides = [f"objective={objective}", f"device={device.type}", "progress=false"]
    if kind == "vae-cli shared":
        overrides.append("objective.shared_samples=true")
    if kind == "vae-cli compiled":
        overrides.append("compile=true")
    if kind == "vae-cli bf16":  # the likelihood stays float32
        overrides.append(f"{device.type}.bf16=true")
    if device.type == "cuda":
        overrides.append(f"cuda.tf32={str(args.tf32).lower()}")
    cfg = compose_config(args, overrides)
    uses_encoder = OBJECTIVES[objective].uses_encoder
    torch.manual_seed(0)
    model = build_model(model_spec(cfg), pixel_means).to(device)
    B, S = cfg.batch_size, cfg.n_samples
    if kind == "reference":
        ref = Reference(cfg, uses_encoder).to(device)
        ref.decoder.load_state_dict(model.decoder.net.state_dict())  # the same start: the mean image
        if uses_encoder:
            ref.encoder.load_state_dict(model.encoder.net.state_dict())
        opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)

        def step(x: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            loss = ref.loss(objective, x, S)
            loss.backward()
            opt.step()
            return loss.item()

        return Variant(kind, objective, cfg, device, step, ref, B * S, False, {"micro_batch": B})
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    speed, autocast = apply_speed_options(cfg, model, device)
    mb = cfg.batch_size if kind == "w/o micro-batches" else micro_batch_size(cfg, device)
    obj = OBJECTIVES[objective]
    if kind == "w/o fused lik.":  # autograd's graph of the formula
        model.use_autograd_likelihood()
    if kind == "w/o in-place ELU":
        for module in model.modules():
            if isinstance(module, nn.ELU):
                module.inplace = False

    def step(x: torch.Tensor) -> float:
        return train_step(model, opt, obj, x, S, mb, objective_options(cfg), autocast)["loss"]

    def step_with_denormals(x: torch.Tensor) -> float:
        torch.set_flush_denormal(False)
        try:
            return step(x)
        finally:
            torch.set_flush_denormal(True)

    shared = speed["shared_samples"]
    run = step_with_denormals if kind == "w/o denormal flush" else step
    return Variant(
        kind, objective, cfg, device, run, model, S if shared else mb * S, shared, {"micro_batch": mb, **speed}
    )


def variant_kinds(objective: str, args) -> list[str]:
    kinds = ["reference", "vae-cli"]
    if not OBJECTIVES[objective].uses_encoder:
        kinds.append("vae-cli shared")
    if args.compile:
        kinds.append("vae-cli compiled")
    if args.bf16:
        kinds.append("vae-cli bf16")
    if args.ablations and objective in ABLATED_OBJECTIVES:
        kinds += ABLATIONS
    return kinds


# --- FLOPs, the matmul rate, memory ----------------------------------------------------------------


def memory_needed(cfg, pass_rows: int) -> int:
    """Bytes of the logits of one forward pass plus the activations its backward needs (every
    decoder Linear's input: z and each hidden layer's output, which in-place ELU shares)."""
    m = cfg.model
    return pass_rows * (N_PIXELS + cfg.K + m.hidden * m.depth) * 4


def rss_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def tensor_peak(v: Variant, x: torch.Tensor) -> dict[str, Any]:
    """The peak of live tensor bytes during one step above those live before it (the parameters,
    optimizer state and batch): CPU from the profiler's memory timeline, CUDA from the allocator."""
    if v.device.type == "cuda":
        torch.cuda.synchronize(v.device)
        torch.cuda.reset_peak_memory_stats(v.device)
        before = torch.cuda.memory_allocated(v.device)
        v.step(x)
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(v.device) - before,
            "measures": "torch.cuda.max_memory_allocated",
        }

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        v.step(x)
    live = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return {"peak_bytes": peak, "measures": "live tensor bytes above the step's start (profiler memory timeline)"}


def memory_probe(args) -> None:
    """Subprocess mode: the peak resident memory one step adds over the state before it
    (parameters, optimizer state, the batch), after one warm-up step: the resident-set
    high-water mark (VmHWM, reset through /proc/self/clear_refs) after malloc_trim hands freed
    heap back. It adds the allocator's slack to the live tensors."""
    device = torch.device(args.device)
    set_process_speed_settings(device, heap=not args.no_heap_tuning)
    cfg = compose_config(args, [f"objective={args.memory_probe[0]}", f"device={device.type}"])
    batches, images, _ = load_batches(cfg, 2, device)
    v = make_variant(args.memory_probe[1], args.memory_probe[0], args, device, images.pixel_means)
    v.step(batches[0])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = rss_bytes("VmRSS")
    v.step(batches[1])
    peak = rss_bytes("VmHWM") - before
    print(
        json.dumps(
            {"peak_bytes": peak, "measures": "resident-set high-water mark over the step (VmHWM - VmRSS before it)"}
        )
    )


def measure_memory(objective: str, kind: str, args) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-probe", objective, kind, "--device", args.device]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--compile"] if kind == "vae-cli compiled" else []
    cmd += ["--tf32"] if args.tf32 else []
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--no-heap-tuning"] if args.no_heap_tuning else []
    cmd += ["--set", *args.set] if args.set else []
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        return {"peak_bytes": None, "measures": f"probe failed: {exc}"}


# --- profile: matmul vs everything else -------------------------------------------------------------


def profile_split(v: Variant, batches: list[torch.Tensor], s_per_step: float) -> dict[str, Any]:
    """Seconds of a step in matrix products (self time of the mm family, the median of a profiled
    step per batch) and in everything else: the unprofiled median step time less the matmul
    time, so the profiler's own overhead is not counted as element-wise work."""

    if v.device.type != "cpu":
        return {"note": "the split is profiled on the CPU only"}
    matmul, profiled, top = [], [], {}
    for x in batches:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            v.step(x)
            profiled.append(time.perf_counter() - start)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        matmul.append(sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / 1e6)
        top = {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in ops[:10]}
    mm, total = statistics.median(matmul), statistics.median(profiled)
    return {
        "profiled_s": total,
        "matmul_s": mm,
        "other_s": s_per_step - mm,
        "other_over_matmul": (s_per_step - mm) / mm,
        "other_over_matmul_profiled": (total - mm) / mm,
        "profiled_steps": len(batches),
        "top_ops_self_s": top,
    }


# --- evaluation estimators --------------------------------------------------------------------------


def eval_seconds(images: Images, device: torch.device, args) -> dict[str, Any]:
    """Seconds of the end-of-training evaluation of a default K=2 elbo model, as vae-train runs it
    (vae_cli.stages.evaluation.evaluate at the default eval.* settings), and of each estimator in it."""
    cfg = compose_config(args, ["objective=elbo", f"device={device.type}"])
    cfg.eval.n_images = args.eval_images  # None: the whole test set, as vae-train
    torch.manual_seed(0)
    model = build_model(model_spec(cfg), images.pixel_means).to(device)
    result, _ = evaluate(model, model_spec(cfg), images, cfg.eval)
    estimates = {
        name: {"seconds": e["seconds"], "n_images": e["n_images"], "settings": e["settings"]}
        for name, e in result["estimates"].items()
    }
    return {"n_images": result["n_images"], "seconds": result["seconds"], "estimates": estimates}


# --- the benchmark -----------------------------------------------------------------------------------


def run_bench(args) -> dict[str, Any]:
    device = torch.device(args.device)
    settings = set_process_speed_settings(
        device, heap=not args.no_heap_tuning
    )  # as train() does, for every variant alike
    cfg = compose_config(args, [f"device={device.type}"])
    batches, images, source = load_batches(cfg, args.rounds + args.warmup, device)
    means = images.pixel_means
    variants = [make_variant(kind, o, args, device, means) for o in args.objectives for kind in variant_kinds(o, args)]
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    matmul_s: list[float] = []
    print(
        f"bench: {len(variants)} variants, {args.warmup} warm-up + {args.rounds} timed rounds on {describe_device(device)}; data: {source}",
        flush=True,
    )
    for i in range(args.warmup):  # compile, allocator and first-touch costs
        time_matmul(device, a, b)
        for v in variants:
            start = time.perf_counter()
            v.step(batches[i])
            synchronize(device)
            if i == 0:
                v.first_step_s = time.perf_counter() - start
    for r in range(args.rounds):
        matmul_s.append(time_matmul(device, a, b))
        for v in variants:
            x = batches[args.warmup + r]
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            v.step(x)
            synchronize(device)
            v.wall.append(time.perf_counter() - wall)
            v.cpu.append(time.process_time() - cpu)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v.objective}/{v.name} {v.wall[-1]:.3f}s" for v in variants),
            flush=True,
        )
    rate = 2 * MATMUL_SIZE**3 / statistics.median(matmul_s)

    rows = []
    median = {(v.objective, v.name): statistics.median(v.wall) for v in variants}
    for v in variants:
        s = median[v.objective, v.name]
        flops = step_flops(v.cfg, OBJECTIVES[v.objective].uses_encoder, v.shared)
        row = {
            "objective": v.objective,
            "variant": v.name,
            "s_per_step": s,
            "it_per_s": 1 / s,
            "s_per_step_min": min(v.wall),
            "cpu_s_per_step": statistics.median(v.cpu),
            "speedup_vs_reference": median[v.objective, "reference"] / s,
            "first_step_s": v.first_step_s,
            "flops_per_step": flops,
            "floor_s": flops / rate,
            "fraction_of_floor": flops / rate / s,
            "memory_needed_bytes": memory_needed(v.cfg, v.pass_rows),
            "pass_rows": v.pass_rows,
            "options": v.options,
        }
        if v.name not in ("reference", "vae-cli") and (v.objective, "vae-cli") in median:  # at equal n_samples
            row["speedup_vs_vae_cli"] = median[v.objective, "vae-cli"] / s
        if not args.no_profile:
            row["profile"] = profile_split(v, batches[-PROFILED_STEPS:], s)
        if not args.no_memory:
            row["memory"] = tensor_peak(v, batches[-1])
            if v.device.type == "cpu" and sys.platform == "linux":
                row["resident_memory"] = measure_memory(v.objective, v.name, args)
        rows.append(row)
        print(f"  measured {v.objective}/{v.name}", flush=True)
    result = {
        "vae_cli_version": vae_cli.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": describe_device(device),
        "machine": platform.machine(),
        "machine_facts": machine_facts(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "data": source,
        "quick": args.quick,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "process_settings": settings,
        "config": {
            "batch_size": cfg.batch_size,
            "n_samples": cfg.n_samples,
            "K": cfg.K,
            "hidden": cfg.model.hidden,
            "depth": cfg.model.depth,
            "overrides": args.set,
        },
        "speed_options": {"tf32": args.tf32, "bf16": args.bf16, "compile": args.compile},
        "matmul_rate_flops": rate,
        "matmul_probe": f"({MATMUL_SIZE}, {MATMUL_SIZE}) @ ({MATMUL_SIZE}, {MATMUL_SIZE}) float32, median over the rounds",
        "steps": rows,
    }
    if not args.no_eval:
        result["eval"] = eval_seconds(images, device, args)
    result["targets"] = check_targets(rows, device, args.set, result.get("eval"))
    return result


def check_targets(
    rows: list[dict[str, Any]], device: torch.device, overrides: list[str], evaluation: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The speed targets (issues 6 and 11), each with the figure measured; they are stated for the 2-core CPU
    and the default config."""
    targets = []

    def add(what: str, value: float, limit: float, met: bool) -> None:
        targets.append({"target": what, "value": value, "limit": limit, "met": met})

    if evaluation is not None and evaluation["estimates"]["quadrature"]["n_images"] == FULL_TEST_SET:
        seconds = evaluation["seconds"]
        add(
            f"end-of-training evaluation <= {TARGET_EVAL_SECONDS:.0f} s",
            seconds,
            TARGET_EVAL_SECONDS,
            seconds <= TARGET_EVAL_SECONDS,
        )

    for r in rows:
        if r["variant"] == "vae-cli" and r["objective"] in ("jensen", "prior_iwae"):
            add(
                f"{r['objective']}: step speed-up over the reference >= {TARGET_SPEEDUP}x",
                r["speedup_vs_reference"],
                TARGET_SPEEDUP,
                r["speedup_vs_reference"] >= TARGET_SPEEDUP,
            )
            if "other_over_matmul" in r.get("profile", {}):
                other = r["profile"]["other_over_matmul"]
                add(
                    f"{r['objective']}: non-matmul time <= {TARGET_OTHER_OVER_MATMUL:.0%} of matmul time",
                    other,
                    TARGET_OTHER_OVER_MATMUL,
                    other <= TARGET_OTHER_OVER_MATMUL,
                )
        if r["variant"] == "vae-cli" and r.get("memory", {}).get("peak_bytes") is not None:
            factor = r["memory"]["peak_bytes"] / r["memory_needed_bytes"]
            add(
                f"{r['objective']}: peak tensor memory <= {TARGET_MEMORY_FACTOR}x (logits + activations)",
                factor,
                TARGET_MEMORY_FACTOR,
                factor <= TARGET_MEMORY_FACTOR,
            )
        if r["variant"] == "vae-cli shared":
            add(
                f"{r['objective']}: shared samples >= {TARGET_SHARED_SPEEDUP:.0f}x independent ones",
                r["speedup_vs_vae_cli"],
                TARGET_SHARED_SPEEDUP,
                r["speedup_vs_vae_cli"] >= TARGET_SHARED_SPEEDUP,
            )
    if device.type != "cpu" or overrides:
        for t in targets:
            t["note"] = "stated for the default config on the 2-core CPU"
    return targets


def print_table(result: dict[str, Any]) -> None:
    settings = ", ".join(f"{k}={v}" for k, v in result["process_settings"].items())
    print(
        f"\n{result['device']}, torch {result['torch_version']}, load average {result['load_average'][0]:.1f}; "
        f"matmul rate {result['matmul_rate_flops'] / 1e9:.0f} GFLOP/s; medians of {result['rounds']} rounds; {settings}"
    )
    head = (
        f"{'objective':<11} {'variant':<18} {'s/step':>8} {'it/s':>7} {'vs ref':>7} {'GFLOP':>6} {'floor s':>8} "
        f"{'of floor':>8} {'mm s':>6} {'other s':>7} {'oth/mm':>6} {'peak MB':>8} {'need MB':>8} {'peak/need':>9} {'RSS MB':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in result["steps"]:
        p, m = r.get("profile", {}), r.get("memory", {})
        peak, rss = m.get("peak_bytes"), r.get("resident_memory", {}).get("peak_bytes")
        need = r["memory_needed_bytes"]
        cells = [
            f"{r['objective']:<11}",
            f"{r['variant']:<18}",
            f"{r['s_per_step']:8.3f}",
            f"{r['it_per_s']:7.2f}",
            f"{r['speedup_vs_reference']:6.2f}x",
            f"{r['flops_per_step'] / 1e9:6.1f}",
            f"{r['floor_s']:8.3f}",
            f"{r['fraction_of_floor']:7.0%} ",
            f"{p.get('matmul_s', math.nan):6.2f}",
            f"{p.get('other_s', math.nan):7.2f}",
            f"{p.get('other_over_matmul', math.nan):6.2f}",
            f"{peak / 1e6 if peak is not None else math.nan:8.0f}",
            f"{need / 1e6:8.0f}",
            f"{peak / need if peak is not None else math.nan:9.2f}",
            f"{rss / 1e6 if rss is not None else math.nan:7.0f}",
        ]
        print(" ".join(cells))
    for r in result["steps"]:
        if r["variant"] in ABLATIONS:
            print(
                f"{r['objective']}: {ABLATIONS[r['variant']]} buys {1 / r['speedup_vs_vae_cli']:.2f}x "
                f"({r['s_per_step']:.3f} s/step without it)"
            )
        elif "speedup_vs_vae_cli" in r:
            print(
                f"{r['objective']}: {r['variant']} {r['speedup_vs_vae_cli']:.1f}x the vae-cli step at equal n_samples"
            )
    if "eval" in result:
        e = result["eval"]
        parts = ", ".join(f"{name} {x['seconds']:.1f} s ({x['n_images']} images)" for name, x in e["estimates"].items())
        print(f"end-of-training evaluation (default K=2 elbo model): {e['seconds']:.1f} s: {parts}")
    for t in result["targets"]:
        print(
            f"target {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:.2f}"
            + (f" ({t['note']})" if "note" in t else "")
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, no ablations, 100 eval images")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, quick 1)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVE_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add a variant with compile=true")
    parser.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vae-cli with each change taken back (default: on, off with --quick)",
    )
    parser.add_argument("--no-heap-tuning", action="store_true", help="leave glibc's heap thresholds at their defaults")
    parser.add_argument("--tf32", action="store_true", help="cuda.tf32=true for the vae-cli variants")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="add a variant with bf16 autocast (cpu.bf16=true, or cuda.bf16=true on CUDA)",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument(
        "--eval-images", type=int, default=None, help="test images for the estimators (default all, quick 100)"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every variant, as on the vae-train command line (the targets are for the defaults)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--memory-probe", nargs=2, metavar=("OBJECTIVE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.eval_images = args.eval_images or (100 if args.quick else None)  # None: the whole test set
    args.ablations = not args.quick if args.ablations is None else args.ablations
    args.objectives = [o for o in args.objectives.split(",") if o]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    result = run_bench(args)
    print_table(result)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
