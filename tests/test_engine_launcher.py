"""The launcher starts the built-in server through the same code path (and flags) as sglang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from opd_core.config import TeacherConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.launcher import (
    EngineLaunchError,
    check_external,
    launch_server,
    server_command,
)
from opd_core.hf_utils import make_tiny_qwen3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("engine_launcher") / "model", max_position_embeddings=64
    )


def test_sglang_and_builtin_share_flag_names(tmp_path):
    cfg = TeacherConfig(
        num_gpus_per_engine=2,
        mem_fraction_static=0.7,
        extra_args=["--context-length", "8192"],
        api_key="k",
    )
    sglang = server_command("sglang", "/m", "0.0.0.0", 30000, cfg)
    builtin = server_command("builtin", "/m", "0.0.0.0", 30000, cfg)
    assert sglang[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert builtin[:3] == [sys.executable, "-m", "opd_core.engine.server"]
    assert (
        sglang[3:]
        == builtin[3:]
        == [
            "--model-path",
            "/m",
            "--host",
            "0.0.0.0",
            "--port",
            "30000",
            "--tp-size",
            "2",
            "--mem-fraction-static",
            "0.7",
            "--api-key",
            "k",
            "--context-length",
            "8192",
        ]
    )
    with pytest.raises(ValueError, match="external"):
        server_command("external", "/m", "h", 1, cfg)


def test_deterministic_inference_flag():
    """Without --enable-deterministic-inference SGLang ignores sampling_seed."""
    flag = "--enable-deterministic-inference"
    assert flag not in server_command("sglang", "/m", "h", 1, TeacherConfig())
    assert flag in server_command("sglang", "/m", "h", 1, TeacherConfig(), deterministic=True)
    with_field = TeacherConfig(enable_deterministic_inference=True)
    assert server_command("builtin", "/m", "h", 1, with_field).count(flag) == 1


# What configs/qwen3-8b-opd.yaml passes, and flags the built-in engine does not know.
SGLANG_FLAGS = [
    "--chunked-prefill-size",
    "4096",
    "--max-running-requests",
    "16",
    "--base-gpu-id",
    "0",
    "--context-length",
    "64",
    "--disable-radix-cache",
    "--schedule-policy=lpm",
    "--random-seed",
    "1",
]


def test_launch_builtin_serve_and_stop(model_dir, tmp_path):
    cfg = TeacherConfig(api_key="secret", startup_timeout=120, extra_args=SGLANG_FLAGS)
    log = tmp_path / "server.log"
    with launch_server("builtin", model_dir, cfg, log, deterministic=True) as server:
        assert server.alive() and server.url.startswith("http://127.0.0.1:")
        with EngineClient(server.url, api_key="secret") as client:
            [scores] = client.score([[5, 6]], [[7, 8]])
            assert scores.shape == (2,)
        assert server.model_info()["model_path"] == str(model_dir)
        info = httpx.get(
            f"{server.url}/server_info", headers={"Authorization": "Bearer secret"}
        ).json()
        assert info["enable_deterministic_inference"] is True and info["context_length"] == 64
        assert info["max_running_requests"] == 16
        assert info["disable_radix_cache"] is True  # honoured: shared prefixes computed apart
        text = log.read_text()
        for ignored in ("--chunked-prefill-size 4096", "--schedule-policy lpm"):
            assert f"ignoring {ignored}: an SGLang flag" in text
        assert "ignoring --disable-radix-cache" not in text
        info = check_external([server.url], api_key="secret", timeout=10)
        assert info["healthy"] == [server.url] and info["model_info"]["model_path"] == str(
            model_dir
        )
        pid = server.pid
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


def test_dead_server_shows_log_tail(tmp_path):
    # The built-in server refuses tp > 1 and exits.
    cfg = TeacherConfig(num_gpus_per_engine=2, startup_timeout=60)
    with pytest.raises(
        EngineLaunchError,
        match=r"exited with code 1(.|\n)*--tp-size: the built-in server runs on one device",
    ):
        launch_server("builtin", tmp_path, cfg, tmp_path / "server.log")


def test_an_unloadable_model_exits_at_once_with_the_reason(tmp_path):
    """Not a server that answers 503 until the start-up timeout (600 s by default)."""
    cfg = TeacherConfig(startup_timeout=600)
    started = time.monotonic()
    with pytest.raises(EngineLaunchError) as err:
        launch_server("builtin", "/nonexistent", cfg, tmp_path / "server.log")
    first_line = str(err.value).splitlines()[0]
    assert "exited with code 1 before becoming healthy" in first_line
    assert "cannot serve /nonexistent" in first_line and "not a directory" in first_line
    assert time.monotonic() - started < cfg.startup_timeout  # it did not wait it out


DRIVER = """
import sys, time
from opd_core.config import TeacherConfig
from opd_core.engine.launcher import launch_server
server = launch_server("builtin", sys.argv[1], TeacherConfig(startup_timeout=120), sys.argv[2])
print(server.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_servers_die_with_a_sigkilled_driver(model_dir, tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(model_dir), str(tmp_path / "server.log")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": root},
        text=True,
    )
    try:
        server = psutil.Process(int(driver.stdout.readline()))
        assert "opd_core.engine.server" in " ".join(server.cmdline())  # the server itself
        [watcher] = server.children()  # parent_guard's watcher, in the server's group
        assert "opd_core.engine.server" not in " ".join(watcher.cmdline())
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while not (gone(server.pid) and gone(watcher.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(server.pid) and gone(watcher.pid), "the server outlived its driver"
        assert "parent process" in (tmp_path / "server.log").read_text()
    finally:
        driver.kill()


def test_check_external_fails_clearly_on_dead_url():
    with pytest.raises(EngineLaunchError, match="teacher.url: no engine became healthy"):
        check_external("http://127.0.0.1:9", timeout=0.5)


def test_startup_timeout_stops_the_process(model_dir, tmp_path):
    cfg = TeacherConfig(startup_timeout=0.2)
    with pytest.raises(EngineLaunchError, match="not healthy after"):
        launch_server("builtin", model_dir, cfg, tmp_path / "server.log")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("sglang") is not None, reason="sglang is installed"
)
def test_sglang_backend_without_sglang_is_a_clear_error(tmp_path):
    with pytest.raises(EngineLaunchError, match=r"pip install \.\[sglang\]"):
        launch_server("sglang", tmp_path, TeacherConfig(), tmp_path / "server.log")
