"""The deployments as users run them: `make up`'s stack, `prefect deployment run opd/full`.

A real Prefect server (SQLite in a temp PREFECT_HOME, a free port on 127.0.0.1) and a real
process worker are started by `scripts/prefect_stack.py up` (what `make up` runs), the
deployments of prefect.yaml are registered, and a small toy run goes through the worker.
The flow run's state and the run directory are checked through the API and on disk; a stage
deployment then reruns one stage from that directory; `down` must leave nothing running.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
STACK = [sys.executable, str(REPO / "scripts" / "prefect_stack.py")]

# The smallest run that still exercises every stage and two training rounds.
# Tiny random toy models (no teacher/student training): these tests check plumbing, not quality.
TINY_TOY = [
    "toy.num_train=64",
    "toy.num_eval=16",
    "toy.teacher.train_steps=0",
    "toy.student.train_steps=0",
    "toy.teacher_min_pass_at_1=0",
    "toy.student_pass_at_1_window=[0,1]",
]
SMALL_RUN = [
    "rollout.num_rollout=2",
    "rollout.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "eval.num_prompts=8",
    "eval.k=2",
] + TINY_TOY

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


def _stack(command: str, home: Path, port: int, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        STACK + [command, "--home", str(home), "--port", str(port)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make up` on a free port in a temp PREFECT_HOME; `make down` afterwards."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    started = _stack("up", home, port)
    assert started.returncode == 0, f"stack up failed:\n{started.stdout}\n{started.stderr}"
    pids = {name: json.loads((home / f"{name}.pid").read_text())["pid"] for name in ("server", "worker")}
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)}
    try:
        yield {"home": home, "port": port, "api_url": env["PREFECT_API_URL"], "pids": pids, "env": env}
    finally:
        stopped = _stack("down", home, port)
        assert stopped.returncode == 0, stopped.stderr
        # `down` stops exactly what `up` recorded: the server and the worker are gone.
        for name, pid in pids.items():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{name} still running"
        assert not (home / "server.pid").exists() and not (home / "worker.pid").exists()


def _prefect(stack: dict, *args: str) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
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
    with temporary_settings({PREFECT_API_URL: stack["api_url"]}), get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s: {flow_run.state}")
            time.sleep(2)


def _deployment_names(stack: dict) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["api_url"]}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}


def _server_processes_for(run_dir: Path) -> list[psutil.Process]:
    """Model servers (teacher, rollout) that serve a model of this run directory."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in cmdline and ("serve" in cmdline or "launch_server" in cmdline):
            found.append(process)
    return found


def test_stack_registers_all_deployments(stack):
    names = _deployment_names(stack)
    stages = ("download", "convert", "teacher", "baseline_eval", "train", "final_eval")
    assert {"opd/full", *(f"opd-stage/{s}" for s in stages)} <= names


@pytest.mark.slow
def test_full_deployment_run_through_worker(stack, tmp_path):
    artifacts = tmp_path / "artifacts"
    overrides = SMALL_RUN + [f"run.artifacts_dir={artifacts}", "run.run_id=deployed"]
    started = time.monotonic()
    output = _prefect(stack, "deployment", "run", "opd/full", "--params", json.dumps({"overrides": overrides}))
    flow_run = _wait_for_flow_run(stack, _flow_run_id(output), timeout=600)
    seconds = time.monotonic() - started
    assert flow_run.state.is_completed(), f"opd/full ended {flow_run.state.type}: {flow_run.state.message}"
    print(f"\nopd/full through the worker: {seconds:.1f} s")

    run_dir = artifacts / "deployed"
    missing = [p for p in STAGE_OUTPUTS if not (run_dir / p).exists()]
    assert not missing, f"stage outputs missing from {run_dir}: {missing}"
    assert json.loads((run_dir / "final_eval" / "summary.json").read_text())["k"] == 2
    assert "deployed" in flow_run.name, f"flow-run name {flow_run.name!r} should name the run id"

    # A stage deployment reruns one stage from what is stored: final_eval is a cache hit.
    marker_before = json.loads((run_dir / "final_eval" / "_stage.json").read_text())
    output = _prefect(
        stack, "deployment", "run", "opd-stage/final_eval", "--param", f"run_dir={json.dumps(str(run_dir))}",
    )
    stage_run = _wait_for_flow_run(stack, _flow_run_id(output), timeout=300)
    assert stage_run.state.is_completed(), f"opd-stage/final_eval ended {stage_run.state.type}: {stage_run.state.message}"
    assert json.loads((run_dir / "final_eval" / "_stage.json").read_text()) == marker_before

    # The teacher and rollout servers of the run were stopped when the flow ended.
    assert not _server_processes_for(run_dir), "a model server outlived its flow run"
