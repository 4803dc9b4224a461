"""Optimizer for the Megatron actor: Megatron's DDP + DistributedOptimizer on CUDA, torch
AdamW with explicit gradient all-reduce and clipping on CPU; megatron-core's
OptimizerParamScheduler sets the lr (warmup + decay) on both.

    trainer = build_optimizer(model, train_cfg, cfg.lr_schedule)   # -> ModelOptimizer
    trainer.zero_grad(); loss.backward() ...; stats = trainer.step()   # {"grad_norm", "lr"}

Megatron's optimizer and DDP wrappers need CUDA; on CPU the same semantics are written out:
gradients are summed over the data-parallel group (the loss is already normalised by the
global token count; on CUDA `calculate_per_token_loss` makes Megatron's DDP sum too), the two
copies of a tied embedding under pipeline parallel are summed, the norm counts tensor-parallel
shards and pipeline stages once each and replicated parameters once, and the update is AdamW
with the configured lr, betas, weight decay and clipping.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from opd_core.config import LRSchedule, TrainConfig


class ModelOptimizer:
    """What the actor needs from an optimizer, on either device."""

    def __init__(self, model, optimizer, train_cfg, schedule: LRSchedule, megatron: bool):
        self.model, self.optimizer, self.megatron = model, optimizer, megatron
        self.clip_grad = train_cfg.clip_grad
        # override: a resumed run follows the schedule of its (possibly longer) current config
        # from the restored step count, instead of the one stored in the checkpoint.
        self.scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=schedule.warmup_init,
            max_lr=schedule.lr,
            min_lr=schedule.min_lr,
            lr_warmup_steps=schedule.warmup_steps,
            lr_decay_steps=max(schedule.decay_steps, schedule.warmup_steps + 1),
            lr_decay_style=schedule.decay_style,
            start_wd=train_cfg.weight_decay,
            end_wd=train_cfg.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )

    @property
    def lr(self) -> float:
        """The lr of the next step."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def module(self):
        """The bare GPTModel (under the DDP wrapper on CUDA)."""
        return self.model.module if self.megatron else self.model

    def zero_grad(self) -> None:
        if self.megatron:
            self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> dict[str, float]:
        if self.megatron:
            # DP reduce-scatter (a sum: calculate_per_token_loss), the TP all-reduce of
            # qk-layernorm grads and, under PP, of the tied embedding's two copies (as
            # Megatron-LM's schedule does).
            finalize_model_grads([self.model])
            lr = self.lr
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(1)
            return {"grad_norm": float(grad_norm or 0.0), "lr": lr}
        params = [p for p in self.model.parameters() if p.requires_grad]
        _all_reduce_tensor_parallel_partial_grads(self.model)
        _all_reduce_tied_embedding_grads(self.model)
        _all_reduce_data_parallel_grads(params)
        grad_norm = _global_grad_norm(params)
        if self.clip_grad and grad_norm > self.clip_grad:
            # grads *= clip_grad / (grad_norm + 1e-6), the global norm's (not this rank's).
            torch.nn.utils.clip_grads_with_norm_(
                params, self.clip_grad, torch.tensor(grad_norm, dtype=torch.float32)
            )
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step(1)
        return {"grad_norm": grad_norm, "lr": lr}

    def save(self, directory, rank: int) -> None:
        """Write this rank's optimizer state into `directory` (a checkpoint being written)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, Path(directory) / f"optimizer_rank{rank:05d}.pt")
        if self.megatron and hasattr(
            self.optimizer, "save_parameter_state"
        ):  # pragma: no cover - CUDA
            self.optimizer.save_parameter_state(str(Path(directory) / "distrib_optimizer.pt"))

    def load(self, directory, rank: int) -> None:
        state = torch.load(
            Path(directory) / f"optimizer_rank{rank:05d}.pt", map_location="cpu", weights_only=False
        )
        self.optimizer.load_state_dict(state["optimizer"])
        if not self.megatron:
            # torch restores each param group's kernel choice (`fused`, `foreach`) from the
            # checkpoint, so one written by an unfused AdamW (before this build) would make
            # the resumed run step unfused: same update, 3x slower. The kernel is this
            # build's choice, not training state.
            for group in self.optimizer.param_groups:
                group["fused"] = self.optimizer.defaults["fused"]
                group["foreach"] = self.optimizer.defaults["foreach"]
        self.scheduler.load_state_dict(state["scheduler"])
        if self.megatron and hasattr(
            self.optimizer, "load_parameter_state"
        ):  # pragma: no cover - CUDA
            self.optimizer.load_parameter_state(str(Path(directory) / "distrib_optimizer.pt"))


def build_optimizer(model, train_cfg: TrainConfig, schedule: LRSchedule) -> ModelOptimizer:
    """AdamW with the given schedule; `schedule.lr` is the peak (the critic's differs)."""
    if torch.cuda.is_available():
        return _megatron_optimizer(model, train_cfg, schedule)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=schedule.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.weight_decay,
        eps=1e-8,
        # One kernel for all parameters (CPU since torch 2.4) instead of a dozen ops on each:
        # a toy step's update 0.7 -> 0.2 ms.
        fused=True,
    )
    return ModelOptimizer(model, optimizer, train_cfg, schedule, megatron=False)


