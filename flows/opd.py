"""Flow `opd`: the whole pipeline, and flow `opd-stage`: one stage rerun from a run directory.

    opd run --config configs/toy.yaml                     # the CLI calls opd_flow(...)
    opd stage train --run-dir artifacts/latest           # the CLI calls stage_flow(...)
    prefect deployment run opd/full                       # once `make up` has registered it

    download -> convert -> baseline_eval -> train -> final_eval
         `--> teacher (its servers start meanwhile) --^

Only orchestration lives here: order, the teacher's lifetime, names. Each stage is a task in
`tasks/` that is a cache hit when its inputs and config section are unchanged. The teacher
needs only the downloaded models, so its servers start while the student is converted and
evaluated (on a cluster each of those takes minutes for an 8B/32B pair). Checks that can fail
a run are made as early as their facts are known: the parallel layout against the models
right after download, and whether training may take over `train/` (it refuses to delete
finished rounds of another setup unless `restart_train`) before a teacher starts when the
converted student is cached (else right after convert, before the evals).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.teardown import stop_run_servers, teardown_hook
from opd_core.config import OPDRunConfig, apply_override, load_config, validate_config
from opd_core.engine.fleet import stop_when_started
from opd_core.io import write_text
from opd_core.rundir import STAGES, RunDir
from opd_core.stages import Convert, Teacher, Train
from tasks.convert import convert
from tasks.download import download
from tasks.evaluate import baseline_eval, final_eval
from tasks.teacher import start_teacher
from tasks.train import train

# The stages a stage rerun (`opd-stage`) runs as one task, by name; teacher and train need
# the teacher's lifetime around them (below).
FILE_STAGES = {
    "download": download,
    "convert": convert,
    "baseline_eval": baseline_eval,
    "final_eval": final_eval,
}

# opd_core logs what it decides (a resume point, a cache miss and why) on `opd.*` loggers;
# PREFECT_LOGGING_EXTRA_LOGGERS=opd (set by the CLI and prefect.yaml) sends them to the run's
# logs, at INFO.
logging.getLogger("opd").setLevel(logging.INFO)


def resolve_config(
    config: OPDRunConfig | None, config_path: str | None, overrides: list[str] | None
) -> OPDRunConfig:
    """A config object (UI form), or a YAML path (CLI), plus overrides; validated once here."""
    if config is not None and config_path is not None:
        raise ValueError("give either `config` or `config_path`, not both")
    if config is None:
        return load_config(config_path, overrides)
    tree = config.model_dump(mode="json")
    for override in overrides or []:
        apply_override(tree, override)
    return validate_config(tree, "flow parameter `config`")


def open_run(cfg: OPDRunConfig) -> RunDir:
    run_id = cfg.run.run_id or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = RunDir.create(cfg.run.artifacts_dir, run_id)
    write_text(run_dir.config_file, cfg.to_yaml())
    return run_dir


@contextmanager
def teacher_server(cfg: OPDRunConfig, run_dir: RunDir, skip: bool = False):
    """Starts the teacher (task `teacher`) in the background and yields a function that waits
    for it: the running ServerFleet, or None if no server is needed. Leaving stops what was
    started, after waiting for a start still under way."""
    if skip or not Teacher(cfg, run_dir).needed:
        yield lambda: None
        return
    starting = start_teacher.submit(cfg, run_dir)
    try:
        yield starting.result
    finally:
        stop_when_started(starting)


def _run_name() -> str:
    """Flow-run name shown in the UI: the config's name and the run id (or the start time)."""
    params = flow_run.parameters
    try:
        config = params.get("config")
        if isinstance(config, dict):  # parameters as the API stores them
            config = OPDRunConfig.model_validate(config)
        cfg = resolve_config(config, params.get("config_path"), params.get("overrides"))
    except Exception:
        return f"{Path(params.get('config_path') or 'opd').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return (
        f"{cfg.name}:{cfg.run.run_id}"
        if cfg.run.run_id
        else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def _stage_run_name() -> str:
    """`<stage>:<run id>` (the run directory's name, `latest` resolved)."""
    params = flow_run.parameters
    return f"{params.get('stage')}:{Path(params.get('run_dir') or '?').resolve().name}"


# on_cancellation / on_crashed: stop the run's servers even when the flow-run process was
# killed before its `finally:` blocks ran (see flows/teardown.py).
@flow(
    name="opd",
    flow_run_name=_run_name,
    log_prints=True,
    on_cancellation=[teardown_hook],
    on_crashed=[teardown_hook],
)
def opd_flow(
    config: OPDRunConfig | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    restart_train: bool = False,
) -> dict:
    """`restart_train`: if the training setup changed and train/ holds finished rounds of
    the old one, delete them and train from round 0 (without it the run stops, saying what
    changed, and deletes nothing)."""
    cfg = resolve_config(config, config_path, overrides)
    run_dir = open_run(cfg)
    logger = get_run_logger()
    if stale := stop_run_servers(run_dir.root):
        logger.warning(
            "stopped %d server(s) left running by a killed earlier run: pids %s", len(stale), stale
        )
    logger.info("run directory: %s", run_dir.root)
    download(cfg, run_dir)
    Train(cfg, run_dir).check_layout()  # a hub model's shapes are known from here on
    # With the converted student cached, training's inputs are known: refuse before a teacher
    # starts, and start none for a cached train stage (most of a cached rerun's time). A
    # convert that will run means training will too (its key covers the converted student).
    converted = Convert(cfg, run_dir).is_cached()
    if converted:
        Train(cfg, run_dir).check_claim(restart_train)
    skip_teacher = converted and Train(cfg, run_dir).is_cached()
    with teacher_server(cfg, run_dir, skip=skip_teacher) as teacher:
        convert(cfg, run_dir)
        if not converted:  # now training's inputs are known: before the evals spend time
            Train(cfg, run_dir).check_claim(restart_train)
        baseline = baseline_eval(cfg, run_dir)
        training = train(cfg, run_dir, teacher(), restart_train)
    final = final_eval(cfg, run_dir)
    return {"run_dir": str(run_dir.root), "baseline": baseline, "final": final, "train": training}


@flow(
    name="opd-stage",
    flow_run_name=_stage_run_name,
    log_prints=True,
    on_cancellation=[teardown_hook],
    on_crashed=[teardown_hook],
)
def stage_flow(
    stage: str, run_dir: str, overrides: list[str] | None = None, restart_train: bool = False
) -> dict:
    """Rerun one stage from what is stored in `run_dir` (its config.yaml, plus overrides).
    `restart_train` (stage train): as for flow `opd`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    rd = RunDir.open(run_dir)
    stop_run_servers(rd.root)  # leftovers of a killed earlier run on this directory
    cfg = load_config(rd.config_file, overrides)
    if overrides:
        write_text(rd.config_file, cfg.to_yaml())
    if stage in FILE_STAGES:
        return FILE_STAGES[stage](cfg, rd)
    skip_teacher = False
    if stage == "train":
        training_stage = Train(cfg, rd)
        training_stage.check_claim(restart_train)
        skip_teacher = training_stage.is_cached()
    with teacher_server(cfg, rd, skip=skip_teacher) as teacher:
        fleet = teacher()
        if stage == "teacher":
            return {"urls": fleet.urls if fleet else None}
        return train(cfg, rd, fleet, restart_train)
