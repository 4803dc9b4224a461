"""Errors people can act on: a full disk, a damaged weight file, a parallel layout that cannot fit.

The full-disk tests write to a real, tiny filesystem: a tmpfs mounted in a private mount
namespace (`unshare --mount`, as root, or `unshare --user --map-root-user --mount`), which
only the child process sees and which disappears with it. So the ENOSPC is the kernel's,
raised by the same write calls a full disk at run time makes (Python's file writes, torch's
C++ writer, dist_checkpointing), not a simulated one. Where no such namespace can be made
(e.g. macOS, or a container that forbids it), those two tests are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

from opd_core.config import ConfigError, load_config
from opd_core.io import ArtifactError

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "toy.yaml"


@cache
def _unshare() -> list[str] | None:
    """An `unshare` prefix that gives a private mount namespace here, or None."""
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def _on_a_tiny_disk(mount: Path, size: str, script: str) -> dict:
    """Run `script` (Python; prints one JSON line last) with a `size` tmpfs mounted at `mount`."""
    prefix = _unshare()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare --mount) for a real tiny disk")
    mount.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(script)
    shell = f'mount -t tmpfs -o size={size} tmpfs {mount} && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        [*prefix, "sh", "-c", shell, code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_atomic_write_on_a_full_disk_names_it_and_keeps_the_old_file(tmp_path):
    disk = tmp_path / "disk"
    result = _on_a_tiny_disk(
        disk,
        "256k",
        f"""
        import json, os
        import pyarrow as pa
        from opd_core.io import DiskFullError, read_json, write_arrow, write_json
        target, rollouts = "{disk}/train/state.json", "{disk}/train/rollouts.arrow"
        write_json(target, {{"checkpoint_round": 4}})
        out = {{}}
        for name, write in [
            ("json", lambda: write_json(target, {{"blob": "x" * 400_000}})),
            ("arrow", lambda: write_arrow(rollouts, pa.table({{"x": list(range(100_000))}}))),
        ]:
            try:
                write()
                out[name] = "written"
            except DiskFullError as err:
                out[name] = str(err)
        out["kept"] = read_json(target)
        out["left"] = sorted(os.listdir("{disk}/train"))
        print(json.dumps(out))
        """,
    )
    assert result["json"].startswith(f"no space left on {disk}/train (")
    assert "while writing " + str(disk / "train" / "state.json") in result["json"]
    assert "the previous state.json is kept" in result["json"]
    assert result["arrow"].startswith(f"no space left on {disk}/train (")
    assert "nothing was written" in result["arrow"]
    assert result["kept"] == {"checkpoint_round": 4}  # the last good state
    assert result["left"] == ["state.json"]  # no partial temporaries taking the space


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """Both ways a checkpoint write fails: dist_checkpointing's shards, and the side files
    (optimizer, RNG) that the training actor writes with torch.save to a path, whose
    C++ writer loses the errno ("unexpected pos")."""
    from opd_core.hf_utils import make_tiny_qwen3

    hf = make_tiny_qwen3(tmp_path / "hf", hidden_size=64, intermediate_size=256)
    disk = tmp_path / "disk"
    result = _on_a_tiny_disk(
        disk,
        "16m",
        f"""
        import json, os, shutil, torch
        from opd_core.io import DiskFullError
        from opd_core.megatron import checkpoint
        from opd_core.megatron.convert import load_hf_config, load_hf_into_model
        from opd_core.megatron.model import build_gpt_model
        from opd_core.megatron.parallel import init_single_process
        init_single_process()
        config = load_hf_config("{hf}")
        model = build_gpt_model(config, dtype=torch.float32)
        load_hf_into_model(model, "{hf}", config)
        root = "{disk}/torch_dist"
        first = checkpoint.save_model(model, root, 1)
        size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())

        def fill(leave):
            free = shutil.disk_usage("{disk}").free
            with open("{disk}/filler", "ab") as f:
                f.write(b"0" * max(0, free - leave))

        out = {{"size": size}}
        fill(size // 2)  # the shards themselves do not fit
        try:
            checkpoint.save_model(model, root, 2)
        except DiskFullError as err:
            out["shards"] = str(err)
        os.remove("{disk}/filler")
        fill(size + (256 << 10))  # the shards fit, the optimizer state does not
        side = lambda tmp: torch.save({{"exp_avg": torch.zeros(1 << 20)}}, tmp / "optimizer.pt")
        try:
            checkpoint.save_model(model, root, 3, extra=side)
        except DiskFullError as err:
            out["side"] = str(err)
        os.remove("{disk}/filler")
        out["left"] = sorted(os.listdir(root))
        out["tracker"] = open(root + "/latest_checkpointed_iteration.txt").read()
        out["loads"] = str(checkpoint.load_model(model, root))
        print(json.dumps(out))
        """,
    )
    root = disk / "torch_dist"
    for case in ("shards", "side"):
        assert result.get(case, "").startswith(f"no space left on {root} ("), result
        assert "the previous checkpoints in" in result[case] and "(newest: step 1)" in result[case]
    assert "while writing checkpoint iter_0000002" in result["shards"]
    assert "while writing checkpoint iter_0000003" in result["side"]
    # Nothing half-written left, the tracker still names the last good one, and it loads.
    assert result["left"] == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert result["tracker"] == "1"
    assert result["loads"] == str(root / "iter_0000001")


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from opd_core.hf_utils import make_tiny_qwen3
    from opd_core.megatron.convert import read_hf_state_dict

    model = make_tiny_qwen3(tmp_path / "student")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(ArtifactError, match=rf"{weights}: not a readable safetensors file"):
        read_hf_state_dict(model)


def test_a_parallel_layout_that_cannot_fit_fails_at_config_validation(tmp_path):
    from opd_core.hf_utils import make_tiny_qwen3

    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["train.parallel.tensor_model_parallel_size=3"])
    assert (
        "train.parallel does not fit models.student (toy.student): "
        "tensor_model_parallel_size 3 does not divide num_attention_heads 4; "
        "tensor_model_parallel_size 3 does not divide num_key_value_heads 2"
    ) in str(err.value)
    with pytest.raises(ConfigError, match=r"pipeline_model_parallel_size 3 does not divide"):
        load_config(CONFIG, ["train.parallel.pipeline_model_parallel_size=3"])
    load_config(CONFIG, ["train.parallel.tensor_model_parallel_size=2"])  # 4 heads, 2 groups

    # A local model dir: its config.json is read at validation.
    local = make_tiny_qwen3(tmp_path / "local", num_hidden_layers=3)
    with pytest.raises(ConfigError, match=rf"models.student \({local}\): pipeline_model_parallel"):
        load_config(
            CONFIG, [f"models.student={local}", "train.parallel.pipeline_model_parallel_size=2"]
        )
    # The megatron-mode teacher is held by the actors too.
    with pytest.raises(ConfigError, match=r"models.teacher \(toy.teacher\)"):
        load_config(
            CONFIG,
            [
                "algorithm.opd_type=megatron",
                "algorithm.opd_teacher_load=convert/teacher_torch_dist",
                "toy.teacher.num_attention_heads=3",
                "toy.teacher.num_key_value_heads=3",
                "train.parallel.tensor_model_parallel_size=2",
            ],
        )


def test_a_hub_models_layout_is_checked_as_soon_as_it_is_downloaded(tmp_path):
    from opd_core.hf_utils import make_tiny_qwen3
    from opd_core.rundir import RunDir
    from opd_core.stages import Train

    cfg = load_config(
        CONFIG, ["models.student=hf:Qwen/Qwen3-8B", "train.parallel.pipeline_model_parallel_size=3"]
    )  # its shapes are unknown before the download: valid
    run = RunDir.create(tmp_path, "r")
    make_tiny_qwen3(run.student_hf)  # what the download stage put there: 2 layers
    with pytest.raises(ValueError, match=r"does not fit the student .*num_hidden_layers 2"):
        Train(cfg, run).check_layout()
