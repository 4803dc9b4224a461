"""Where every process of a run goes: training actors, rollout engines and teacher replicas
planned in one place, checked against the Ray cluster before anything starts, and held in
Ray placement groups.

    layout = Layout.from_config(cfg)                 # what each role asks for
    with ray_session(cfg, layout):                   # joins train.ray.address or starts Ray
        layout.check(ClusterResources.from_ray())    # LayoutError: asked vs what the cluster has
        engines = reserve(layout.role("rollout"), timeout=300)
        EngineActor.options(**engines.options(0)).remote()
    rows = dry_run(cfg)                              # the placement table; no server started
    python -m opd_core.cluster --config configs/qwen3-8b-opd.yaml --num-gpus 8

The bundles are slime's: a training-actor rank holds {"GPU": 1, "CPU": c} ({"CPU": c} on a
CPU run); a rollout engine or teacher replica with g GPUs holds one bundle {"GPU": g, "CPU":
1} ({"CPU": 1} for a CPU built-in engine). Ray assigns each unit its GPU ids and sets
CUDA_VISIBLE_DEVICES in its actor, and the server that actor starts sees only those. Roles
never share a GPU, except with `train.ray.colocate` (slime's --colocate): rollout engine e
then runs in the training actors' bundles e*g .. e*g+g-1, each taking half of the GPU.

On a CPU machine Ray still assigns logical GPU ids (`ray.init(num_gpus=8)`): the placement
logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd_core.config import OPDRunConfig

__all__ = [
    "ClusterResources",
    "Layout",
    "LayoutError",
    "PlacementRow",
    "Reservation",
    "RoleSpec",
    "dry_run",
    "format_table",
    "overlaps",
    "ray_session",
    "reserve",
    "start_ray",
    "where",
]

# On a loaded small machine a worker importing torch + megatron can take over a minute to
# register.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_register_timeout_seconds": 300}
# Under train.ray.colocate a training actor and a rollout engine split each GPU.
COLOCATED_SHARE = 0.5
# The order roles are reserved in (the teacher stage starts before training does).
ROLES = ("teacher", "actor", "rollout")
LABELS = {"teacher": "teacher replica", "actor": "training actor", "rollout": "rollout engine"}


class LayoutError(ValueError):
    """The run's layout does not fit the Ray cluster (or contradicts itself)."""


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RoleSpec:
    """What one role asks for: `count` units of `gpus` GPUs and `cpus` CPUs each."""

    name: str  # "teacher" | "actor" | "rollout"
    count: int
    gpus: int
    cpus: float
    colocated: bool = False  # rollout under train.ray.colocate: in the actors' bundles

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def describe(self) -> str:
        """e.g. `rollout engines 4 x 1 GPU`."""
        size = f"{self.gpus} GPU" if self.gpus else f"{self.cpus:g} CPU"
        shared = " on the training actors' GPUs (colocate)" if self.colocated else ""
        return f"{self.label}s {self.count} x {size}{shared}"

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(bundle) for _ in range(self.count)]


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    ip: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class ClusterResources:
    nodes: tuple[NodeResources, ...]

    @classmethod
    def from_ray(cls) -> ClusterResources:
        """The alive nodes of the connected cluster, with their total GPUs and CPUs."""
        nodes = tuple(
            NodeResources(
                node["NodeID"],
                node["NodeManagerAddress"],
                float(node["Resources"].get("GPU", 0)),
                float(node["Resources"].get("CPU", 0)),
            )
            for node in ray.nodes()
            if node.get("Alive")
        )
        return cls(nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        per_node = ", ".join(f"{n.ip}: {n.gpus:g} GPUs, {n.cpus:g} CPUs" for n in self.nodes)
        count = len(self.nodes)
        return (
            f"{self.gpus:g} GPUs, {self.cpus:g} CPUs on {count} node{'s' * (count != 1)} "
            f"({per_node})"
        )


@dataclass(frozen=True)
class Layout:
    """The roles of one run, in reservation order (`ROLES`)."""

    roles: tuple[RoleSpec, ...]

    @classmethod
    def from_config(cls, cfg: OPDRunConfig) -> Layout:
        """What `cfg` asks for. External servers hold nothing of this cluster; the teacher
        takes a place only when its log-probs come from servers (opd_type=sglang)."""
        ray_cfg, teacher, rollout = cfg.train.ray, cfg.teacher, cfg.rollout
        servers: list[RoleSpec] = []  # the SGLang-protocol servers this cluster runs
        if cfg.algorithm.teacher_source == "server" and teacher.backend != "external":
            servers.append(
                RoleSpec("teacher", teacher.num_replicas, teacher.num_gpus_per_engine, 1)
            )
        if rollout.backend != "external":
            colocated = ray_cfg.colocate and rollout.num_gpus_per_engine > 0
            engines = (rollout.num_engines, rollout.num_gpus_per_engine, 0 if colocated else 1)
            servers.append(RoleSpec("rollout", *engines, colocated))
        server_cpus = sum(r.cpus * r.count for r in servers)
        actors = RoleSpec(
            "actor",
            cfg.train.parallel.world_size,
            1 if ray_cfg.actor_num_gpus_per_node else 0,
            actor_cpus(cfg, server_cpus),
        )
        roles = sorted([*servers, actors], key=lambda r: ROLES.index(r.name))
        layout = cls(tuple(roles))
        layout._check_colocation()
        return layout

    def role(self, name: str) -> RoleSpec | None:
        return next((r for r in self.roles if r.name == name), None)

    @property
    def cpus(self) -> float:
        """CPUs the whole layout reserves (a local cluster is started with at least these)."""
        return sum(r.cpus * r.count for r in self.roles)

    def describe(self) -> str:
        own = sum(r.gpus * r.count for r in self.roles if not r.colocated)
        return ", ".join(r.describe() for r in self.roles) + f" = {own} GPUs, {self.cpus:g} CPUs"

    def _check_colocation(self) -> None:
        rollout, actor = self.role("rollout"), self.role("actor")
        if rollout is None or not rollout.colocated:
            return
        if not actor.gpus:
            raise LayoutError(
                "train.ray.colocate puts the rollout engines on the training actors' GPUs, "
                "but the actors have none (train.ray.actor_num_gpus_per_node is 0)"
            )
        if rollout.count * rollout.gpus > actor.count:
            raise LayoutError(
                f"train.ray.colocate: {rollout.describe()} need {rollout.count * rollout.gpus} "
                f"GPUs, but the {actor.count} training actors hold {actor.count}"
            )

    def check(self, cluster: ClusterResources) -> None:
        """LayoutError unless every unit fits on some node, GPUs and CPUs together. Units are
        placed largest first on the first node with room (what a PACK placement needs)."""
        free = {n.node_id: [n.gpus, n.cpus] for n in cluster.nodes}
        units = [
            (role, index)
            for role in self.roles
            for index in range(role.count)
            if not role.colocated
        ]
        units.sort(key=lambda u: (-u[0].gpus, -u[0].cpus))
        for role, index in units:
            node = next(
                (k for k, (g, c) in free.items() if g >= role.gpus and c >= role.cpus), None
            )
            if node is None:
                size = (
                    f"{role.gpus} GPUs, {role.cpus:g} CPUs" if role.gpus else f"{role.cpus:g} CPUs"
                )
                raise LayoutError(
                    "the run's layout does not fit the Ray cluster:\n"
                    f"  asked: {self.describe()}\n"
                    f"  the cluster has: {cluster.describe()}\n"
                    f"  {role.label} {index} ({size}) finds no node with room left.\n"
                    "  Ask for fewer engines, replicas or GPUs each, set train.ray.colocate, "
                    "or join a bigger cluster (train.ray.address)."
                )
            free[node][0] -= role.gpus
            free[node][1] -= role.cpus


def actor_cpus(cfg: OPDRunConfig, servers: float = 0) -> int:
    """CPUs each training-actor rank reserves in Ray: train.ray.actor_num_cpus_per_rank, else
    this machine's cores less the `servers`' (one per engine and replica), split over the
    ranks (at least 1). How many threads a rank runs is decided apart (TrainerGroup)."""
    world = cfg.train.parallel.world_size
    spare = (os.cpu_count() or 1) - servers
    return cfg.train.ray.actor_num_cpus_per_rank or max(1, int(spare // world))


def actor_threads(cfg: OPDRunConfig) -> int:
    """Torch threads per training-actor rank on the CPU: train.ray.actor_num_cpus_per_rank,
    else its share of this machine's cores. In serial rounds the servers idle while the actor
    trains, so that is every core split over the ranks; with `rollout.async_rounds` the next
    round generates and is scored while this one trains, so the actor takes only the cores
    the CPU servers' threads leave (at least 1): on 2 cores one for the engine, one for the
    teacher, one for the actor, instead of three processes fighting over both."""
    cores = os.cpu_count() or 1
    busy = 0  # threads of the CPU servers working while the actor trains
    if cfg.rollout.async_rounds:
        teacher, rollout = cfg.teacher, cfg.rollout
        cpu_teacher = teacher.backend == "builtin" and not teacher.num_gpus_per_engine
        if cfg.algorithm.teacher_source == "server" and cpu_teacher:
            busy += teacher.num_replicas * (teacher.cpu_threads or cores)
        if rollout.backend == "builtin" and not rollout.num_gpus_per_engine:
            busy += rollout.num_engines * (rollout.cpu_threads or cores)
    return actor_cpus(cfg, busy)


# ----------------------------------------------------------------------------- Ray itself


def start_ray(address: str | None, num_cpus: float) -> None:
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
    else:  # a local cluster just big enough for the layout
        ray.init(
            num_cpus=int(-(-num_cpus // 1)),
            include_dashboard=False,
            runtime_env=_runtime_env(),
            _system_config=LOCAL_RAY_SYSTEM_CONFIG,
        )
    if callable(installed):
        signal.signal(signal.SIGTERM, installed)


def _runtime_env() -> dict:
    # Workers import opd_core from this checkout (no packaging of the working dir).
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}}


_session_lock = threading.Lock()
_session_users = 0
_session_started = False


@contextlib.contextmanager
def ray_session(cfg: OPDRunConfig, layout: Layout | None = None) -> Iterator[None]:
    """Ray for the duration of the block: joined if already initialised (a test's cluster,
    `ray start`), else started (train.ray.address, or a local cluster with the CPUs the whole
    layout reserves). Nested sessions share it; the last to leave stops what the first started.
    """
    global _session_users, _session_started
    with _session_lock:
        if _session_users == 0 and not ray.is_initialized():
            layout = layout or Layout.from_config(cfg)
            start_ray(cfg.train.ray.address, max(layout.cpus, os.cpu_count() or 1))
            _session_started = True
        _session_users += 1
    try:
        yield
    finally:
        with _session_lock:
            _session_users -= 1
            if _session_users == 0 and _session_started:
                _session_started = False
                if ray.is_initialized():
                    ray.shutdown()


def multi_node() -> bool:
    """True when the cluster has several alive nodes (servers then bind their node's IP)."""
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


# ---------------------------------------------------------------------------- reservations


@dataclass
class Reservation:
    """A role's placement group and the Ray options that put unit `i` in its bundle."""

    role: RoleSpec
    placement_group: PlacementGroup
    owned: bool = True  # False: another role's group (colocate), removed by its owner

    def options(self, index: int, share: float | None = None) -> dict[str, Any]:
        """`.options(**...)` for unit `index`'s actor. `share`: the fraction of each GPU it
        takes (colocate), else all of its bundle."""
        role = self.role
        if role.colocated:  # a rollout engine inside the actors' group: bundle e*g
            bundle, gpus, cpus = index * role.gpus, COLOCATED_SHARE, 0
        else:
            bundle, gpus, cpus = index, role.gpus * (share or 1), role.cpus
        return {
            "num_gpus": gpus,
            "num_cpus": cpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=bundle
            ),
        }

    def release(self) -> None:
        if self.owned:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)


def reserve(role: RoleSpec, timeout: float, host: Reservation | None = None) -> Reservation:
    """A placement group for `role` (or, colocated, the actors' group `host`), ready within
    `timeout` s; LayoutError naming what is free otherwise (e.g. another job holds GPUs)."""
    if role.colocated:
        if host is None:
            raise ValueError(f"{role.label}s are colocated: give the actors' reservation")
        return Reservation(role, host.placement_group, owned=False)
    group = placement_group(role.bundles(), strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise LayoutError(
            f"could not reserve {role.describe()} within {timeout:.0f}s "
            f"(train.ray.placement_timeout); free in the cluster now: "
            f"{_free_resources()}"
        ) from None
    return Reservation(role, group)


def _free_resources() -> str:
    free = ray.available_resources()
    return f"{free.get('GPU', 0):g} GPUs, {free.get('CPU', 0):g} CPUs"


# ------------------------------------------------------------------------ the placement table


@dataclass(frozen=True)
class PlacementRow:
    """Where one unit landed: its node and the GPU ids Ray gave it."""

    role: str
    index: int
    node_ip: str
    node_id: str
    gpu_ids: tuple[str, ...] = ()
    url: str | None = None  # a server's, once started

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_ids": list(self.gpu_ids)}


def where() -> dict[str, Any]:
    """This Ray worker's node and GPU ids (call it inside an actor)."""
    context = ray.get_runtime_context()
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": context.get_node_id(),
        "gpu_ids": tuple(str(g) for g in ray.get_gpu_ids()),
    }


def overlaps(rows: list[PlacementRow]) -> list[str]:
    """GPUs held by more than one unit, except a rollout engine on its colocated actors'."""
    holders: dict[tuple[str, str], list[PlacementRow]] = {}
    for row in rows:
        for gpu in row.gpu_ids:
            holders.setdefault((row.node_id, gpu), []).append(row)
    problems = []
    for (node, gpu), units in sorted(holders.items()):
        roles = sorted({u.role for u in units})
        allowed = roles == ["actor", "rollout"] and sum(u.role == "actor" for u in units) == 1
        if len(units) > 1 and not allowed:
            names = ", ".join(f"{LABELS[u.role]} {u.index}" for u in units)
            problems.append(f"GPU {gpu} on node {node[:8]} is held by {names}")
    return problems


def colocated_devices(actor_rows: list[PlacementRow], engine: int, gpus: int) -> list[str]:
    """GPU ids of colocated rollout engine `engine`: those of actors e*g .. e*g+g-1, which
    must share a node (a server's GPUs are one node's)."""
    rows = sorted(actor_rows, key=lambda r: r.index)[engine * gpus : (engine + 1) * gpus]
    if len({r.node_id for r in rows}) > 1:
        raise LayoutError(
            f"train.ray.colocate: rollout engine {engine} would span nodes "
            f"{sorted({r.node_ip for r in rows})} (its {gpus} GPUs must be on one node)"
        )
    return [gpu for row in rows for gpu in row.gpu_ids]


def format_table(rows: list[PlacementRow]) -> str:
    """The placement table as aligned text."""
    header = ("role", "index", "node", "node id", "GPU ids", "url")
    lines = [
        (
            LABELS[r.role],
            str(r.index),
            r.node_ip,
            r.node_id[:8],
            ",".join(r.gpu_ids) or "-",
            r.url or "-",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
        for line in [header, *lines]
    )


class _Probe:
    """Stands in for a unit in `dry_run`: takes its resources, reports where it landed."""

    def where(self) -> dict[str, Any]:
        return where()


@dataclass
class _DryRun:
    reservations: list[Reservation] = field(default_factory=list)
    probes: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for probe in self.probes:
            with contextlib.suppress(Exception):
                ray.kill(probe)
        for reservation in reversed(self.reservations):
            reservation.release()


def dry_run(cfg: OPDRunConfig) -> list[PlacementRow]:
    """The placement table of `cfg` on the Ray cluster (joined or started as a run would):
    the layout is checked, every role's placement group reserved and a probe actor placed
    where each unit would run; then everything is released. No server or model is started."""
    layout = Layout.from_config(cfg)
    timeout = cfg.train.ray.placement_timeout
    with ray_session(cfg, layout):
        layout.check(ClusterResources.from_ray())
        state, probe_cls = _DryRun(), ray.remote(_Probe)
        try:
            rows: list[PlacementRow] = []
            actors: Reservation | None = None
            for role in layout.roles:
                reservation = reserve(role, timeout, host=actors)
                state.reservations.append(reservation)
                if role.name == "actor":
                    actors = reservation
                share = (
                    1 - COLOCATED_SHARE if role.name == "actor" and cfg.train.ray.colocate else None
                )
                probes = [
                    probe_cls.options(**reservation.options(i, share)).remote()
                    for i in range(role.count)
                ]
                state.probes += probes
                placed = ray.get([p.where.remote() for p in probes])
                for index, info in enumerate(placed):
                    if role.colocated:  # its GPUs are its actors' (a fraction of each)
                        actor_rows = [r for r in rows if r.role == "actor"]
                        info["gpu_ids"] = tuple(colocated_devices(actor_rows, index, role.gpus))
                    rows.append(PlacementRow(role.name, index, **info))
        finally:
            state.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the placement table of a config, on a local cluster declaring `--num-gpus`
    logical GPUs (or on train.ray.address with `--join`)."""
    from opd_core.config import load_config

    parser = argparse.ArgumentParser(prog="python -m opd_core.cluster", description=main.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=16)
    parser.add_argument("--join", action="store_true", help="use train.ray.address")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not args.join:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_gpus=args.num_gpus, num_cpus=args.num_cpus, include_dashboard=False)
    try:
        print(Layout.from_config(cfg).describe())
        print(format_table(dry_run(cfg)))
    except LayoutError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
