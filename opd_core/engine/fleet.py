"""The SGLang-protocol servers of one role, placed by Ray, behind sglang-router when there are
several, relaunched when one dies, and stopped together.

    with start_servers("rollout", cfg, model_dir, run_dir.rollout_log,
                       reservation=engines, weight_version="0") as fleet:
        client = fleet.client(cfg.client)      # the router's URL; batches survive a relaunch
        fleet.update_weights(export_dir, "1")  # every engine directly, versions checked
        fleet.restarts                         # relaunches so far

A role is the student's rollout engines (`cfg.rollout`, `num_engines`) or the teacher's
replicas (`cfg.teacher`, `num_replicas`), both `ServerConfig`s. backend builtin / sglang:
each server is started by an `EngineActor`, a Ray actor that holds the server's
placement-group bundle (`opd_core.cluster`) and starts the server process with the GPUs Ray
assigned it (CUDA_VISIBLE_DEVICES; empty for a CPU engine, which then never touches a GPU),
on the configured host, except that a server of a multi-node cluster binds its node's IP
rather than 127.0.0.1. With more than one server, sglang-router runs in front of them (on
this machine, CPU only) and clients talk to it; `/update_weights_from_disk` is not routed, so
weight updates go to each server directly. external: the configured URLs, checked to answer,
never started, stopped or relaunched here.

Self-healing. A watchdog thread asks every server's actor for its process's exit code each
second. A dead server (or a dead actor) is relaunched in the same bundle, on the same port
(so the router's entry stays valid), with the role's current weights and `weight_version`
(`update_weights` records them before it sends them), at most `max_restarts` times per
fleet; one more death is a `FleetError` naming the server. Requests the router had sent to a
dead server are retried by the router on the others; a batch request the client saw fail
on every URL is retried once the fleet has healed (`EngineClient(recover=fleet.recover)`).
The client puts each batch's answers at that batch's positions, so a retried batch can
neither duplicate nor drop a row.

Stopping: each actor stops its server's process group; the servers also run under the
launcher's parent guard, so a killed actor (or a driver whose actors Ray removes) takes its
server with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray

from opd_core.cluster import (
    PlacementRow,
    Reservation,
    RoleSpec,
    multi_node,
    ray_session,
    reserve,
    where,
)
from opd_core.config import ClientConfig, OPDRunConfig, ServerConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.launcher import (
    EngineLaunchError,
    ServerProcess,
    check_external,
    free_port,
    launch_server,
)
from opd_core.engine.router import RouterProcess, launch_router
from opd_core.engine.transport import EngineError, EngineRequestError

__all__ = ["EngineActor", "FleetError", "ServerFleet", "start_servers"]

logger = logging.getLogger("opd.fleet")

LABELS = {"rollout": "rollout engine", "teacher": "teacher replica"}
WATCH_INTERVAL_S = 1.0
POLL_TIMEOUT_S = 30.0  # an actor that does not answer this long is treated as dead


class FleetError(RuntimeError):
    """A server of the fleet died with no restarts left, or disagrees about its weights."""


class EngineActor:
    """Ray actor holding one server's bundle: starts the server with the bundle's GPUs, tells
    its exit code, stops it. Threaded (max_concurrency), so that the watchdog's polls are
    answered while a start is waiting for the server to come up."""

    def __init__(self) -> None:
        self.server: ServerProcess | None = None

    def start(
        self,
        backend: str,
        model_path: str,
        cfg: ServerConfig,
        log_path: str,
        host: str | None,
        port: int,
        devices: list[str] | None,
        env: dict[str, str],
    ) -> dict[str, Any]:
        """Start the server (stopping a previous one); `host` None = this node's IP, `port` 0 =
        a free one, `devices` None = the GPUs Ray gave this actor."""
        self.stop()
        placed = where()
        gpu_ids = list(devices) if devices is not None else list(placed["gpu_ids"])
        placed["gpu_ids"] = tuple(gpu_ids)
        host = host or placed["node_ip"]
        # Ray sets OMP_NUM_THREADS=1 in its workers; a CPU server keeps the driver's setting.
        if "OMP_NUM_THREADS" not in env:
            os.environ.pop("OMP_NUM_THREADS", None)
        server_cfg = cfg.model_copy(update={"host": host, "port": port or free_port(host)})
        self.server = launch_server(
            backend,
            model_path,
            server_cfg,
            log_path,
            env={**env, "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)},
        )
        return {**placed, "url": self.server.url, "pid": self.server.pid}

    def exit_code(self) -> int | None:
        """None while the server runs (or before the first start)."""
        return None if self.server is None else self.server.process.poll()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@dataclass
class _Server:
    index: int
    url: str
    actor: Any = None  # its EngineActor handle; None for external servers
    devices: list[str] | None = None  # its GPU ids when not its bundle's (colocated)
    placement: PlacementRow | None = None


class ServerFleet:
    """The running servers of one role (made by `start_servers`). A plain class, not a
    dataclass: Prefect walks dataclass parameters of tasks field by field."""

    def __init__(
        self,
        role: str,
        backend: str,
        cfg: ServerConfig,
        model_path: str | Path,
        urls: list[str],
        weight_version: str | None = None,
        log_path: Path | None = None,
    ):
        self.role = role  # "rollout" or "teacher": names the part in errors and logs
        self.backend, self.cfg, self.urls = backend, cfg, urls  # urls: the servers themselves
        # What a relaunched server loads: the role's current weights, and the version it
        # then reports (set by `update_weights`).
        self.model_path, self.weight_version = str(model_path), weight_version
        self.log_path = log_path
        self.model_info: dict[str, Any] = {}
        self.router: RouterProcess | None = None
        self.restarts = 0
        self.events: list[str] = []  # one line per death and relaunch
        self._servers: list[_Server] = []
        self._reservation: Reservation | None = None
        self._stack = ExitStack()  # the Ray session, a placement group reserved here
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._failed: str | None = None
        # Clients of the servers themselves, made once: an httpx client loads its TLS
        # context (~17 ms here), and a weight update every round used to make two.
        self._clients: dict[str, EngineClient] = {}

    @property
    def label(self) -> str:
        return LABELS.get(self.role, self.role)

    @property
    def url(self) -> str | list[str]:
        """Where clients send requests: the router, else the servers (failover)."""
        return self.router.url if self.router is not None else self.urls

    @property
    def placement(self) -> list[PlacementRow]:
        return [s.placement for s in self._servers if s.placement is not None]

    # ------------------------------------------------------------------------ clients

    def client(self, cfg: ClientConfig, **kwargs: Any) -> EngineClient:
        """An EngineClient for this role that waits out a relaunch instead of failing."""
        return EngineClient.from_config(
            self.url,
            cfg,
            api_key=self.cfg.api_key,
            engine_urls=self.urls,
            recover=self.recover,
            **kwargs,
        )

    def recover(self, error: EngineError) -> bool:
        """The client's hook after a request failed on every URL: relaunch what died, and
        say whether retrying can help (something was relaunched, or every server answers)."""
        if not self._servers:
            return False  # external: nothing of ours to relaunch
        logger.warning("%ss at %s: %s; checking them", self.label, self.url, error)
        return self.heal() > 0 or self.healthy()

    def healthy(self) -> bool:
        with httpx.Client(timeout=30) as http:
            for url in self.urls:
                try:
                    if http.get(f"{url}/health_generate").status_code != 200:
                        return False
                except httpx.TransportError:
                    return False
        return True

    # ---------------------------------------------------------------------- weights

    def update_weights(self, model_path: str | Path, weight_version: str) -> None:
        """Load `model_path` into every server and set `weight_version`; returns when each
        reports it. A server that dies meanwhile is relaunched with these weights."""
        with self._lock:  # what a relaunch from now on loads
            self.model_path, self.weight_version = str(model_path), weight_version
        with ThreadPoolExecutor(len(self.urls)) as pool:  # all servers at once, as slime does
            list(
                pool.map(
                    lambda i: self._update_one(i, str(model_path), weight_version),
                    range(len(self.urls)),
                )
            )
        with self._control() as control:
            self._check_versions(control, weight_version)

    def _update_one(self, index: int, model_path: str, weight_version: str) -> None:
        """Server `index`'s update, sent again after a relaunch (which loads these weights
        too: a second load of the same files is harmless)."""
        for _ in range(self.cfg.max_restarts + 2):
            try:
                self._client_of(self.urls[index]).update_weights_from_disk(
                    model_path, weight_version
                )
                return
            except EngineError as err:
                if isinstance(err, EngineRequestError) and err.status_code < 500:
                    raise  # the checkpoint is bad, not the server: no relaunch helps
                if not self.recover(err):
                    raise

    def weight_versions(self) -> dict[str, str | None]:
        """Each server's weight_version, from its /model_info (after any relaunch)."""
        with self._lock, self._control() as control:
            return {url: self._model_info(control, url).get("weight_version") for url in self.urls}

    def requests_served(self) -> dict[str, int | None]:
        """/generate requests each server has answered (a batch counts once; the built-in
        engine's /server_info counter; None where a server does not report one, e.g. real
        SGLang)."""
        counts: dict[str, int | None] = {}
        with self._lock, httpx.Client(timeout=30) as http:
            for url in self.urls:
                states = http.get(f"{url}/server_info").json().get("internal_states") or [{}]
                counts[url] = states[0].get("requests_served")
        return counts

    def _control(self) -> contextlib.AbstractContextManager[EngineClient]:
        """The client of all the servers themselves (not the router), for updates and
        checks; it stays open until the fleet stops."""
        return contextlib.nullcontext(self._client_of(*self.urls, max_retries=2))

    def _client_of(self, *urls: str, **kwargs: Any) -> EngineClient:
        with self._lock:
            # The settings are part of the key: a one-server fleet's update client (default
            # retries) and its control client (2 retries) share a URL, not a client.
            key = repr((urls, sorted(kwargs.items())))
            if key not in self._clients:
                self._clients[key] = EngineClient(list(urls), api_key=self.cfg.api_key, **kwargs)
            return self._clients[key]

    def _model_info(self, control: EngineClient, url: str) -> dict[str, Any]:
        response = control.http.get(f"{url}/model_info", timeout=30)
        if response.status_code == 404:  # servers older than SGLang 0.5
            response = control.http.get(f"{url}/get_model_info", timeout=30)
        response.raise_for_status()
        return response.json()

    def _check_versions(self, control: EngineClient, weight_version: str) -> None:
        for index, url in enumerate(self.urls):
            reported = self._model_info(control, url).get("weight_version")
            if reported != weight_version:
                raise FleetError(
                    f"{self.label} {index} ({url}) reports weight_version {reported!r} after "
                    f"the update to {weight_version!r}"
                )

    # ------------------------------------------------------------------------ healing

    def heal(self) -> int:
        """Relaunch every server that died; returns how many. FleetError once a death finds
        no restarts left (and from then on)."""
        with self._lock:
            if self._failed:
                raise FleetError(self._failed)
            relaunched = 0
            for server in self._servers:
                death = self._death(server)
                if death is None:
                    continue
                what = f"{self.label} {server.index} ({server.url}) died: {death}"
                if self.restarts >= self.cfg.max_restarts:
                    self._failed = (
                        f"{what}; no restarts left ({self.role}.max_restarts = "
                        f"{self.cfg.max_restarts} used)"
                    )
                    logger.error(self._failed)
                    raise FleetError(self._failed)
                self.restarts += 1
                message = f"{what}; relaunching ({self.restarts}/{self.cfg.max_restarts})"
                logger.warning(message)
                self.events.append(message)
                self._relaunch(server)
                relaunched += 1
            return relaunched

    def _death(self, server: _Server) -> str | None:
        """How `server` died, or None if it runs."""
        try:
            code = ray.get(server.actor.exit_code.remote(), timeout=POLL_TIMEOUT_S)
        except ray.exceptions.RayActorError as err:
            server.actor = None
            return f"its Ray actor died ({type(err).__name__})"
        except ray.exceptions.GetTimeoutError:
            return f"its Ray actor did not answer within {POLL_TIMEOUT_S:.0f}s"
        return None if code is None else f"exit code {code}"

    def _relaunch(self, server: _Server) -> None:
        if server.actor is None:
            server.actor = self._new_actor(server.index)
        # The same port on the same host: the router's entry for it stays valid.
        port = int(server.url.rsplit(":", 1)[1])
        info = ray.get(self._start(server.actor, server.index, port, server.devices))
        server.placement = _row(self.role, server.index, info)
        if self.weight_version is not None:
            with self._control() as control:
                _post_version(control, server.url, self.weight_version)
        self.events.append(f"{self.label} {server.index} ({server.url}) is back")

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self.heal()
            except FleetError:
                return  # recorded: the next request or update raises it
            except Exception as err:  # e.g. Ray going down under us at the end of a run
                if not self._stop.is_set():
                    logger.warning("%s watchdog: %s: %s", self.label, type(err).__name__, err)

    # ---------------------------------------------------------------------- lifetime

    def _new_actor(self, index: int):
        options = self._reservation.options(index)
        return ray.remote(EngineActor).options(max_concurrency=4, **options).remote()

    def _start(self, actor, index: int, port: int, devices: list[str] | None = None):
        host = None if (self.cfg.host == "127.0.0.1" and multi_node()) else self.cfg.host
        log = self.log_path
        if len(self.urls) > 1 and log is not None:
            log = log.with_stem(f"{log.stem}_{index}")
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}
        if self.cfg.cpu_threads:  # torch takes its CPU thread count from it at start-up
            env["OMP_NUM_THREADS"] = str(self.cfg.cpu_threads)
        return actor.start.remote(
            self.backend, self.model_path, self.cfg, str(log), host, port, devices, env
        )

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=self.cfg.startup_timeout)
            self._watchdog = None
        with self._lock:
            if self.router is not None:
                self.router.stop()
                self.router = None
            actors = [s.actor for s in self._servers if s.actor is not None]
            with contextlib.suppress(Exception):
                ray.get([a.stop.remote() for a in actors], timeout=60)
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self._servers = []
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            self._stack.close()  # the placement group (if this fleet reserved it), Ray

    def __enter__(self) -> ServerFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _post_version(control: EngineClient, url: str, version: str) -> None:
    response = control.http.post(f"{url}/update_weight_version", json={"new_version": version})
    response.raise_for_status()


