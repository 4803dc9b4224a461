"""Driver side of training: a placement group of TrainActor ranks and the calls that fan out.

    with TrainerGroup(cfg, hf_config_dir, ckpt_dir, step=None, teacher_ckpt_dir=None) as group:
        batch.old_logprobs = group.compute_logprobs(batch)
        batch.ref_logprobs = group.ref_logprobs(batch)       # use_kl_loss: frozen initial student
        values = group.compute_values(batch)                  # ppo: the critic, per response token
        metrics = group.train_step(batch)          # optimizer steps of train.global_batch_size
                                                   # (+ critic steps when batch.returns is set)
        group.save_checkpoint(root, step); group.export_hf(out_dir)

World size = TP x PP x DP; one actor per rank, one placement-group bundle per actor (see
`opd_core.cluster`: {"GPU": 1, "CPU": c} each on a cluster, {"CPU": c} on CPU). The group
takes its bundles from a `Reservation` the caller made (the round loop plans actors, rollout
engines and teacher replicas together), or reserves its own. The batch is split into
contiguous data-parallel shards; every TP and PP rank of a DP group gets the same shard, and
results are gathered in sample order from TP rank 0 of the last pipeline stage of each DP
group. A rank that dies fails the call at once (`TrainingActorDied`, naming it), without
waiting for the others (they may be stuck in a collective with it). `shutdown()` (also on
`__exit__`) kills the actors, removes a placement group it reserved itself and leaves the Ray
session it joined.
"""

from __future__ import annotations

import contextlib
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray

from opd_core.algorithm.batch import TrainBatch
from opd_core.cluster import (
    COLOCATED_SHARE,
    Layout,
    PlacementRow,
    Reservation,
    actor_threads,
    ray_session,
    reserve,
)
from opd_core.config import OPDRunConfig
from opd_core.megatron import checkpoint
from opd_core.megatron.convert import load_hf_config
from opd_core.megatron.model import check_parallel_layout
from opd_core.trainer.actor import TrainActor
from opd_core.trainer.spec import ActorSpec


class TrainingActorDied(RuntimeError):
    """A training rank's actor died (killed, out of memory, its node lost)."""

    def __init__(self, rank: int, where: str, cause: BaseException):
        super().__init__(f"training actor {rank} ({where}) died: {type(cause).__name__}: {cause}")
        self.rank, self.cause = rank, cause


