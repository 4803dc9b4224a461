"""Placement of training actors, rollout engines and teacher replicas on a Ray cluster that
declares logical GPUs (Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES without a GPU).

The layout check runs before anything starts and names what was asked and what the cluster
has; the placement table (which unit got which node and GPU ids) has no overlap unless
train.ray.colocate says the rollout engines share the actors' GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import local_ray

from opd_core.cluster import (
    ClusterResources,
    Layout,
    LayoutError,
    NodeResources,
    actor_threads,
    dry_run,
    format_table,
    overlaps,
)
from opd_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / "configs" / "qwen3-8b-opd.yaml"


@pytest.fixture(scope="module")
def eight_gpus():
    """A local Ray cluster with 8 logical GPUs (no GPU needed)."""
    with local_ray(num_cpus=16, num_gpus=8):
        yield


def _placement_groups_left() -> list:
    import ray

    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_qwen3_layout_on_eight_gpus_is_slimes(eight_gpus):
    """configs/qwen3-8b-opd.yaml: teacher on 1 GPU, 2 training actors (TP 2), 4 rollout
    engines of 1 GPU each; every unit its own GPUs, and everything released afterwards."""
    cfg = load_config(QWEN3)
    rows = dry_run(cfg)
    print("\n" + format_table(rows))
    by_role = {
        role: [r for r in rows if r.role == role] for role in ("teacher", "actor", "rollout")
    }
    assert [len(by_role[r]) for r in ("teacher", "actor", "rollout")] == [1, 2, 4]
    assert all(len(r.gpu_ids) == 1 for r in rows)
    assert not overlaps(rows)
    assert len({(r.node_id, g) for r in rows for g in r.gpu_ids}) == 7
    assert not _placement_groups_left()


def test_a_layout_that_does_not_fit_fails_before_anything_starts(eight_gpus):
    cfg = load_config(QWEN3, ["rollout.num_engines=6"])  # 1 + 2 + 6 = 9 GPUs on 8
    with pytest.raises(LayoutError) as err:
        dry_run(cfg)
    message = str(err.value)
    assert "rollout engines 6 x 1 GPU" in message and "training actors 2 x 1 GPU" in message
    assert "teacher replicas 1 x 1 GPU" in message and "= 9 GPUs" in message
    assert "the cluster has: 8 GPUs" in message
    assert not _placement_groups_left()


def test_colocate_puts_rollout_engines_on_the_actors_gpus(eight_gpus):
    """Without colocate 4 actors + 4 engines + the teacher need 9 GPUs; with it 5 fit, and
    each engine's GPU is its actor's."""
    layout = ["train.parallel.data_parallel_size=2", "train.ray.actor_num_gpus_per_node=4"]
    with pytest.raises(LayoutError, match="does not fit"):
        dry_run(load_config(QWEN3, layout))
    rows = dry_run(load_config(QWEN3, [*layout, "train.ray.colocate=true"]))
    actors = {r.index: r.gpu_ids for r in rows if r.role == "actor"}
    engines = {r.index: r.gpu_ids for r in rows if r.role == "rollout"}
    assert len(actors) == len(engines) == 4
    assert all(engines[i] == actors[i] for i in range(4))
    assert not overlaps(rows)  # sharing is allowed between an engine and its actor only
    teacher = next(r for r in rows if r.role == "teacher")
    assert not set(teacher.gpu_ids) & {g for ids in actors.values() for g in ids}


def test_colocated_engines_must_fit_the_actors_gpus():
    cfg = load_config(QWEN3, ["train.ray.colocate=true"])  # 4 engines on 2 actor GPUs
    with pytest.raises(LayoutError, match="need 4 GPUs, but the 2 training actors hold 2"):
        Layout.from_config(cfg)


def test_each_server_must_fit_on_one_node():
    """Two 4-GPU nodes hold 8 GPUs, but not an 8-GPU engine; the error names the unit."""
    nodes = ClusterResources(
        (NodeResources("a" * 8, "10.0.0.1", 4, 32), NodeResources("b" * 8, "10.0.0.2", 4, 32))
    )
    cfg = load_config(QWEN3, ["rollout.num_engines=1", "rollout.num_gpus_per_engine=4"])
    Layout.from_config(cfg).check(nodes)  # 1 + 2 + 4 GPUs: fits on the two nodes
    too_big = load_config(QWEN3, ["rollout.num_engines=1", "rollout.num_gpus_per_engine=5"])
    with pytest.raises(LayoutError) as err:
        Layout.from_config(too_big).check(nodes)
    assert "rollout engine 0 (5 GPUs, 1 CPUs) finds no node" in str(err.value)
    assert "10.0.0.1: 4 GPUs, 32 CPUs, 10.0.0.2: 4 GPUs, 32 CPUs" in str(err.value)


def test_overlaps_names_the_units_sharing_a_gpu():
    from opd_core.cluster import PlacementRow

    rows = [
        PlacementRow("teacher", 0, "10.0.0.1", "n1", ("3",)),
        PlacementRow("rollout", 1, "10.0.0.1", "n1", ("3",)),
        PlacementRow("rollout", 2, "10.0.0.2", "n2", ("3",)),  # another node's GPU 3
    ]
    assert overlaps(rows) == ["GPU 3 on node n1 is held by teacher replica 0, rollout engine 1"]


def test_actor_threads_leave_the_cpu_servers_their_threads_in_async_rounds(monkeypatch):
    """Serial rounds: the servers idle while the actor trains, so it takes every core. Async
    rounds: engine and teacher work meanwhile, so the actor gets what their threads leave."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    toy = ROOT / "configs" / "toy.yaml"  # one thread per server
    assert actor_threads(load_config(toy)) == 8
    assert actor_threads(load_config(toy, ["rollout.async_rounds=true"])) == 6
    two_ranks = ["rollout.async_rounds=true", "train.parallel.data_parallel_size=2"]
    assert actor_threads(load_config(toy, [*two_ranks, "train.global_batch_size=256"])) == 3
    # Servers on every core (cpu_threads unset) leave none: at least one thread anyway.
    every_core = ["rollout.async_rounds=true", "rollout.cpu_threads=null"]
    assert actor_threads(load_config(toy, every_core)) == 1
    # Set by hand, it wins.
    manual = ["rollout.async_rounds=true", "train.ray.actor_num_cpus_per_rank=4"]
    assert actor_threads(load_config(toy, manual)) == 4
