"""The machine a run uses: which device, how to name it, what it allows (CUDA, native bf16), the
process-wide settings a step needs, and how much memory there is to ask for."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import time

import torch
from omegaconf import DictConfig

from vae_cli.errors import ConfigError
from vae_cli.run.keys import DEVICES

log = logging.getLogger(__name__)

# glibc's mallopt parameters; M_MMAP_THRESHOLD is capped at 32 MiB on 64-bit systems.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 1 << 30


def resolve_device(name: str, quiet: bool = False) -> torch.device:
    """auto: CUDA where it is available, else the CPU (said once, unless quiet); cuda where it is not: ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not quiet:
            log.info("CUDA is not available: running on the CPU (%d threads)", torch.get_num_threads())
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value device='cuda': CUDA is not available here; allowed auto, cpu")
    if name not in DEVICES:
        raise ConfigError(f"invalid value device={name!r}: allowed {', '.join(DEVICES)}")
    return torch.device(name)


def use_job_threads(threads: str | None) -> str:
    """Set torch's thread count to the share a local parallel launch gave this job ("N (why)", see
    vae_cli.commands.callbacks.job_threads); returns what the job's log says of its threads."""
    if threads:
        torch.set_num_threads(int(threads.split()[0]))
        return threads
    omp = os.environ.get("OMP_NUM_THREADS")
    return f"{torch.get_num_threads()} (" + (f"OMP_NUM_THREADS={omp})" if omp else "torch's default)")


def check_machine(cfg: DictConfig) -> torch.device:
    """The device cfg.device names, and the speed options this machine allows (each refused in one line
    where it does not apply): cuda.* need CUDA, cpu.bf16 a CPU run on a CPU with native bf16."""
    device = resolve_device(cfg.device, quiet=True)
    for key in ("tf32", "bf16"):
        if cfg.cuda[key] and device.type != "cuda":
            where = "device=cpu" if cfg.device == "cpu" else "CUDA is not available here"
            raise ConfigError(f"invalid value cuda.{key}=true: a CUDA-only option ({where}); allowed false")
    if cfg.cpu.bf16:
        if device.type != "cpu":
            raise ConfigError(
                "invalid value cpu.bf16=true: a CPU-only option (this run is on CUDA: cuda.bf16); allowed false"
            )
        if not cpu_has_bf16():
            raise ConfigError(
                "invalid value cpu.bf16=true: this CPU has no native bf16 instructions (avx512_bf16 or amx_bf16), "
                "where bf16 matmuls are slower than float32; allowed false"
            )
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def available_bytes(device: torch.device) -> int:
    """Memory a run may still take on `device`: free GPU memory, or the system's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_has_bf16() -> bool:
    """The CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_native_bf16(device: torch.device) -> bool:
    """bf16 matrix products run faster than float32 ones on `device`: a CPU with native bf16
    instructions, or a CUDA device with bf16 tensor cores (compute capability 8.0 and later)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_has_bf16()


def keep_freed_heap_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MiB from the heap and to keep up to 1 GiB of freed heap
    instead of handing it back to the system, which made every CPU step page-fault its logits and
    activations in anew (~25k faults a step; the default jensen step went from 0.82 s to 0.78 s).
    Process-wide; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def flush_denormals() -> bool:
    """Flush denormal floats to zero (values below 1e-38 only). Importance weights drive most of
    prior_iwae's and exact's gradients towards zero, and denormals made the CPU step up to 5x slower.

    Call it before torch's first parallel operation: the flag is per thread, and torch's intra-op
    threads keep the one they were started with (set after loading the data, it left exact's step
    at 0.51 s instead of 0.29 s)."""
    return torch.set_flush_denormal(True)


def set_process_speed_settings(device: torch.device, heap: bool = True) -> dict[str, bool]:
    """The process-wide settings a run (training or vae-eval) makes once, before it loads its data:
    torch's worker threads start then and keep the denormal flag they start with. The benchmark makes
    them too; summary.json records them."""
    return {
        "flush_denormal": flush_denormals(),
        "heap_kept": heap and device.type == "cpu" and keep_freed_heap_memory(),
    }


# --- what the speed depends on, and the matmul rate (make bench, vae-check) -----------------------------

MATMUL_SIZE = 2048  # the rate probe: (2048, 2048) @ (2048, 2048) in float32


def machine_facts() -> dict[str, object]:
    """What the speed depends on besides the code: torch's BLAS, the CPU's vector instructions, threads."""
    config = torch.__config__.show()
    found = re.search(r"BLAS_INFO=([^,\s]+)", config)  # inside one long line of build settings
    blas = found.group(1) if found else "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
        flags = sorted(w for w in line.split(":", 1)[-1].split() if w.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return {
        "blas": blas,
        "cpu_flags": flags,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "processor": platform.processor() or platform.machine(),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock around it times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmul(device: torch.device, a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds of one a @ b on `device`."""
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - start
