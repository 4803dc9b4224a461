"""Per-round metrics: computed values, the Arrow log (append, replace, resume), loggers, plots."""

import logging
import math
import sys

import numpy as np
import pytest

from opd_core.algorithm.advantages import compute_advantages
from opd_core.algorithm.metrics import MetricsLog, plot_curves, round_metrics
from opd_core.config import AlgorithmConfig
from opd_core.io import read_arrow


def test_round_metrics_values():
    old = [np.array([-1.0, -2.0]), np.array([-0.5])]
    teacher = [np.array([-1.5, -2.5]), np.array([-2.5])]
    result = compute_advantages(
        AlgorithmConfig(), np.array([1.0, 0.0]), np.zeros(2), old, teacher_logprobs=teacher
    )
    row = round_metrics(
        [1.0, 0.0], correct=[True, False], response_lengths=[2, 1], advantage_result=result
    )
    assert row["reward_mean"] == 0.5
    assert row["rollout_pass_rate"] == 0.5
    assert row["response_length_mean"] == 1.5
    assert row["opd_reverse_kl"] == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    assert row["teacher_logprob_mean"] == pytest.approx((-1.5 - 2.5 - 2.5) / 3)
    assert "advantage_mean" in row and row["num_samples"] == 2.0


def test_round_metrics_without_teacher_or_samples():
    row = round_metrics([])
    assert all(
        math.isnan(row[k])
        for k in ("reward_mean", "rollout_pass_rate", "opd_reverse_kl", "response_length_mean")
    )


def test_metrics_log_appends_replaces_and_resumes(tmp_path):
    path = tmp_path / "train" / "metrics.arrow"
    with MetricsLog(path) as log:
        log.append(
            {"round": 0, "opd_reverse_kl": 0.9, "reward_mean": np.float32(0.25), "note": "warmup"}
        )
        log.append({"round": 1, "opd_reverse_kl": 0.5, "loss": 1, "flag": True})
    table = read_arrow(path)
    assert table.column("round").to_pylist() == [0, 1]
    assert table.column("opd_reverse_kl").to_pylist() == [0.9, 0.5]
    assert table.column("reward_mean").to_pylist() == [0.25, None]
    assert table.column("loss").to_pylist() == [None, 1.0]
    assert table.column("flag").to_pylist() == [None, 1.0]
    assert table.column("note").to_pylist() == ["warmup", None]

    # A resumed run reads the old rows; redoing round 1 replaces it instead of duplicating it.
    with MetricsLog(path) as log:
        log.append({"round": 1, "opd_reverse_kl": 0.4})
        log.append({"round": 2, "opd_reverse_kl": 0.3, "pass_at_k": [1, 2]})
    table = read_arrow(path)
    assert table.column("round").to_pylist() == [0, 1, 2]
    assert table.column("opd_reverse_kl").to_pylist() == [0.9, 0.4, 0.3]
    assert table.column("pass_at_k").to_pylist() == [None, None, "[1, 2]"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metrics_row_needs_round(tmp_path):
    with pytest.raises(ValueError, match="needs a 'round' key"):
        MetricsLog(tmp_path / "m.arrow").append({"loss": 1.0})


def test_unknown_logger_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'mlflow'"):
        MetricsLog(tmp_path / "m.arrow", loggers=["mlflow"])


def test_missing_tensorboard_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    # A None entry in sys.modules makes `import tensorboard` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with (
        caplog.at_level(logging.WARNING),
        MetricsLog(tmp_path / "m.arrow", loggers=["tensorboard", "wandb"]) as log,
    ):
        log.append({"round": 0, "loss": 1.0})
    assert "tensorboard package is not installed" in caplog.text
    assert read_arrow(tmp_path / "m.arrow").num_rows == 1


def test_tensorboard_writes_events(tmp_path):
    with MetricsLog(tmp_path / "m.arrow", loggers=["tensorboard"]) as log:
        log.append({"round": 0, "opd_reverse_kl": 0.7})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plot_curves(tmp_path):
    with MetricsLog(tmp_path / "metrics.arrow") as log:
        for r, (kl, pass_rate) in enumerate([(0.9, 0.2), (0.5, 0.4), (0.3, 0.6)]):
            # No reward_mean column.
            log.append({"round": r, "opd_reverse_kl": kl, "rollout_pass_rate": pass_rate})
    out = plot_curves(tmp_path / "metrics.arrow", tmp_path / "plots" / "curves.png", title="toy")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
