"""HF <-> Megatron torch_dist conversion and the HF-vs-Megatron logits parity check.

    hf_to_torch_dist("hf/Qwen3-8B", "ckpt/qwen3-8b")               # -> release/ + tracker
    torch_dist_to_hf("ckpt/run", "hf/Qwen3-8B", "hf/exported", step=100)
    check_parity("hf/Qwen3-8B", "ckpt/qwen3-8b")   # {"max_abs_logits_diff": 2e-6, ...}

hf_to_torch_dist builds a TP=1 GPTModel in this process (a one-rank gloo/nccl group is
created if none exists), loads the HF tensors into it and saves its sharded state dict, so
the result loads at any tensor-parallel size. torch_dist_to_hf needs neither a process
group nor a Megatron model. Both write their output directory atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from opd_core.io import ArtifactError, atomic_path
from opd_core.megatron import checkpoint, mapping
from opd_core.megatron.checkpoint import HF_SIDE_FILES
from opd_core.megatron.known_warnings import quiet_known_warnings
from opd_core.megatron.layout import Layout
from opd_core.megatron.model import build_gpt_model, forward_logits


def load_hf_config(hf_dir: str | Path):
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ArtifactError(f"{hf_dir / 'config.json'} not found: not an HF model directory")
    return AutoConfig.from_pretrained(hf_dir)


def read_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"no *.safetensors files in {hf_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as err:  # e.g. a truncated file: name it
            raise ArtifactError(
                f"{file}: not a readable safetensors file ({file.stat().st_size} bytes): {err}"
            ) from err
    return state


def _ensure_process_group() -> None:
    quiet_known_warnings()  # before megatron is first imported on this (driver) path
    # Not at the top: parallel imports megatron-core, which the HF export (torch_dist_to_hf,
    # `opd convert torch-dist-to-hf`) must run without; see checkpoint.py's docstring.
    from opd_core.megatron.parallel import init_single_process

    if not dist.is_initialized():
        init_single_process()
    elif dist.get_world_size() != 1:
        raise RuntimeError("conversion runs on one rank; call it outside a multi-rank job")


def load_hf_into_model(
    model, hf_dir: str | Path, hf_config: Any, hf_state: dict | None = None
) -> None:
    """Copy HF weights into a TP=1 GPTModel."""
    megatron_tensors = mapping.hf_to_megatron(hf_state or read_hf_state_dict(hf_dir), hf_config)
    state = mapping.megatron_to_model_state_dict(megatron_tensors, model)
    dtype = next(model.parameters()).dtype
    missing, _ = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ArtifactError(f"{hf_dir}: no HF tensor for Megatron parameters {missing[:5]}")


def hf_to_torch_dist(
    hf_dir: str | Path, out_dir: str | Path, step: int | None = 0, dtype: torch.dtype | None = None
) -> Path:
    """Convert an HF Qwen3/Qwen2 dir to Megatron-LM layout under out_dir (step None = release/).

    `dtype` None keeps the HF weights' dtype.
    """
    hf_config = load_hf_config(hf_dir)
    hf_state = read_hf_state_dict(hf_dir)
    _ensure_process_group()
    # Keep the HF weights' dtype (bf16 stays bf16, fp32 stays fp32): values are copied exactly,
    # and the trainer casts on load when it trains in another dtype.
    dtype = dtype or hf_state["model.embed_tokens.weight"].dtype
    model = build_gpt_model(hf_config, dtype=dtype)
    load_hf_into_model(model, hf_dir, hf_config, hf_state)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        checkpoint.save_model(model, tmp, step)
        checkpoint.store_hf_config(tmp, hf_dir)
    return Path(out_dir)


def torch_dist_to_hf(
    ckpt_dir: str | Path,
    hf_config_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write HF safetensors (shards + index) from a torch_dist checkpoint; copy config/tokenizer."""
    return write_hf_dir(
        checkpoint.read_global_tensors(ckpt_dir, step), hf_config_dir, out_dir, max_shard_size
    )


def write_hf_dir(
    megatron_tensors: dict[str, torch.Tensor],
    hf_config_dir: str | Path,
    out_dir: str | Path,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Megatron global tensors -> an HF dir (safetensors shards + index, config, tokenizer)."""
    hf_config = load_hf_config(hf_config_dir)
    hf_state = mapping.megatron_to_hf(megatron_tensors, hf_config)
    _check_shapes(hf_state, hf_config, out_dir)
    # Megatron's torch norms keep fp32 weights in a bf16 model; HF expects one dtype.
    dtype = hf_state["model.embed_tokens.weight"].dtype
    hf_state = {name: tensor.to(dtype) for name, tensor in hf_state.items()}
    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for filename, names in split.filename_to_tensors.items():
            save_file(
                {n: hf_state[n].contiguous() for n in names},
                tmp / filename,
                metadata={"format": "pt"},
            )
        index = {
            "metadata": {
                "total_size": sum(t.numel() * t.element_size() for t in hf_state.values())
            },
            "weight_map": split.tensor_to_filename,
        }
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True)
        )
        for name in HF_SIDE_FILES:
            if (Path(hf_config_dir) / name).is_file():
                shutil.copy2(Path(hf_config_dir) / name, tmp / name)
    return Path(out_dir)


def _check_shapes(hf_state: dict[str, torch.Tensor], hf_config: Any, where: Any) -> None:
    vocab, hidden = hf_state["model.embed_tokens.weight"].shape
    if (vocab, hidden) != (hf_config.vocab_size, hf_config.hidden_size):
        raise ArtifactError(
            f"{where}: embedding is {vocab}x{hidden} but the HF config says "
            f"vocab_size={hf_config.vocab_size}, hidden_size={hf_config.hidden_size}"
        )


@torch.no_grad()
def check_parity(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    batch_size: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    step: int | None = None,
) -> dict:
    """Max |logits| difference between the HF model (fp32) and the converted Megatron model."""
    hf_config = load_hf_config(hf_dir)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf_config.vocab_size, (batch_size, seq_len), generator=generator)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_logits = hf_model(input_ids=ids).logits.float()
    del hf_model
    _ensure_process_group()
    model = build_gpt_model(hf_config, dtype=torch.float32).eval()
    path = checkpoint.load_model(model, ckpt_dir, step)
    layout = Layout.of(ids.tolist(), [[] for _ in range(batch_size)])
    mg_logits = forward_logits(model, layout).float().cpu()
    diff = (hf_logits - mg_logits).abs()
    return {
        "max_abs_logits_diff": float(diff.max()),
        "mean_abs_logits_diff": float(diff.mean()),
        "max_abs_logits": float(hf_logits.abs().max()),
        "argmax_agreement": float((hf_logits.argmax(-1) == mg_logits.argmax(-1)).float().mean()),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "checkpoint": str(path),
        "hf_dir": str(hf_dir),
    }
