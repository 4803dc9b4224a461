"""The `opd` command line.

    opd run --config configs/toy.yaml [section.field=value ...]   the whole pipeline
    opd stage train --run-dir artifacts/latest [overrides]        rerun one stage
    opd serve --model-path DIR --host 127.0.0.1 --port 30000      SGLang-protocol server
    opd convert hf-to-torch-dist --hf DIR --out DIR               checkpoint conversion
    opd convert torch-dist-to-hf --ckpt DIR --hf-config DIR --out DIR [--step N]

Heavy imports (torch, prefect) happen inside the commands, so `opd --help` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from opd_core.megatron.cli import convert_app

app = typer.Typer(
    help="On-policy distillation as a Prefect pipeline.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(
    convert_app, name="convert", help="Convert checkpoints between HF and Megatron torch_dist."
)
console = Console()

Overrides = Annotated[
    list[str] | None, typer.Argument(help="section.field=value overrides, e.g. train.lr=1e-3")
]


def _offline_defaults() -> None:
    # Nothing outside this machine is reachable in the default setup; these make that quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config file")] = Path(
        "configs/toy.yaml"
    ),
    overrides: Overrides = None,
) -> None:
    """Run the whole pipeline.

    download -> convert -> teacher -> baseline_eval -> train -> final_eval
    """
    _offline_defaults()
    from opd_core.config import load_config

    load_config(config, overrides)  # fail fast, before any server starts, with the field named
    from flows.opd import opd_flow

    result = opd_flow(config_path=str(config), overrides=overrides or [])
    _print_result(result)


@app.command()
def stage(
    name: Annotated[
        str,
        typer.Argument(help="download | convert | teacher | baseline_eval | train | final_eval"),
    ],
    run_dir: Annotated[
        Path, typer.Option("--run-dir", help="a run directory, e.g. artifacts/latest")
    ],
    overrides: Overrides = None,
) -> None:
    """Rerun one stage from what is stored in a run directory."""
    _offline_defaults()
    from flows.opd import stage_flow

    result = stage_flow(stage=name, run_dir=str(run_dir), overrides=overrides or [])
    console.print_json(data=result, default=str)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve a model over SGLang's HTTP protocol (the built-in engine).

    Takes sglang.launch_server's flags (`opd serve --help` lists them): --model-path DIR
    --host --port --api-key --context-length --enable-deterministic-inference ...; other
    SGLang flags are accepted and ignored with a log line each.
    """
    from opd_core.engine.server import main as serve_main

    serve_main(ctx.args)


def _print_result(result: dict) -> None:
    from opd_core.report import comparison_rows

    table = Table(title=f"Student before / after OPD  ({result['run_dir']})")
    for column in ("metric", "baseline", "final", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(result["baseline"], result["final"]):
        table.add_row(
            row["metric"], f"{row['baseline']:.3f}", f"{row['final']:.3f}", f"{row['delta']:+.3f}"
        )
    console.print(table)
    console.print(f"report: {Path(result['run_dir']) / 'final_eval' / 'report.md'}")


if __name__ == "__main__":
    app()
