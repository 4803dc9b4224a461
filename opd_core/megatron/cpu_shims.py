"""Every patch megatron-core needs to run on a machine without a GPU, in one place.

    from opd_core.megatron.cpu_shims import apply_cpu_shims
    apply_cpu_shims()   # no-op when CUDA is available; safe to call many times

megatron-core assumes CUDA in a few spots that do not matter for correctness on CPU:
it asks for `torch.cuda.current_device()` (or "cuda") to place buffers, calls
`torch.cuda.synchronize()` around collectives and checkpointing, and forks the CUDA RNG
tracker around dropout inside tensor-parallel regions. On CPU we point the device at
"cpu", make synchronisation a no-op and make the RNG fork a plain context (dropout is 0 in
our configs, so no random stream is consumed there). Nothing here is applied when a GPU
is present: the real kernels and RNG tracker run unchanged.

One setting is for speed, not correctness: freed tensor memory stays in the process
(`cpu_allocator.keep_freed_memory`), as the CUDA caching allocator keeps it on a GPU; without
it glibc hands activations back to the kernel every step and the step pays page faults.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from opd_core.megatron.cpu_allocator import keep_freed_memory

_APPLIED = False


def cpu_shims_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Patch torch.cuda / megatron for CPU. Returns True if the shims are (now) active."""
    global _APPLIED
    if not cpu_shims_needed():
        return False
    if _APPLIED:
        return True

    keep_freed_memory()
    # Megatron places parameters and buffers on `torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # Used as a barrier around collectives and checkpoint I/O; CPU ops are synchronous.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    # Pipeline parallel: the last stage's copy of tied embeddings is moved with `.cuda()` before
    # the all-reduce that makes it equal the first stage's.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]

    # The pipeline schedules count tokens in `torch.zeros([], device="cuda")`.
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu()

    from megatron.core.fusions import fused_softmax

    # The local attention's softmax builds the causal mask of a layer given none (the
    # per-sample layout's right-padded rows need none) on "cuda".
    fused_softmax.get_default_causal_mask = _causal_mask_on_cpu

    from megatron.core.tensor_parallel import random as tp_random

    # The tracker forks CUDA RNG states for dropout in tensor-parallel regions.
    tracker = tp_random.get_cuda_rng_tracker()
    tracker_cls = type(tracker)
    tracker_cls.fork = lambda self, name=None: contextlib.nullcontext()  # type: ignore[assignment]
    tracker_cls.add = lambda self, name, seed: None  # type: ignore[assignment]
    # model_parallel_cuda_manual_seed seeds CUDA generators; on CPU the torch seed suffices.
    tp_random.model_parallel_cuda_manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)  # type: ignore[assignment]

    _APPLIED = True
    return True


@functools.lru_cache
def _causal_mask_on_cpu(sq: int) -> torch.Tensor:
    """megatron.core.transformer.utils.get_default_causal_mask, made on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _TorchOnCpu:
    """`torch` as megatron's pipeline schedules see it: what they ask for on "cuda" is made on
    the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)
