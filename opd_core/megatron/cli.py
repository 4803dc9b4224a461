"""`opd convert ...`: the conversion commands (the main CLI mounts `convert_app`).

opd convert hf-to-torch-dist --hf hf/Qwen3-8B --out ckpt/qwen3-8b [--step 0] [--parity]
opd convert torch-dist-to-hf --ckpt ckpt/run --hf-config hf/Qwen3-8B --out hf/out [--step 100]

`opd --help` imports this module: the commands import opd_core.megatron.convert (torch,
transformers: seconds) when they run, not at the top.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

convert_app = typer.Typer(
    help="Convert between HF safetensors and Megatron torch_dist checkpoints.", no_args_is_help=True
)


@convert_app.command("hf-to-torch-dist")
def hf_to_torch_dist_command(
    hf: Path = typer.Option(..., "--hf", help="HF model directory (config.json + safetensors)"),
    out: Path = typer.Option(..., "--out", help="Megatron-LM checkpoint root to write"),
    step: int | None = typer.Option(0, "--step", help="iteration number of the written checkpoint"),
    release: bool = typer.Option(
        False, "--release", help="write release/ instead of iter_XXXXXXX/"
    ),
    parity: bool = typer.Option(
        False, "--parity", help="also compare HF and Megatron logits and print the result"
    ),
) -> None:
    from opd_core.megatron.convert import check_parity, hf_to_torch_dist  # CLI start-up time

    hf_to_torch_dist(hf, out, step=None if release else step)
    typer.echo(f"wrote {out}")
    if parity:
        typer.echo(json.dumps(check_parity(hf, out), indent=2))


@convert_app.command("torch-dist-to-hf")
def torch_dist_to_hf_command(
    ckpt: Path = typer.Option(
        ..., "--ckpt", help="Megatron-LM checkpoint root (or one iter_XXXXXXX dir)"
    ),
    hf_config: Path = typer.Option(
        ..., "--hf-config", help="HF dir with config.json and tokenizer files"
    ),
    out: Path = typer.Option(..., "--out", help="HF directory to write"),
    step: int | None = typer.Option(
        None, "--step", help="iteration to export (default: the latest)"
    ),
) -> None:
    from opd_core.megatron.convert import torch_dist_to_hf  # CLI start-up time

    torch_dist_to_hf(ckpt, hf_config, out, step=step)
    typer.echo(f"wrote {out}")


def main() -> None:  # `python -m opd_core.megatron.cli`
    convert_app()


if __name__ == "__main__":
    main()