class TrainerGroup:
    def __init__(
        self,
        cfg: OPDRunConfig,
        hf_config_dir: str | Path,
        ckpt_dir: str | Path | None,
        step: int | None = None,
        teacher_ckpt_dir: str | Path | None = None,
        reservation: Reservation | None = None,
    ):
        """`teacher_ckpt_dir`: the Megatron teacher (opd_type=megatron), already resolved
        (`opd_core.stages.base.Stage.teacher_checkpoint`). `reservation`: the actors'
        placement group (`opd_core.cluster.reserve`); None = reserve one for this group."""
        self.cfg = cfg
        self.hf_config_dir = Path(hf_config_dir)
        parallel, ray_cfg = cfg.train.parallel, cfg.train.ray
        self.tp, self.pp, self.dp = (
            parallel.tensor_model_parallel_size,
            parallel.pipeline_model_parallel_size,
            parallel.data_parallel_size,
        )
        self.world_size = parallel.world_size
        gpus = ray_cfg.actor_num_gpus_per_node
        if gpus and self.world_size != ray_cfg.actor_num_nodes * gpus:
            raise ValueError(
                f"train.parallel TP {self.tp} x PP {self.pp} x DP {self.dp} = {self.world_size} "
                f"ranks, but train.ray gives {ray_cfg.actor_num_nodes} nodes x {gpus} GPUs = "
                f"{ray_cfg.actor_num_nodes * gpus}"
            )
        self._check_layout(teacher_ckpt_dir)  # before any actor starts
        role = Layout.from_config(cfg).role("actor")
        # Threads per rank on CPU: its share of this machine (Ray's CPUs only schedule).
        threads = actor_threads(cfg)
        spec = ActorSpec.from_config(
            cfg, hf_config_dir, ckpt_dir, step, teacher_ckpt_dir, num_threads=threads
        )
        self.actors, self.placement = [], []
        self._stack = ExitStack()
        try:
            self._stack.enter_context(ray_session(cfg))
            if reservation is None:
                reservation = reserve(role, ray_cfg.placement_timeout)
                self._stack.callback(reservation.release)
            # Under colocate the rollout engines take the other part of each GPU.
            share = 1 - COLOCATED_SHARE if ray_cfg.colocate and role.gpus else None
            remote_cls = ray.remote(TrainActor)
            self.actors = [
                remote_cls.options(**reservation.options(rank, share)).remote()
                for rank in range(self.world_size)
            ]
            self.placement = [
                PlacementRow("actor", rank, **info)
                for rank, info in enumerate(self._get([a.placement.remote() for a in self.actors]))
            ]
            master_addr, master_port = self._get([self.actors[0].node_address.remote()])[0]
            self.ranks = self._get(
                [
                    actor.setup.remote(rank, self.world_size, master_addr, master_port, spec)
                    for rank, actor in enumerate(self.actors)
                ]
            )
        except BaseException:
            self.shutdown()
            raise
        # Which actor answers for each data-parallel shard: TP rank 0 of its last pipeline stage,
        # where the outputs are.
        self.dp_leaders = {
            info["dp_rank"]: rank
            for rank, info in enumerate(self.ranks)
            if info["tp_rank"] == 0 and info["pp_rank"] == info["pp_size"] - 1
        }

    def _check_layout(self, teacher_ckpt_dir) -> None:
        check_parallel_layout(
            load_hf_config(self.hf_config_dir),
            self.tp,
            self.pp,
            f"the student {self.hf_config_dir}",
        )
        if teacher_ckpt_dir is not None:
            check_parallel_layout(
                load_hf_config(checkpoint.stored_hf_config_dir(teacher_ckpt_dir)),
                self.tp,
                self.pp,
                f"the teacher {teacher_ckpt_dir}",
            )

    # ------------------------------------------------------------------ fan-out calls

    def _shards(self, batch: TrainBatch) -> list[TrainBatch]:
        bounds = np.linspace(0, len(batch), self.dp + 1).round().astype(int)
        return [batch.select(list(range(bounds[d], bounds[d + 1]))) for d in range(self.dp)]

    def _run_sharded(self, method: str, batch: TrainBatch, *args) -> list:
        """Call `method(shard, *args)` on every rank with its DP shard; the results of each DP
        rank, in order."""
        shards = self._shards(batch)
        refs = [
            getattr(actor, method).remote(shards[self.ranks[r]["dp_rank"]], *args)
            for r, actor in enumerate(self.actors)
        ]
        results = self._get(refs)
        return [results[self.dp_leaders[d]] for d in range(self.dp)]

    def _get(self, refs: list) -> list:
        """ray.get of one call per rank, failing at the first rank that died."""
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
        except ray.exceptions.RayActorError as err:
            rank = next((r for r, ref in enumerate(refs) if ref in done), -1)
            raise TrainingActorDied(rank, self._where(rank), err) from err
        return ray.get(refs)

    def _where(self, rank: int) -> str:
        if 0 <= rank < len(self.placement):
            row = self.placement[rank]
            return f"node {row.node_ip}, GPUs [{','.join(row.gpu_ids)}]"
        return "not placed yet"

    def compute_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        return [row for shard in self._run_sharded("compute_logprobs", batch) for row in shard]

    def teacher_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        return [row for shard in self._run_sharded("teacher_logprobs", batch) for row in shard]

    def teacher_topk(
        self, batch: TrainBatch, k: int
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """The Megatron teacher's (logprobs, topk_ids, topk_logprobs) lists, like
        `EngineClient.score_topk`."""
        rows = [row for shard in self._run_sharded("teacher_topk", batch, k) for row in shard]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def ref_logprobs(self, batch: TrainBatch) -> list[np.ndarray]:
        """The frozen initial student's log-probs (algorithm.use_kl_loss)."""
        return [row for shard in self._run_sharded("ref_logprobs", batch) for row in shard]

    def compute_values(self, batch: TrainBatch) -> list[np.ndarray]:
        """The critic's value per response token (advantage_estimator=ppo)."""
        return [row for shard in self._run_sharded("compute_values", batch) for row in shard]

    def train_step(self, batch: TrainBatch) -> dict:
        """One optimizer step per `train.global_batch_size` samples; metrics averaged over steps."""
        size = self.cfg.train.global_batch_size
        steps = [
            self._run_sharded(
                "train_step", batch.select(list(range(i, min(i + size, len(batch)))))
            )[0]
            for i in range(0, len(batch), size)
        ]
        out = {
            k: float(np.mean([s[k] for s in steps]))
            for k in steps[0]
            if k not in ("iteration", "num_tokens")
        }
        out.update(
            iteration=steps[-1]["iteration"],
            num_tokens=sum(s["num_tokens"] for s in steps),
            optimizer_steps=len(steps),
        )
        return out

    def save_checkpoint(self, ckpt_root, step: int) -> str:
        return self._get([a.save_checkpoint.remote(str(ckpt_root), step) for a in self.actors])[0]

    def load_checkpoint(self, ckpt_root, step: int | None = None) -> dict:
        return self._get([a.load_checkpoint.remote(str(ckpt_root), step) for a in self.actors])[0]

    def export_hf(self, out_dir, hf_config_dir=None) -> str:
        hf_config_dir = str(hf_config_dir or self.hf_config_dir)
        return self._get([a.export_hf.remote(str(out_dir), hf_config_dir) for a in self.actors])[0]

    # ---------------------------------------------------------------------- lifetime

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []
        self._stack.close()  # its own placement group, then the Ray session

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
