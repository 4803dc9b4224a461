"""The deployments as users run them: `make up`'s stack, `prefect deployment run opd/full`.

A real Prefect server (SQLite in a temp PREFECT_HOME, a free port on 127.0.0.1) and a real
process worker are started by `scripts/prefect_stack.py up` (what `make up` runs), the
deployments of prefect.yaml are registered, and a small toy run goes through the worker: it
is cancelled mid-training through the API (what the UI's Cancel does; its servers must be
gone), run again (cached stages skipped, training resumed, COMPLETED, every stage's outputs
on disk), and a stage deployment reruns one stage from the run directory. `down` must leave
nothing running.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import psutil
import pytest
from tiny_runs import SMALL_BATCHES, TINY_TOY

REPO = Path(__file__).resolve().parent.parent
STACK = [sys.executable, str(REPO / "scripts" / "prefect_stack.py")]

# The smallest run that still exercises every stage and two training rounds.
SMALL_RUN = (
    [
        "rollout.num_rollout=2",
        "train.save_interval=1",
        "eval.num_prompts=8",
        "eval.n_samples=2",
    ]
    + SMALL_BATCHES
    + TINY_TOY
)  # tests/tiny_runs.py: plumbing, not quality

# What every stage leaves in the run directory.
STAGE_OUTPUTS = [
    "config.yaml",
    "download/manifest.json",
    "download/data/train.arrow",
    "download/data/eval.arrow",
    "download/models/student/config.json",
    "download/models/teacher/model.safetensors",
    "convert/parity.json",
    "convert/student_torch_dist",
    "teacher/endpoint.json",
    "baseline_eval/summary.json",
    "baseline_eval/samples.arrow",
    "train/round_0000/rollouts.arrow",
    "train/round_0000/teacher_logprobs.arrow",
    "train/round_0001/metrics.json",
    "train/state.json",
    "train/checkpoints/hf/final/config.json",
    "final_eval/summary.json",
    "final_eval/samples.arrow",
    "final_eval/report.md",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stack(
    command: str, home: Path, port: int, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        STACK + [command, "--home", str(home), "--port", str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make up` on a free port in a temp PREFECT_HOME; `make down` afterwards."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    started = _stack("up", home, port)
    assert started.returncode == 0, f"stack up failed:\n{started.stdout}\n{started.stderr}"
    pids = {
        name: json.loads((home / f"{name}.pid").read_text())["pid"] for name in ("server", "worker")
    }
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)}
    try:
        yield {
            "home": home,
            "port": port,
            "api_url": env["PREFECT_API_URL"],
            "pids": pids,
            "env": env,
        }
    finally:
        stopped = _stack("down", home, port)
        assert stopped.returncode == 0, stopped.stderr
        # `down` stops exactly what `up` recorded: the server and the worker are gone.
        for name, pid in pids.items():
            assert (
                not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            ), f"{name} still running"
        assert not (home / "server.pid").exists() and not (home / "worker.pid").exists()


def _prefect(stack: dict, *args: str) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **stack["env"], "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _flow_run_id(cli_output: str) -> str:
    for line in cli_output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in:\n{cli_output}")


def _wait_for_flow_run(stack: dict, flow_run_id: str, timeout: float):
    """Poll the server until the flow run is final; returns the FlowRun."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with (
        temporary_settings({PREFECT_API_URL: stack["api_url"]}),
        get_client(sync_client=True) as client,
    ):
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {flow_run_id} not finished after {timeout:.0f} s: {flow_run.state}"
                )
            time.sleep(2)


def _deployment_names(stack: dict) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: stack["api_url"]}),
        get_client(sync_client=True) as client,
    ):
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}


def _server_processes_for(run_dir: Path) -> list[psutil.Process]:
    """Model servers (teacher, rollout) that serve a model of this run directory."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in cmdline and (
            "opd_core.engine.server" in cmdline or "sglang.launch_server" in cmdline
        ):
            found.append(process)
    return found


def test_stack_registers_all_deployments(stack):
    names = _deployment_names(stack)
    stages = ("download", "convert", "teacher", "baseline_eval", "train", "final_eval")
    assert {"opd/full", *(f"opd-stage/{s}" for s in stages)} <= names


def test_config_form_is_validated_by_the_server(stack):
    """`config` is the pydantic tree: the server checks a run's parameters against its schema."""
    from datetime import datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    from opd_core.config import load_config

    good = load_config(REPO / "configs" / "toy.yaml").model_dump(mode="json")
    bad = json.loads(json.dumps(good))
    bad["rollout"]["num_rollout"] = -1
    later = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=365))  # accepted, never run
    with (
        temporary_settings({PREFECT_API_URL: stack["api_url"]}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name("opd/full")
        with pytest.raises(Exception, match="config.rollout.num_rollout"):
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": bad, "config_path": None}
            )
        accepted = client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": good, "config_path": None}, state=later
        )
        client.delete_flow_run(accepted.id)


