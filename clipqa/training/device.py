"""The run's device and runtime: seeds, the device (a leased GPU when several are visible), autocast precision,
torch.compile, and CPU memory reuse."""

from __future__ import annotations

import ctypes
import logging
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from clipqa.errors import ClipqaError
from clipqa.models.cpu_kernels import use_plain_linears
from clipqa.models.model import ClipQA
from clipqa.training.gpu_leases import lease_folder, lease_gpu, visible_gpus

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Every generator a run on ``device`` draws from: the CPU's and, on a GPU, that GPU's default generator
    (dropout there draws from it, and so do CUDA graphs' replays). Saved in every resume checkpoint."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_state(states: dict[str, torch.Tensor] | torch.Tensor, device: torch.device) -> None:
    """Restore :func:`rng_state`'s generators (a bare tensor: a checkpoint from before it, the CPU's alone)."""
    states = states if isinstance(states, dict) else {"cpu": states}
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    elif device.type == "cuda":  # seed_everything's fresh generator: the first steps' dropout masks again
        log.warning("the resume checkpoint has no CUDA generator state: dropout after resuming is not the original's")


@contextmanager
def claim_device(name: str, cache_dir: str, gpu_lease: bool, holder: str, stop=None) -> Iterator[torch.device]:
    """The run's device, held for the ``with`` block: ``auto``/``cuda`` with several GPUs visible lease one
    (:mod:`clipqa.training.gpu_leases`), so concurrent jobs on one machine each train on a GPU of their own;
    ``cuda:K`` pins.
    With one GPU visible (one GPU, or SLURM's binding) there is nothing to choose: no lease, as before."""
    gpus = visible_gpus()
    if name not in ("auto", "cuda") or len(gpus) < 2 or not gpu_lease:
        yield pick_device(name)
        return
    with lease_gpu(lease_folder(cache_dir), gpus, holder, stop) as index:
        if torch.cuda.is_available():
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)  # kernels and caches that use "cuda" (the current device) follow it
        else:  # CLIPQA_FAKE_GPU_COUNT on a machine without CUDA: the lease is real, the training runs on the CPU
            device = torch.device("cpu")
        log.info("leased GPU %d of %d <trainer.gpu_lease=true>, training on %s", index, len(gpus), device)
        yield device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClipqaError(f"trainer.device={name} but no CUDA GPU is visible. Use trainer.device=auto or cpu.")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (tensor cores), fp32 elsewhere (CPUs without bf16 units are slower in it)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs: static shapes


def resolve_compile(name: str, device: torch.device) -> str | None:
    """``trainer.compile`` -> a torch.compile mode, or None (eager). ``auto``: CUDA graphs (``reduce-overhead``) on
    CUDA, where a batch-8 step is otherwise mostly kernel-launch overhead; eager on CPU (compiling costs minutes
    there and gains nothing measurable). ``true``/``false`` (the key's old values) mean ``default``/``off``."""
    name = name.lower()
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    return {"off": None, "false": None, "true": "default"}.get(name, name)


def compile_model(model: ClipQA, name: str, device: torch.device) -> None:
    """Apply ``trainer.compile`` to a built model (its text path, :meth:`ClipQA.compile_text`)."""
    if (mode := resolve_compile(name, device)) is not None:
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()  # a new run's model: earlier runs' graphs in this process must not count to its limit
        # Dropout draws from torch's own generator, as in eager mode: a compiled run trains exactly the eager run's
        # model (tested) and resumes from a checkpoint's RNG state; inductor's own RNG would draw other masks.
        inductor_config.fallback_random = True
        use_plain_linears(model.text)  # the compiled text path gets nn.Linear (no CPU thread-count branches)
        model.compile_text(mode, static=mode in GRAPH_MODES)
        log.info("torch.compile mode %s%s <trainer.compile=%s>", mode, ", static shapes" * (mode in GRAPH_MODES), name)


def keep_freed_memory() -> bool:
    """CPU training: make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Why: glibc serves every allocation above ~32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so a large
    tensor made anew every step (under ``head.kind=vocab`` the head's weight gradient is 30,522 x 768 fp32 = 94 MB)
    is page-faulted and zeroed by the kernel again every step: about 45 ms of a ~400 ms CLS-only step on two cores
    (benchmarks/throughput.py). PyTorch's CPU performance guide swaps in jemalloc or tcmalloc for this; two
    ``mallopt`` calls do the same job in-process, with no extra dependency or ``LD_PRELOAD``. Cost: the process keeps
    its peak heap (RSS does not shrink after a peak), as torch's caching allocator does on a GPU. Process-wide and
    idempotent. Returns False (and changes nothing) where the C library has no ``mallopt`` (macOS, Windows, musl).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    one_gib = 1 << 30  # tensors up to 1 GiB come from the reusable heap; freed heap up to 1 GiB is kept
    return bool(mallopt(m_mmap_threshold, one_gib)) and bool(mallopt(m_trim_threshold, one_gib))