def _megatron_optimizer(
    model, train_cfg, schedule: LRSchedule
) -> ModelOptimizer:  # pragma: no cover
    bf16 = model.config.bf16
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=schedule.lr,
        min_lr=schedule.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=1e-8,
        clip_grad=train_cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [wrapped])
    return ModelOptimizer(wrapped, optimizer, train_cfg, schedule, megatron=True)


def _all_reduce_tensor_parallel_partial_grads(model) -> None:
    """Sum the grads of TP-replicated params that each TP rank sees only part of.

    q_layernorm/k_layernorm weights are shared by all heads, and each TP rank holds half of
    the heads, so each rank computes a partial gradient (Megatron's finalize_model_grads does
    the same all-reduce). Without it the replicas drift apart step by step.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    params = [
        p
        for name, p in model.named_parameters()
        if p.grad is not None
        and (
            "q_layernorm" in name
            or "k_layernorm" in name
            or getattr(p, "average_gradients_across_tp_domain", False)
        )
    ]
    if not params:
        return
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for p, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if getattr(p, "average_gradients_across_tp_domain", False):
            synced = synced / parallel_state.get_tensor_model_parallel_world_size()
        p.grad.copy_(synced)


def _all_reduce_tied_embedding_grads(model) -> None:
    """Under PP with tied embeddings, sum the gradients of the first stage's embedding and the
    last stage's copy of it (the output layer), so both copies take the same update."""
    if (
        parallel_state.get_pipeline_model_parallel_world_size() == 1
        or not parallel_state.is_rank_in_embedding_group()
    ):
        return
    for p in model.parameters():
        if getattr(p, "shared_embedding", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=parallel_state.get_embedding_group())


def _all_reduce_data_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    if parallel_state.get_data_parallel_world_size() == 1:
        return
    group = parallel_state.get_data_parallel_group()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(
        flat, group=group
    )  # SUM: each rank's loss is already divided by the global token count
    for p, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = synced.clone() if p.grad is None else p.grad.copy_(synced)


def _global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the full model's gradient: TP shards and PP stages summed, TP-replicated params
    and the last stage's copy of a tied embedding counted once."""
    grads = [
        p.grad.detach()
        for p in params
        if p.grad is not None
        and param_is_not_tensor_parallel_duplicate(p)
        and param_is_not_shared(p)
    ]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    squared = norm.double().cpu() ** 2
    if parallel_state.get_model_parallel_group().size() > 1:  # TP x PP
        dist.all_reduce(squared, group=parallel_state.get_model_parallel_group())
    return float(squared.sqrt())