def _cancel(stack: dict, flow_run_id: str) -> None:
    """What the UI's Cancel button does: ask for CANCELLING; the worker stops the process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    with (
        temporary_settings({PREFECT_API_URL: stack["api_url"]}),
        get_client(sync_client=True) as client,
    ):
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)


def _checkpointed_round(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "train" / "state.json").read_text()).get("checkpoint_round")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_full_deployment_cancel_resume_and_stage_rerun(stack, tmp_path):
    """opd/full through the worker: cancelled mid-training, run again (resumes), then a stage
    rerun."""
    artifacts = (tmp_path / "artifacts").resolve()
    run_dir = artifacts / "deployed"
    params = json.dumps(
        {"overrides": SMALL_RUN + [f"run.artifacts_dir={artifacts}", "run.run_id=deployed"]}
    )

    # 1. Cancel while training (round 0 checkpointed, round 1 running), as from the UI.
    started = time.monotonic()
    first_id = _flow_run_id(_prefect(stack, "deployment", "run", "opd/full", "--params", params))
    while _checkpointed_round(run_dir) is None:
        assert time.monotonic() - started < 600, "round 0 never checkpointed"
        time.sleep(0.5)
    _cancel(stack, first_id)
    cancelled = _wait_for_flow_run(stack, first_id, timeout=120)
    assert cancelled.state.is_cancelled(), (
        f"expected CANCELLED, got {cancelled.state.type}: {cancelled.state.message}"
    )
    # Its teacher and rollout servers are gone (finally: blocks or the on_cancellation hook).
    deadline = time.monotonic() + 30
    while _server_processes_for(run_dir) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _server_processes_for(run_dir), "a model server outlived its cancelled flow run"
    round0_mtime = (run_dir / "train" / "round_0000" / "metrics.json").stat().st_mtime_ns

    # 2. The same deployment run again: cached stages skipped, training resumed, COMPLETED.
    started = time.monotonic()
    flow_run = _wait_for_flow_run(
        stack,
        _flow_run_id(_prefect(stack, "deployment", "run", "opd/full", "--params", params)),
        timeout=600,
    )
    print(
        f"\nopd/full after a cancel (resume) through the worker: {time.monotonic() - started:.1f} s"
    )
    assert flow_run.state.is_completed(), (
        f"opd/full ended {flow_run.state.type}: {flow_run.state.message}"
    )
    assert flow_run.name == "toy:deployed", (
        f"flow-run name {flow_run.name!r} should name config and run id"
    )
    missing = [p for p in STAGE_OUTPUTS if not (run_dir / p).exists()]
    assert not missing, f"stage outputs missing from {run_dir}: {missing}"
    assert json.loads((run_dir / "final_eval" / "summary.json").read_text())["k"] == 2
    assert (run_dir / "train" / "round_0000" / "metrics.json").stat().st_mtime_ns == round0_mtime, (
        "round 0 was redone"
    )
    assert not _server_processes_for(run_dir), "a model server outlived its flow run"

    # 3. A stage deployment reruns one stage from what is stored: final_eval is a cache hit.
    marker_before = json.loads((run_dir / "final_eval" / "_stage.json").read_text())
    output = _prefect(
        stack,
        "deployment",
        "run",
        "opd-stage/final_eval",
        "--param",
        f"run_dir={json.dumps(str(run_dir))}",
    )
    stage_run = _wait_for_flow_run(stack, _flow_run_id(output), timeout=300)
    assert stage_run.state.is_completed(), (
        f"opd-stage/final_eval ended {stage_run.state.type}: {stage_run.state.message}"
    )
    assert stage_run.name == "final_eval:deployed"
    assert json.loads((run_dir / "final_eval" / "_stage.json").read_text()) == marker_before
