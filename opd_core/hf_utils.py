"""Small helpers around HF checkpoints: building tiny Qwen3 models and reading model dirs.

    make_tiny_qwen3(tmp_path / "model", hidden_size=32, tie_word_embeddings=False)

The tiny models are real Qwen3 checkpoints (config.json, model.safetensors, tokenizer.json
with a chat template), so every code path treats them exactly like Qwen3-8B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from opd_core.toy.tokenizer import build_tokenizer

TINY_QWEN3 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def qwen3_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> Qwen3Config:
    """A Qwen3 config for `tokenizer`: TINY_QWEN3 unless overridden. `vocab_size` defaults to
    the tokenizer's; a larger one gives a real model's embedding shape (ids past the
    tokenizer's decode to nothing)."""
    fields = {"vocab_size": len(tokenizer), **TINY_QWEN3, **overrides}
    rope_theta = fields.pop("rope_theta")
    return Qwen3Config(
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **fields,
    )


def save_hf_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """Write model + tokenizer + generation config (eos = end of the assistant turn)."""
    out_dir = Path(out_dir)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_qwen3(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 384,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """A randomly initialised Qwen3 (tiny unless `overrides` say otherwise) with the toy
    byte-level tokenizer (`vocab_size` is the tokenizer's), saved to `out_dir`. `device` and
    `dtype`: where it is initialised and how it is stored (a 0.6B shape builds in seconds on
    a GPU)."""
    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(qwen3_config(tokenizer, **overrides)).eval()
    return save_hf_model(model.to(dtype), tokenizer, out_dir)


def rope_theta(config: Any) -> float:
    """The rope base of an HF config (transformers 5 moved it into `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
