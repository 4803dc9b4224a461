"""Driver side of training: a placement group of TrainActor ranks and the calls that fan out.

    with TrainerGroup(cfg, hf_config_dir, ckpt_dir, step=None, teacher_ckpt_dir=None) as group:
        batch.old_logprobs = group.compute_logprobs(batch)
        batch.ref_logprobs = group.ref_logprobs(batch)       # use_kl_loss: frozen initial student
        values = group.compute_values(batch)                  # ppo: the critic, per response token
        metrics = group.train_step(batch)          # optimizer steps of train.global_batch_size
                                                   # (+ critic steps when batch.returns is set)
        group.save_checkpoint(root, step); group.export_hf(out_dir)

World size = TP x PP x DP; one actor per rank, one placement-group bundle per actor ({"CPU": n}
on CPU; one GPU each on a cluster). The batch is split into contiguous data-parallel shards;
every TP and PP rank of a DP group gets the same shard, and results are gathered in sample
order from TP rank 0 of the last pipeline stage of each DP group. `shutdown()` (also on
`__exit__`) kills the actors, removes the placement group and stops Ray if this group
started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig
from opd_core.megatron import checkpoint
from opd_core.megatron.convert import load_hf_config
from opd_core.megatron.model import check_parallel_layout
from opd_core.trainer.actor import TrainActor
from opd_core.trainer.spec import ActorSpec

# On a loaded small machine a worker importing torch + megatron can take over a minute to
# register.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_register_timeout_seconds": 300}


def start_ray(address: str | None, num_cpus: int) -> None:
    """Connect to the cluster at `address`, or start a local one with `num_cpus`.

    ray.init replaces the driver's SIGTERM handler with `sys.exit`. Under an orchestrator that
    installed its own (Prefect turns the SIGTERM of a cancellation into a clean CANCELLED), that
    makes a cancel look like a crash, so a handler set on purpose is put back. A default
    handler is left to Ray: its exit runs the atexit hooks that stop the local cluster.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    in_main_thread = threading.current_thread() is threading.main_thread()
    installed = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if address:
        ray.init(address=address, runtime_env=_runtime_env())
    else:  # a local cluster just big enough for the ranks
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=_runtime_env(),
            _system_config=LOCAL_RAY_SYSTEM_CONFIG,
        )
    if callable(installed):
        signal.signal(signal.SIGTERM, installed)


class TrainerGroup:
    def __init__(
        self,
        cfg: OPDRunConfig,
        hf_config_dir: str | Path,
        ckpt_dir: str | Path | None,
        step: int | None = None,
        teacher_ckpt_dir: str | Path | None = None,
    ):
        """`teacher_ckpt_dir`: the Megatron teacher (opd_type=megatron), already resolved
        (`opd_core.stages.base.Stage.teacher_checkpoint`)."""
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
        cpus = ray_cfg.actor_num_cpus_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
        spec = ActorSpec.from_config(
            cfg, hf_config_dir, ckpt_dir, step, teacher_ckpt_dir, num_threads=cpus
        )
        self._started_ray = False
        self.actors, self.placement_group = [], None
        if not ray.is_initialized():
            start_ray(ray_cfg.address, num_cpus=max(cpus * self.world_size, os.cpu_count() or 1))
            self._started_ray = True
        try:
            bundle = {"CPU": cpus, "GPU": 1} if gpus else {"CPU": cpus}
            self.placement_group = placement_group(
                [dict(bundle) for _ in range(self.world_size)], strategy="PACK"
            )
            ray.get(self.placement_group.ready(), timeout=ray_cfg.placement_timeout)
            remote_cls = ray.remote(TrainActor)
            self.actors = [
                remote_cls.options(
                    num_cpus=cpus,
                    num_gpus=1 if gpus else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.placement_group, placement_group_bundle_index=rank
                    ),
                ).remote()
                for rank in range(self.world_size)
            ]
            master_addr, master_port = ray.get(self.actors[0].node_address.remote())
            self.ranks = ray.get(
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
        results = ray.get(refs)
        return [results[self.dp_leaders[d]] for d in range(self.dp)]

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
        return ray.get([a.save_checkpoint.remote(str(ckpt_root), step) for a in self.actors])[0]

    def load_checkpoint(self, ckpt_root, step: int | None = None) -> dict:
        return ray.get([a.load_checkpoint.remote(str(ckpt_root), step) for a in self.actors])[0]

    def export_hf(self, out_dir, hf_config_dir=None) -> str:
        hf_config_dir = str(hf_config_dir or self.hf_config_dir)
        return ray.get([a.export_hf.remote(str(out_dir), hf_config_dir) for a in self.actors])[0]

    # ---------------------------------------------------------------------- lifetime

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _runtime_env() -> dict:
    # Workers import opd_core from this checkout (no packaging of the working dir).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}}
