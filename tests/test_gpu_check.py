"""scripts/gpu_check.py's CPU rehearsal: the same steps as on the GPU machine (build from a
seed, convert, engines through the launcher, two rounds with the in-process Megatron trainer,
weight updates), with tiny shapes; and its clear failures when something is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402 - scripts/ is not a package


@pytest.mark.slow
def test_cpu_rehearsal_runs_two_rounds_with_agreeing_logprobs(tmp_path):
    command = [
        sys.executable,
        "scripts/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--prompts",
        "4",
        "--samples",
        "2",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    for step in ("convert to torch_dist", "round 1 generate", "round 1 train step", "peak memory"):
        assert step in done.stdout, step
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    summary = results["summary"]
    # fp32 on both sides: the engine's log-probs are the trainer's, token for token.
    assert summary["agreement_max"] < 1e-4 and summary["parity_max"] < 1e-4, summary
    assert summary["generated_tokens"] > 0
    assert [s["step"] for s in results["steps"]].count("round 1 export + weight update") == 1


def test_a_missing_package_is_one_clear_line():
    with pytest.raises(SystemExit) as err:
        gpu_check.preflight("cpu", ("torch", "no_such_package", "megatron_nope.core"))
    assert err.value.code == 2
    assert "missing no_such_package, megatron_nope.core" in str(err.value)
    assert "gpu_check.sh" in str(err.value)


def _shell(*args: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh with this interpreter as the machine's python3."""
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_shell_entry_fails_fast_without_gpu_or_wheels(tmp_path):
    no_gpu = _shell()  # this machine's torch is a CPU build
    assert no_gpu.returncode == 2 and "sees no GPU" in no_gpu.stderr, no_gpu.stderr
    no_wheels = _shell("--device", "cpu", "--tiny", OPD_GPU_WHEELS=str(tmp_path / "empty"))
    assert no_wheels.returncode == 2 and "make gpu-wheels" in no_wheels.stderr, no_wheels.stderr
