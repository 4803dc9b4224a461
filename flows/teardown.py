"""Teardown of a run's model servers when its flow was killed, cancelled or crashed.

    stop_run_servers(run_dir)            # stop every teacher/rollout server serving run_dir
    @flow(on_cancellation=[teardown_hook], on_crashed=[teardown_hook])

A normal end (success or exception) stops the servers in `finally:` blocks (flows/opd.py's
`teacher_server`, the rollout engines in `opd_core.trainer.loop.Rounds`). A process killed
outright (SIGKILL, an out-of-memory kill, or a cancellation whose SIGTERM grace period ran
out) runs no `finally:`, and its servers, each in its own session, would keep running. Two
safety nets besides the CLI's watchdog (flows/watchdog.py), which covers `opd run` / `opd stage`
but not a flow run by a deployment's worker:
  - the flows call `stop_run_servers` when they open a run directory (leftovers of a killed
    earlier run on the same directory, e.g. before a resume);
  - `teardown_hook` runs as on_cancellation / on_crashed hook; for deployments, Prefect's
    worker runs it after it has stopped the flow-run process.
Ray needs neither: on a real cluster Ray removes a dead driver's (non-detached) actors and
placement groups (a local cluster's agents outlive a killed driver: the watchdog stops them).

A server of a run is recognised by its command line: a server module of
`opd_core.engine.launcher.MODULES` with `--model-path` inside the run directory.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from opd_core.engine.launcher import MODULES


def run_servers(run_root: str | Path) -> list[psutil.Process]:
    """Live server processes whose model lives under `run_root`."""
    root = str(Path(run_root).resolve())
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            not any(module in cmdline for module in MODULES.values())
            or "--model-path" not in cmdline
        ):
            continue
        position = cmdline.index("--model-path") + 1
        model_path = cmdline[position] if position < len(cmdline) else ""
        if model_path == root or model_path.startswith(root + os.sep):
            found.append(process)
    return found


def stop_run_servers(run_root: str | Path, grace: float = 10.0) -> list[int]:
    """SIGTERM each server's process group (sglang forks helpers), SIGKILL after `grace` s."""
    servers = run_servers(run_root)
    for server in servers:
        _signal_group(server, signal.SIGTERM)
    _, alive = psutil.wait_procs(servers, timeout=grace)
    for server in alive:
        _signal_group(server, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return [server.pid for server in servers]


def _signal_group(process: psutil.Process, sig: int) -> None:
    try:
        # The launcher starts servers as session leaders: their group holds their children.
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except (ProcessLookupError, psutil.Error):
        pass


def run_dir_of(parameters: dict) -> Path | None:
    """The run directory a flow run works on, from its parameters (None if unknown)."""
    if parameters.get("run_dir"):  # opd-stage
        return Path(parameters["run_dir"])
    from flows.opd import resolve_config
    from opd_core.config import OPDRunConfig

    config = parameters.get("config")
    if isinstance(config, dict):
        config = OPDRunConfig.model_validate(config)
    cfg = resolve_config(config, parameters.get("config_path"), parameters.get("overrides"))
    # Without a fixed run id the run is the newest one: `artifacts/latest`.
    return Path(cfg.run.artifacts_dir) / (cfg.run.run_id or "latest")


def teardown_hook(flow, flow_run, state) -> None:
    """Prefect state hook (on_cancellation / on_crashed): stop the run's servers."""
    from prefect.logging import get_logger

    logger = get_logger("opd.teardown")
    try:
        run_dir = run_dir_of(dict(flow_run.parameters or {}))
    except Exception as err:
        logger.warning(
            "teardown: cannot tell the run directory of flow run %s: %s", flow_run.name, err
        )
        return
    if run_dir is None or not run_dir.exists():
        return
    stopped = stop_run_servers(run_dir)
    logger.info(
        "teardown after %s: stopped %d server(s) of %s %s",
        state.type.value,
        len(stopped),
        run_dir,
        stopped or "",
    )
