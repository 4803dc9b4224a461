"""One training rank: a Megatron GPTModel (student, optionally a frozen teacher) in a Ray actor.

    spec = ActorSpec.from_config(cfg, hf_config_dir, checkpoint_dir)   # in the driver (spec.py)
    actor = ray.remote(TrainActor).remote()          # TrainerGroup does this for every rank
    actor.setup.remote(rank, world_size, addr, port, spec)
    actor.compute_logprobs.remote(batch)   # -> list[np.ndarray], one per sample
    actor.teacher_logprobs.remote(batch)   # opd_type=megatron: the teacher in this actor
    actor.ref_logprobs.remote(batch)       # use_kl_loss: the frozen initial student
    actor.compute_values.remote(batch)     # advantage_estimator=ppo: the critic's V per token
    actor.train_step.remote(batch)         # one optimizer step on this rank's shard -> metrics
                                           # (+ one critic step when batch.returns is set)
    actor.save_checkpoint.remote(root, step); actor.load_checkpoint.remote(root, step)
    actor.export_hf.remote(out_dir, hf_config_dir)

`batch` is this rank's data-parallel shard (every TP rank of a DP group gets the same one).
The loss of a micro-batch is weighted by its share of the global token count, so gradient
accumulation over micro-batches and the sum over data-parallel ranks give exactly the
token-mean loss of the whole global batch, whatever TP/DP/micro-batch sizes are chosen. The
critic's value loss is weighted the same way.

Optional models, built only when the algorithm needs them (no memory cost otherwise):
- `self.reference` (algorithm.use_kl_loss): a frozen copy of the student as set up, i.e. the
  initial policy (the loop sets up from the converted student and resumes through
  `load_checkpoint`, which never touches the reference).
- `self.critic` + its own AdamW (advantage_estimator=ppo): see `opd_core.megatron.critic`;
  lr = train.critic_lr or train.lr. Checkpoints hold it under `iter_XXXXXXX/critic/` and its
  optimizer under `iter_XXXXXXX/train_state/critic/`, so a resumed ppo run continues exactly.
"""

from __future__ import annotations

import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from opd_core.algorithm.batch import TrainBatch
from opd_core.algorithm.losses import masked_mean, policy_loss, value_loss
from opd_core.algorithm.opd import OPDTerm
from opd_core.megatron import checkpoint, mapping
from opd_core.megatron.convert import load_hf_config, write_hf_dir
from opd_core.megatron.critic import (
    build_critic_model,
    copy_trunk_from_student,
    load_critic,
    response_values,
    save_critic,
)
from opd_core.megatron.layout import Layout
from opd_core.megatron.model import (
    build_gpt_model,
    model_family,
    resolve_share_prompts,
    response_entropy,
    response_logprobs,
    response_logprobs_of,
    response_topk,
    response_vocab_logprobs,
)
from opd_core.megatron.optim import build_optimizer
from opd_core.megatron.parallel import destroy_distributed, free_port, init_distributed
from opd_core.megatron.pipeline import run_forward, run_forward_backward
from opd_core.trainer.spec import ActorSpec
from opd_core.trainer.token_weights import (
    global_tokens_of,
    token_mean,
    weighted_by_tokens,
    with_loss_masks,
)

TRAIN_STATE = "train_state"  # per-rank optimizer / RNG / iteration files inside iter_XXXXXXX/
CRITIC_DIR = (
    "critic"  # the critic's torch_dist inside iter_XXXXXXX/, its optimizer in train_state/critic/
)
# What policy_loss reports (NaN where not computed, e.g. entropy under TP without an entropy bonus).
METRIC_KEYS = ("loss", "pg_loss", "clip_frac", "ppo_kl", "entropy", "kl_loss", "opd_topk_kl")
# Reported only when the batch carries teacher log-probs (OPD).
OPD_METRIC_KEYS = ("opd_reverse_kl", "teacher_logprob_mean")
CRITIC_METRIC_KEYS = ("value_loss", "value_clip_frac", "value_mean")


