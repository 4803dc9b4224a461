"""Tensor layout mapping between HF Qwen3/Qwen2 and Megatron's global (checkpoint) names.

    megatron = hf_to_megatron(hf_state_dict, hf_config)   # stacked layers, TE names
    hf = megatron_to_hf(megatron, hf_config)              # exact inverse (bit-identical)

The Megatron side uses the names and shapes that dist_checkpointing stores: layers stacked
along a leading axis (`decoder.layers.<module>` with shape [num_layers, ...]), layer norms
under Transformer-Engine names (`linear_qkv.layer_norm_weight` = input_layernorm,
`linear_fc1.layer_norm_weight` = post_attention_layernorm) even with the local spec, and:

- linear_qkv: q/k/v fused per query group as [q heads of the group, k head, v head]
  (Megatron splits this tensor along groups under tensor parallelism);
- linear_fc1: cat(gate_proj, up_proj) along the output dim;
- q_layernorm / k_layernorm: Qwen3's per-head q_norm / k_norm;
- linear_qkv.bias: Qwen2's q/k/v biases, fused like the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from opd_core.megatron.model import hf_head_dim, model_family

LAYERS = "decoder.layers."

# Per-layer tensors that map one-to-one:
# Megatron name (after LAYERS) -> HF name (after model.layers.{i}.).
DIRECT_LAYER_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QK_NORM_NAMES = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# Local-spec module names of the two layer norms that the checkpoint stores under TE names.
LOCAL_SPEC_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _heads(cfg: Any) -> tuple[int, int, int]:
    groups = cfg.num_key_value_heads
    return groups, cfg.num_attention_heads // groups, hf_head_dim(cfg)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Any) -> torch.Tensor:
    """[nq*d, ...], [ng*d, ...], [ng*d, ...] -> [ng*(q_per_group+2)*d, ...] (weights or biases)."""
    groups, q_per_group, dim = _heads(cfg)
    rest = q.shape[1:]
    fused = torch.cat(
        [
            q.reshape(groups, q_per_group * dim, *rest),
            k.reshape(groups, dim, *rest),
            v.reshape(groups, dim, *rest),
        ],
        dim=1,
    )
    return fused.reshape(groups * (q_per_group + 2) * dim, *rest)


def split_qkv(qkv: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, q_per_group, dim = _heads(cfg)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (q_per_group + 2) * dim, *rest)
    q, k, v = torch.split(grouped, [q_per_group * dim, dim, dim], dim=1)
    return (
        q.reshape(groups * q_per_group * dim, *rest).contiguous(),
        k.reshape(groups * dim, *rest).contiguous(),
        v.reshape(groups * dim, *rest).contiguous(),
    )


def hf_to_megatron(hf: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """HF state dict -> Megatron global state dict (layers stacked)."""
    family = model_family(cfg)
    missing = [name for name in _expected_hf_names(cfg) if name not in hf]
    if missing:
        raise KeyError(
            f"HF checkpoint is missing {len(missing)} tensors for {family}, e.g. {missing[:3]}"
        )
    layers = range(cfg.num_hidden_layers)
    stack = lambda fn: torch.stack([fn(i) for i in layers])
    attn = lambda i, name: hf[f"model.layers.{i}.self_attn.{name}"]
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for mg_name, hf_name in DIRECT_LAYER_NAMES.items():
        out[LAYERS + mg_name] = stack(lambda i: hf[f"model.layers.{i}.{hf_name}"])  # noqa: B023 - called at once
    out[LAYERS + "self_attention.linear_qkv.weight"] = stack(
        lambda i: fuse_qkv(
            attn(i, "q_proj.weight"), attn(i, "k_proj.weight"), attn(i, "v_proj.weight"), cfg
        )
    )
    if family == "qwen2":
        out[LAYERS + "self_attention.linear_qkv.bias"] = stack(
            lambda i: fuse_qkv(
                attn(i, "q_proj.bias"), attn(i, "k_proj.bias"), attn(i, "v_proj.bias"), cfg
            )
        )
    if family == "qwen3":
        for mg_name, hf_name in QK_NORM_NAMES.items():
            out[LAYERS + mg_name] = stack(lambda i: hf[f"model.layers.{i}.{hf_name}"])  # noqa: B023 - called at once
    out[LAYERS + "mlp.linear_fc1.weight"] = stack(
        lambda i: torch.cat(
            [
                hf[f"model.layers.{i}.mlp.gate_proj.weight"],
                hf[f"model.layers.{i}.mlp.up_proj.weight"],
            ]
        )
    )
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def megatron_to_hf(mg: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Megatron global state dict (layers stacked) -> HF state dict. Inverse of hf_to_megatron."""
    family = model_family(cfg)
    hf = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"]}
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = lambda name: mg[LAYERS + name][i]  # noqa: B023 - used in this iteration only
        for mg_name, hf_name in DIRECT_LAYER_NAMES.items():
            hf[prefix + hf_name] = layer(mg_name).contiguous()
        q, k, v = split_qkv(layer("self_attention.linear_qkv.weight"), cfg)
        hf.update(
            {
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v,
            }
        )
        if family == "qwen2":
            q, k, v = split_qkv(layer("self_attention.linear_qkv.bias"), cfg)
            hf.update(
                {
                    prefix + "self_attn.q_proj.bias": q,
                    prefix + "self_attn.k_proj.bias": k,
                    prefix + "self_attn.v_proj.bias": v,
                }
            )
        if family == "qwen3":
            for mg_name, hf_name in QK_NORM_NAMES.items():
                hf[prefix + hf_name] = layer(mg_name).contiguous()
        gate, up = torch.chunk(layer("mlp.linear_fc1.weight"), 2, dim=0)
        hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"] = (
            gate.contiguous(),
            up.contiguous(),
        )
    hf["model.norm.weight"] = mg["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = mg["output_layer.weight"]
    return hf


def _expected_hf_names(cfg: Any) -> list[str]:
    family = model_family(cfg)
    names = ["model.embed_tokens.weight", "model.norm.weight"] + (
        [] if cfg.tie_word_embeddings else ["lm_head.weight"]
    )
    per_layer = list(DIRECT_LAYER_NAMES.values()) + [f"self_attn.{p}_proj.weight" for p in "qkv"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up")]
    per_layer += (
        [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if family == "qwen2"
        else list(QK_NORM_NAMES.values())
    )
    return names + [
        f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in per_layer
    ]


def megatron_to_model_state_dict(mg: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Unstack layers and rename to the keys of `model.state_dict()` (a TP=1 model)."""
    model_keys = set(model.state_dict().keys())
    out = {}
    for name, tensor in mg.items():
        if not name.startswith(LAYERS):
            out[name] = tensor
            continue
        sub = name[len(LAYERS) :]
        for i in range(tensor.shape[0]):
            key = f"{LAYERS}{i}.{sub}"
            if key not in model_keys and sub in LOCAL_SPEC_ALIASES:
                key = f"{LAYERS}{i}.{LOCAL_SPEC_ALIASES[sub]}"
            out[key] = tensor[i]
    unknown = sorted(set(out) - model_keys)
    if unknown:
        raise KeyError(f"Megatron model has no parameters named {unknown[:3]}")
    return out


def model_state_dict_to_megatron(model, num_layers: int) -> dict[str, torch.Tensor]:
    """A TP=1 model's state dict -> Megatron global names (layers stacked). Inverse of the above."""
    reverse_alias = {local: te for te, local in LOCAL_SPEC_ALIASES.items()}
    per_layer: dict[str, list] = {}
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("_extra_state") or tensor is None:
            continue
        if not key.startswith(LAYERS):
            out[key] = tensor.detach()
            continue
        index, sub = key[len(LAYERS) :].split(".", 1)
        sub = reverse_alias.get(sub, sub)
        per_layer.setdefault(sub, [None] * num_layers)[int(index)] = tensor.detach()
    out.update({LAYERS + sub: torch.stack(tensors) for sub, tensors in per_layer.items()})
    return out
