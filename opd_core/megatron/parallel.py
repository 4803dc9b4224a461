"""Process group and Megatron model-parallel state for one training rank.

    init_distributed(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                     tp=1, pp=1)
    ...
    destroy_distributed()

gloo on CPU, nccl on CUDA. Everything happens inside functions: `dist_checkpointing.save`
starts spawn-context processes that re-import this module, so importing must not touch
torch.distributed (importing megatron.core does not).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from opd_core.megatron.cpu_shims import apply_cpu_shims


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    tp: int = 1,
    pp: int = 1,
    seed: int = 0,
) -> None:
    """Join the process group and set up Megatron's TP/PP/DP groups (dp = world // (tp*pp))."""
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by "
            f"tensor_parallel {tp} x pipeline_parallel {pp}"
        )
    apply_cpu_shims()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(
            int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    torch.manual_seed(seed)
    if cuda:
        model_parallel_cuda_manual_seed(seed)


def init_single_process(tp: int = 1) -> None:
    """World size 1 on this process (conversion, parity checks, tests)."""
    init_distributed(0, 1, "127.0.0.1", free_port(), tp=tp, pp=1)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