def _row(role: str, index: int, info: dict[str, Any]) -> PlacementRow:
    return PlacementRow(
        role, index, info["node_ip"], info["node_id"], tuple(info["gpu_ids"]), info["url"]
    )


def stop_when_started(starting) -> None:
    """Stop the fleet a background start (a future of `start_servers`, or of a task that
    returns its fleet) made, once that start is done; nothing if it failed (start_servers
    stops what it started before raising, and the failure reaches whoever waits for it)."""
    try:
        fleet = starting.result()
    except BaseException:
        return
    if fleet is not None:
        fleet.stop()


def start_servers(
    role: str,
    cfg: OPDRunConfig,
    model_path: str | Path,
    log_path: str | Path,
    *,
    reservation: Reservation | None = None,
    devices: list[list[str]] | None = None,
    weight_version: str | None = None,
    watch: bool = True,
) -> ServerFleet:
    """Start the servers of `role` ("rollout" or "teacher") with `model_path`, or check the
    external ones, and wait until each generates.

    `reservation`: the role's placement group (`opd_core.cluster.reserve`); None = reserve
    one here (released on stop). `devices[i]`: server i's GPU ids when they are not its own
    bundle's (colocated rollout engines). `weight_version`: set on every server once up.
    `watch`: run the watchdog that relaunches dead servers. A failure stops whatever this
    call already started.
    """
    server_cfg: ServerConfig = getattr(cfg, role)
    count = server_cfg.num_engines if role == "rollout" else server_cfg.num_replicas
    log_path = Path(log_path)
    if server_cfg.backend == "external":
        info = check_external(
            server_cfg.urls, api_key=server_cfg.api_key, timeout=server_cfg.startup_timeout
        )
        fleet = ServerFleet(role, "external", server_cfg, model_path, server_cfg.urls)
        fleet.model_info = info["model_info"]
        return fleet
    fleet = ServerFleet(
        role, server_cfg.backend, server_cfg, model_path, [""] * count, weight_version, log_path
    )
    try:
        fleet._stack.enter_context(ray_session(cfg))
        if reservation is None:
            spec = RoleSpec(role, count, server_cfg.num_gpus_per_engine, 1)
            reservation = reserve(spec, cfg.train.ray.placement_timeout)
            fleet._stack.callback(reservation.release)
        fleet._reservation = reservation
        actors = [fleet._new_actor(i) for i in range(count)]
        fleet._servers = [
            _Server(i, "", actor, devices[i] if devices else None) for i, actor in enumerate(actors)
        ]
        # A fixed port is the first of `count` consecutive ones.
        ports = [server_cfg.port + i if server_cfg.port else 0 for i in range(count)]
        pending = [
            fleet._start(s.actor, s.index, ports[s.index], s.devices) for s in fleet._servers
        ]
        for server, info in zip(fleet._servers, _get_all(pending, fleet.label)):
            server.url = fleet.urls[server.index] = info["url"]
            server.placement = _row(role, server.index, info)
        with fleet._control() as control:
            if weight_version is not None:
                for url in fleet.urls:
                    _post_version(control, url, weight_version)
            fleet.model_info = fleet._model_info(control, fleet.urls[0])
        if count > 1:
            fleet.router = launch_router(
                fleet.urls,
                policy=server_cfg.router_policy,
                log_path=log_path.parent / f"{role}_router.log",
                startup_timeout=server_cfg.startup_timeout,
            )
    except BaseException:
        fleet.stop()
        raise
    if watch:
        fleet._watchdog = threading.Thread(
            target=fleet._watch, name=f"opd-{role}-watchdog", daemon=True
        )
        fleet._watchdog.start()
    return fleet


def _get_all(refs: list, label: str) -> list[dict[str, Any]]:
    """Every start's answer; the first failure as an EngineLaunchError naming the server."""
    results = []
    for index, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except EngineLaunchError as err:  # Ray re-raises the actor's error as its own type
            raise EngineLaunchError(f"{label} {index}: {err}") from None
    return results
