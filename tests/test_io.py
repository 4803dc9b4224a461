"""Atomic writes, Arrow schema checks, the run directory and stage caching."""

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from opd_core import hash_memo
from opd_core.io import (
    ArtifactError,
    atomic_path,
    read_arrow,
    read_json,
    sha256_file,
    write_arrow,
    write_json,
)
from opd_core.rundir import RunDir, hash_inputs, run_cached, stage_key
from opd_core.schemas import PROMPTS


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"pass_at_1": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"pass_at_1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp leftovers


def test_directory_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "new"


def test_json_is_strict(tmp_path):
    write_json(tmp_path / "m.json", {"kl": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads(
        (tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)
    ) == {"kl": None, "x": [None, 1.0]}


def test_arrow_roundtrip_and_errors_name_file_column_row(tmp_path):
    rows = pa.table(
        {
            "index": [0, 1],
            "prompt": [[{"role": "user", "content": "1+1?"}]] * 2,
            "label": ["2", "3"],
        }
    )
    path = write_arrow(tmp_path / "train.arrow", rows, PROMPTS)
    assert read_arrow(path, PROMPTS).column("label").to_pylist() == ["2", "3"]

    write_arrow(tmp_path / "bad.arrow", rows.drop(["label"]))
    with pytest.raises(ArtifactError, match=r"bad\.arrow: missing column\(s\) \['label'\]"):
        read_arrow(tmp_path / "bad.arrow", PROMPTS)
    nulls = rows.set_column(2, "label", pa.array(["2", None]))
    with pytest.raises(ArtifactError, match=r"row 1, column 'label' is null"):
        write_arrow(tmp_path / "nulls.arrow", nulls, PROMPTS)
    (tmp_path / "junk.arrow").write_text("not arrow")
    with pytest.raises(ArtifactError, match="not a readable Arrow IPC file"):
        read_arrow(tmp_path / "junk.arrow")
    with pytest.raises(ArtifactError, match="missing Arrow file"):
        read_arrow(tmp_path / "nope.arrow")


def test_run_dir_latest_link(tmp_path):
    first = RunDir.create(tmp_path, "run-a")
    second = RunDir.create(tmp_path, "run-b")
    assert (tmp_path / "latest").resolve() == second.root != first.root
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        second.stage("trian")


def test_stage_cache_follows_input_content(tmp_path):
    run = RunDir.create(tmp_path, "r")
    data = tmp_path / "input.txt"
    data.write_text("v1")
    calls = []
    build = lambda: calls.append(1) or {"n": len(calls)}

    key = stage_key("cfg", [data])
    assert run_cached(run.stage("convert"), key, build) == ({"n": 1}, False)
    assert run_cached(run.stage("convert"), stage_key("cfg", [data]), build) == ({"n": 1}, True)
    data.write_text("v2")  # new content -> new key -> rebuilt
    assert run_cached(run.stage("convert"), stage_key("cfg", [data]), build) == ({"n": 2}, False)
    assert run_cached(run.stage("convert"), stage_key("other-config", [data]), build)[1] is False
    with pytest.raises(FileNotFoundError, match="stage input missing"):
        stage_key("cfg", [tmp_path / "missing"])


def test_input_hashes_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_HASH_MEMO", str(tmp_path / "memo" / "hashes.sqlite"))
    monkeypatch.setattr(hash_memo, "SETTLE_SECONDS", 0.2)
    reads: list[str] = []
    monkeypatch.setattr(
        hash_memo, "sha256_file", lambda path: reads.append(Path(path).name) or sha256_file(path)
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-v1")
    data = tmp_path / "train.arrow"
    data.write_bytes(b"rows")

    assert hash_inputs([model, data]) == hash_inputs([model, data])
    # Just written: hashed, but not remembered yet (a same-tick edit could hide)
    assert len(reads) == 6
    time.sleep(0.3)
    reads.clear()
    first = hash_inputs([model, data])
    assert sorted(reads) == ["config.json", "model.safetensors", "train.arrow"]
    assert first["1:train.arrow"] == sha256_file(data)  # the memo stores real content hashes
    reads.clear()
    assert hash_inputs([model, data]) == first and reads == []  # nothing reread

    # Same size, mtime put back: the ctime in the stamp still catches the edit.
    stat = (model / "model.safetensors").stat()
    (model / "model.safetensors").write_bytes(b"weights-v2")
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = hash_inputs([model, data])
    assert reads == ["model.safetensors"] and changed["0:model"] != first["0:model"]
    assert changed["0:model"] == hash_inputs([model])["0:model"]
    assert changed["1:train.arrow"] == first["1:train.arrow"]


def test_an_unusable_hash_memo_only_costs_rehashing(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("OPD_HASH_MEMO", str(blocker / "hashes.sqlite"))
    data = tmp_path / "input.txt"
    data.write_text("v1")
    assert hash_inputs([data]) == {"0:input.txt": sha256_file(data)}
    assert "unusable" in caplog.text
    caplog.clear()
    assert hash_inputs([data, data]) == {
        "0:input.txt": sha256_file(data),
        "1:input.txt": sha256_file(data),
    }
    assert "unusable" not in caplog.text  # tried once, not again for every file