class TrainActor:
    """Not a Ray actor by itself: TrainerGroup wraps it with `ray.remote` (tests call it
    directly)."""

    def __init__(self) -> None:
        self.model = None
        self.teacher = None
        self.reference = None  # use_kl_loss
        self.critic = self.critic_optim = None  # advantage_estimator=ppo
        self._critic_loaded = False
        self.iteration = 0

    # ------------------------------------------------------------------------ setup

    # Ray is imported in the two methods that need it, not at the top: scripts/gpu_check.py
    # runs a TrainActor in its own process on a machine without Ray.
    def placement(self) -> dict:
        """This rank's node and GPU ids (`opd_core.cluster.where`), for the placement table."""
        from opd_core.cluster import where

        return where()

    def node_address(self) -> tuple[str, int]:
        """(ip, free port) on this actor's node: the rendezvous of the process group."""
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return ip, free_port("" if ip != "127.0.0.1" else "127.0.0.1")

    def setup(
        self, rank: int, world_size: int, master_addr: str, master_port: int, spec: ActorSpec
    ) -> dict:
        if spec.num_threads and not torch.cuda.is_available():
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.parallel, self.train_cfg, self.algorithm = spec.parallel, spec.train, spec.algorithm
        self.opd = OPDTerm.from_config(spec.algorithm)
        init_distributed(
            rank,
            world_size,
            master_addr,
            master_port,
            tp=self.parallel.tensor_model_parallel_size,
            pp=self.parallel.pipeline_model_parallel_size,
            seed=spec.seed,
        )
        self.rank = rank
        self.hf_config_dir = spec.hf_config_dir
        self.hf_config = load_hf_config(spec.hf_config_dir)
        self.dtype = _dtype(self.train_cfg.dtype)
        # One row per distinct prompt in every forward (megatron.layout) where the attention
        # kernel allows it.
        self.share_prompts = resolve_share_prompts(
            self.train_cfg.share_prompts, self.train_cfg.attention_backend
        )
        self.model = self._build_model(self.hf_config)
        self.optim = build_optimizer(self.model, self.train_cfg, spec.schedule)
        if self.algorithm.advantage_estimator == "ppo":
            self._build_critic()
        if spec.checkpoint_dir is not None:
            # The critic too, if that checkpoint has one.
            self.load_checkpoint(spec.checkpoint_dir, spec.checkpoint_step)
        if self.critic is not None and not self._critic_loaded:
            copy_trunk_from_student(self.critic, self.module)
        if self.algorithm.use_kl_loss:
            self.reference = self._build_model(self.hf_config)
            self.reference.load_state_dict(self.module.state_dict())
            self.reference.eval().requires_grad_(False)
        if spec.teacher_checkpoint_dir is not None:
            self._load_teacher(spec.teacher_checkpoint_dir, spec.teacher_step)
        return {
            "rank": rank,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tp_size": ps.get_tensor_model_parallel_world_size(),
            "dp_size": ps.get_data_parallel_world_size(),
            "pp_size": ps.get_pipeline_model_parallel_world_size(),
        }

    @property
    def module(self):
        return self.optim.module

    def _build_model(self, hf_config):
        return build_gpt_model(
            hf_config, dtype=self.dtype, attention_backend=self.train_cfg.attention_backend
        )

    def _build_critic(self) -> None:
        self.critic = build_critic_model(
            self.hf_config, dtype=self.dtype, attention_backend=self.train_cfg.attention_backend
        )
        # The policy's schedule shape at the critic's peak lr.
        schedule = self.spec.schedule.with_peak(self.train_cfg.critic_lr or self.train_cfg.lr)
        self.critic_optim = build_optimizer(self.critic, self.train_cfg, schedule)
        self._critic_loaded = False  # set by load_checkpoint when a checkpoint holds a critic

    def _load_teacher(self, teacher_ckpt_dir, teacher_step: int | None) -> None:
        teacher_config = load_hf_config(checkpoint.stored_hf_config_dir(teacher_ckpt_dir))
        student = (model_family(self.hf_config), self.hf_config.vocab_size)
        teacher = (model_family(teacher_config), teacher_config.vocab_size)
        if student != teacher:
            raise ValueError(
                "opd_type=megatron needs a teacher of the student's architecture and vocabulary: "
                f"student is {student[0]} (vocab {student[1]}), teacher {teacher_ckpt_dir} is "
                f"{teacher[0]} (vocab {teacher[1]})"
            )
        self.teacher = self._build_model(teacher_config)
        checkpoint.load_model(self.teacher, teacher_ckpt_dir, teacher_step)
        self.teacher.eval().requires_grad_(False)

    # ---------------------------------------------------------------------- forward

    def _micro_batches(self, batch: TrainBatch) -> list[TrainBatch]:
        size = self.train_cfg.micro_batch_size
        return [
            batch.select(list(range(i, min(i + size, len(batch)))))
            for i in range(0, len(batch), size)
        ]

    def _forward(self, model, batch: TrainBatch, per_sample) -> list:
        """per_sample(output, micro, layout) over this shard's micro-batches (see
        megatron.pipeline)."""
        return run_forward(model, self._micro_batches(batch), per_sample, self.share_prompts)

    def _logprobs(self, model, batch: TrainBatch) -> list[np.ndarray]:
        return self._forward(
            model,
            batch,
            lambda logits, _micro, layout: layout.split_numpy(response_logprobs(logits, layout)),
        )

    def compute_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        """The student's log-prob of every response token (the 'old' log-probs of PPO)."""
        return self._logprobs(self.module, batch)

    def teacher_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        return self._logprobs(self._teacher(), batch)

    def teacher_topk(
        self, batch: TrainBatch, k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(logprobs, topk_ids, topk_logprobs) per sample from the Megatron teacher (top-k OPD)."""
        return self._forward(
            self._teacher(),
            batch,
            lambda logits, _micro, layout: response_topk(logits, layout, k),
        )

    def _teacher(self):
        if self.teacher is None:
            raise RuntimeError(
                "no megatron teacher loaded: set algorithm.opd_type=megatron and opd_teacher_load"
            )
        return self.teacher

    def ref_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        """The frozen reference (initial student) log-prob of every response token."""
        if self.reference is None:
            raise RuntimeError(
                "no reference model: it is built only with algorithm.use_kl_loss=true"
            )
        return self._logprobs(self.reference, batch)

    def compute_values(self, batch: TrainBatch) -> list[np.ndarray]:
        """The critic's V per response token, aligned with the log-probs (empty for an empty
        response)."""
        if self.critic is None:
            raise RuntimeError("no critic: it is built only with algorithm.advantage_estimator=ppo")
        return self._forward(
            self.critic,
            batch,
            lambda output, _micro, layout: layout.split_numpy(response_values(output)),
        )

    # ---------------------------------------------------------------------- training

    def train_step(self, batch: TrainBatch) -> dict:
        """One optimizer step over this rank's shard of the global batch; global metrics."""
        if len(batch) and not batch.advantages:
            raise ValueError("TrainBatch.advantages is empty: compute advantages before train_step")
        batch = with_loss_masks(batch)
        global_tokens = global_tokens_of(batch)
        need_entropy = (
            self.algorithm.entropy_coef > 0 or ps.get_tensor_model_parallel_world_size() == 1
        )

        def loss_of(logits, micro: TrainBatch, layout: Layout):
            # The full-vocabulary log-softmax (gathered under TP), once for the entropy, top-k
            # and the sampled tokens' log-probs.
            vocab = (
                response_vocab_logprobs(logits) if need_entropy or micro.teacher_topk_ids else None
            )
            logprobs = layout.padded(response_logprobs(logits, layout, vocab))
            padded = partial(_padded_field, layout, micro)  # padded("advantages"), ...
            mask = padded("loss_masks")
            # No stored old log-probs = on-policy: the ratio is 1 at this step.
            old = padded("old_logprobs") if micro.old_logprobs else logprobs.detach()
            loss, metrics = policy_loss(
                logprobs,
                old,
                padded("advantages"),
                mask,
                self.algorithm,
                ref_logprobs=padded("ref_logprobs") if micro.ref_logprobs else None,
                entropy=layout.padded(response_entropy(vocab)) if need_entropy else None,
            )
            if micro.teacher_logprobs:  # OPD: the sampled tokens' reverse KL, before the step
                teacher = padded("teacher_logprobs")
                metrics = {
                    **metrics,
                    "opd_reverse_kl": float(masked_mean(old - teacher, mask)),
                    "teacher_logprob_mean": float(masked_mean(teacher, mask)),
                }
            if micro.teacher_topk_ids:  # top-k OPD: the OPD term is this dense loss
                opd_loss, topk_kl = self.opd.dense_loss(
                    layout.padded(response_logprobs_of(vocab, layout, micro.teacher_topk_ids)),
                    padded("teacher_topk_logprobs"),
                    mask,
                )
                loss = loss + opd_loss
                metrics = {
                    **metrics,
                    "opd_topk_kl": float(topk_kl.detach()),
                    "loss": float(loss.detach()),
                }
            return weighted_by_tokens(loss, metrics, mask, global_tokens)

        self.optim.zero_grad()
        micro_metrics = run_forward_backward(
            self.optim.model, self._micro_batches(batch), loss_of, self.share_prompts
        )
        stats = self.optim.step()
        self.iteration += 1
        # One reduction for all keys; the OPD ones only when the batch carries teacher
        # log-probs (the same on every rank: each DP shard of such a batch has the field).
        keys = METRIC_KEYS + (OPD_METRIC_KEYS if batch.teacher_logprobs is not None else ())
        out = token_mean(micro_metrics, keys, global_tokens)
        out.update(stats)
        # `returns is not None` holds on every DP shard of a batch that has returns (an empty shard
        # gets []), so all ranks agree on taking the critic step and its collectives.
        if self.critic is not None and batch.returns is not None:
            out.update(self._critic_step(batch, global_tokens))
        out.update(num_tokens=global_tokens, iteration=self.iteration)
        return out

    def _critic_step(self, batch: TrainBatch, global_tokens: float) -> dict:
        """One critic optimizer step on the clipped value loss; token-weighted like the policy
        loss."""

        def loss_of(output, micro: TrainBatch, layout: Layout):
            padded = partial(_padded_field, layout, micro)
            values = layout.padded(response_values(output))
            mask = padded("loss_masks")
            # No stored old values: the clip is centred on the current ones (no clipping now).
            old = padded("old_values") if micro.old_values else values.detach()
            returns = padded("returns")
            loss, metrics = value_loss(values, old, returns, mask, self.algorithm.value_clip)
            return weighted_by_tokens(loss, metrics, mask, global_tokens)

        self.critic_optim.zero_grad()
        micro_metrics = run_forward_backward(
            self.critic_optim.model, self._micro_batches(batch), loss_of, self.share_prompts
        )
        stats = self.critic_optim.step()
        out = token_mean(micro_metrics, CRITIC_METRIC_KEYS, global_tokens)
        out.update(critic_grad_norm=stats["grad_norm"], critic_lr=stats["lr"])
        return out

    # ------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, ckpt_root, step: int) -> str:
        """torch_dist model (Megatron-LM layout) + this rank's optimizer, RNG and iteration."""

        def side_files(tmp: Path) -> None:
            state_dir = tmp / TRAIN_STATE
            state_dir.mkdir(exist_ok=True)
            self.optim.save(state_dir, self.rank)
            if self.critic is not None:
                save_critic(self.critic, tmp / CRITIC_DIR)
                (state_dir / CRITIC_DIR).mkdir(exist_ok=True)
                self.critic_optim.save(state_dir / CRITIC_DIR, self.rank)
            torch.save(
                {
                    "iteration": self.iteration,
                    "world_size": dist.get_world_size(),
                    "parallel": self.parallel.model_dump(),
                    "rng": _rng_state(),
                },
                state_dir / f"rank{self.rank:05d}.pt",
            )

        path = checkpoint.save_model(self.module, ckpt_root, step, extra=side_files)
        if self.rank == 0:
            checkpoint.store_hf_config(ckpt_root, self.hf_config_dir)
        return str(path)

    def load_checkpoint(self, ckpt_root, step: int | None = None) -> dict:
        """Model weights (any TP size); optimizer/RNG/iteration too when saved with this layout."""
        path = checkpoint.load_model(self.module, ckpt_root, step)
        state_file = path / TRAIN_STATE / f"rank{self.rank:05d}.pt"
        resumed = False
        critic_in_checkpoint = self.critic is not None and (path / CRITIC_DIR).is_dir()
        if critic_in_checkpoint:
            load_critic(self.critic, path / CRITIC_DIR)
            self._critic_loaded = True
        if state_file.is_file():
            state = torch.load(state_file, map_location="cpu", weights_only=False)
            same_layout = (
                state["world_size"] == dist.get_world_size()
                and state["parallel"] == self.parallel.model_dump()
            )
            if same_layout:  # torch AdamW state is per shard: it only fits the same TP/DP layout
                self.optim.load(path / TRAIN_STATE, self.rank)
                if critic_in_checkpoint:
                    self.critic_optim.load(path / TRAIN_STATE / CRITIC_DIR, self.rank)
                _set_rng_state(state["rng"])
                resumed = True
            self.iteration = state["iteration"]
        return {
            "path": str(path),
            "resumed_optimizer": resumed,
            "iteration": self.iteration,
            "resumed_critic": critic_in_checkpoint,
        }

    def export_hf(self, out_dir, hf_config_dir=None) -> str | None:
        """Write an HF model dir (rank 0) usable by transformers and /update_weights_from_disk."""
        hf_config_dir = Path(hf_config_dir or self.hf_config_dir)
        if (
            ps.get_model_parallel_group().size() == 1
        ):  # no TP or PP: every rank holds the whole model
            if self.rank != 0:
                return None
            tensors = mapping.model_state_dict_to_megatron(
                self.module, self.hf_config.num_hidden_layers
            )
            return str(write_hf_dir(tensors, hf_config_dir, out_dir))
        # Under TP or PP the full tensors exist only on disk: save, then convert from the files.
        tmp_root = Path(out_dir).parent / f".{Path(out_dir).name}.torch_dist"
        checkpoint.save_model(self.module, tmp_root, None)
        result = None
        if self.rank == 0:
            result = str(
                write_hf_dir(checkpoint.read_global_tensors(tmp_root), hf_config_dir, out_dir)
            )
            shutil.rmtree(tmp_root, ignore_errors=True)
        if dist.get_world_size() > 1:
            dist.barrier()
        return result

    def shutdown(self) -> None:
        destroy_distributed()


def _padded_field(layout: Layout, micro: TrainBatch, field: str) -> torch.Tensor:
    """A TrainBatch field of per-sample [len(response_i), ...] arrays as the losses take it,
    [samples, longest response, ...]; errors name the field."""
    return layout.padded_values(getattr(micro, field), field)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
