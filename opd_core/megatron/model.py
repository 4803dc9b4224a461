"""Megatron GPTModel built from an HF Qwen3 / Qwen2 config, and per-token log-probs.

    model = build_gpt_model(hf_config)          # after parallel.init_distributed: this rank's stage
    check_config_matches(hf_config, model)      # raises naming a mismatching field
    layout = Layout.of(prompt_ids, response_ids)  # where each token sits (megatron.layout)
    logits = forward_response_logits(model, layout)  # last pipeline stage: [n, vocab / tp]
    logprobs = layout.split(response_logprobs(logits, layout))  # [len(response_i)] tensors

The training and scoring forwards run the output layer only at the n positions that predict a
response token (`forward_response_logits`), and every helper below takes and gives those
packed [n, ...] tensors; `forward_logits` is the plain forward over every position.

Core attention is torch's scaled_dot_product_attention (`opd_core.megatron.attention`) unless
Transformer Engine is there; `build_gpt_model(..., attention_backend=...)` picks another.

Supported: Qwen3ForCausalLM (dense) and Qwen2ForCausalLM (q/k/v bias, no qk-norm). The
fields set below are the ones whose omission silently changes the model (a wrong rope base
or qkv layout still trains, just badly), hence `check_config_matches`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opd_core.megatron.cpu_shims import apply_cpu_shims
from opd_core.megatron.layout import Layout, rotary_positions

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}


class UnsupportedModelError(ValueError):
    """The HF model is not an architecture this converter/trainer maps exactly."""


class ConfigMismatchError(ValueError):
    """The built Megatron model does not match the HF config it was built from."""


def model_family(hf_config: Any) -> str:
    """'qwen3' or 'qwen2'; a clear error for anything else."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    supported = ", ".join(
        f"{a} (dense)" if a.startswith("Qwen3") else f"{a}" for a in SUPPORTED_ARCHITECTURES
    )
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            family = SUPPORTED_ARCHITECTURES[arch]
            break
    else:
        if not archs and model_type in ("qwen3", "qwen2"):
            family = model_type
        else:
            name = archs[0] if archs else f"model_type={model_type!r}"
            raise UnsupportedModelError(f"unsupported architecture {name}; supported: {supported}")
    if getattr(hf_config, "num_experts", 0) or getattr(hf_config, "num_local_experts", 0):
        raise UnsupportedModelError(
            f"mixture-of-experts models are not supported; supported: {supported}"
        )
    rope = (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UnsupportedModelError(
            f"rope scaling {rope!r} is not supported (only the default rope)"
        )
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedModelError(
            "sliding-window attention (use_sliding_window=true) is not supported"
        )
    if family == "qwen3" and getattr(hf_config, "attention_bias", False):
        raise UnsupportedModelError("Qwen3 with attention_bias=true is not supported")
    return family


def hf_head_dim(hf_config: Any) -> int:
    return (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )


def hf_rope_theta(hf_config: Any) -> float:
    # transformers 5 moved rope_theta into rope_parameters.
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def build_transformer_config(
    hf_config: Any, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None
):
    from megatron.core.transformer import TransformerConfig

    family = model_family(hf_config)
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Micro-batches are padded to their own length: stages send activation shapes first.
        pipeline_dtype=dtype,
        variable_seq_lengths=True,
        # No experts here; the default "allgather" refuses the line above.
        moe_token_dispatcher_type="alltoall",
        # The actor weights each micro-batch's loss by its share of the global token count:
        # the schedule must not divide by the number of micro-batches, nor DDP average over DP.
        calculate_per_token_loss=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fused kernels and CUDA-only extensions are off on CPU.
        use_cpu_initialization=not cuda,
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Weights are always loaded from a checkpoint, but keep this True: with False megatron
        # 0.16 also skips tagging TP-sharded weights (`tensor_model_parallel`), and every rank
        # but 0 then drops them from the gradient norm (wrong clipping under TP).
        perform_initialization=True,
    )


# Which module computes attention (`build_gpt_model(..., attention_backend=...)`):
#   "te"    Transformer Engine's layer spec (fused kernels; needs CUDA and transformer_engine);
#   "sdpa"  megatron's local spec with core attention in torch's scaled_dot_product_attention
#           (opd_core.megatron.attention): fused on CPU and on CUDA without TE;
#   "local" megatron's local spec unchanged (unfused baddbmm + masked softmax + bmm);
#   "auto"  "te" where CUDA and Transformer Engine are both present, else "sdpa".
# All four give the same state-dict names (TE naming), so checkpoints move freely between them.
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")


def resolve_attention_backend(backend: str = "auto") -> str:
    """The concrete backend ("te", "sdpa" or "local") that `backend` means on this machine."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r}: choose one of {ATTENTION_BACKENDS}")
    has_te = False
    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401

            has_te = True
        except ImportError:
            pass
    if backend == "te" and not has_te:
        raise ValueError("attention_backend 'te' needs CUDA and transformer_engine installed")
    if backend == "auto":
        return "te" if has_te else "sdpa"
    return backend


def resolve_share_prompts(share_prompts: str, attention_backend: str = "auto") -> bool:
    """Whether the actor's forwards use the shared-prompt layout (`megatron.layout`):
    `train.share_prompts` (auto | on | off) on this machine's attention backend."""
    backend = resolve_attention_backend(attention_backend)
    if share_prompts == "on" and backend == "te":
        raise ValueError(
            "train.share_prompts=on needs core attention that applies the layout's mask "
            "(attention_backend sdpa or local): Transformer Engine's causal kernels ignore it"
        )
    return share_prompts == "on" or (share_prompts == "auto" and backend != "te")


def _layer_spec(config, attention_backend: str = "auto") -> Any:
    from megatron.core.models.gpt import gpt_layer_specs

    backend = resolve_attention_backend(attention_backend)
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=config.qk_layernorm, normalization="RMSNorm"
    )
    if backend == "sdpa":
        from opd_core.megatron.attention import SDPACoreAttention

        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def check_parallel_layout(hf_config: Any, tp: int, pp: int, what: str | None = None) -> None:
    """A clear error where TP does not divide the heads or PP the layers (Megatron would assert)."""
    name = what or getattr(hf_config, "_name_or_path", "") or "the model"
    problems = [
        f"tensor_model_parallel_size {tp} does not divide {field} {getattr(hf_config, field)}"
        for field in ("num_attention_heads", "num_key_value_heads")
        if getattr(hf_config, field) % tp
    ]
    if hf_config.num_hidden_layers % pp:
        problems.append(
            f"pipeline_model_parallel_size {pp} does not divide num_hidden_layers "
            f"{hf_config.num_hidden_layers} (every stage holds the same number of layers)"
        )
    if problems:
        raise ValueError(f"train.parallel does not fit {name}: " + "; ".join(problems))


def build_gpt_model(
    hf_config: Any,
    dtype: torch.dtype | None = None,
    check: bool = True,
    attention_backend: str = "auto",
):
    """This rank's GPTModel (its pipeline stage), matching `hf_config` exactly. Needs parallel
    state. `attention_backend`: one of ATTENTION_BACKENDS (see there)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    apply_cpu_shims()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_layout(hf_config, tp, pp)
    config = build_transformer_config(hf_config, tp=tp, pp=pp, dtype=dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config, attention_backend),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),  # the embedding
        post_process=parallel_state.is_pipeline_last_stage(),  # the final norm and output layer
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=hf_rope_theta(hf_config),
    )
    if torch.cuda.is_available():
        model.cuda()
    if check:
        check_config_matches(hf_config, model)
    return model


def check_config_matches(hf_config: Any, model) -> None:
    """Raise ConfigMismatchError naming every field where `model` differs from `hf_config`."""
    config = model.config
    rotary = getattr(model, "rotary_pos_emb", None)
    # The base is baked into the inverse frequencies: recover it from the second one.
    built_theta = None
    if rotary is not None and rotary.inv_freq.numel() > 1:
        built_theta = float(1.0 / rotary.inv_freq[1].double() ** (config.kv_channels / 2.0))
    expected = {
        "vocab_size": (hf_config.vocab_size, model.vocab_size),
        "hidden_size": (hf_config.hidden_size, config.hidden_size),
        "num_hidden_layers": (hf_config.num_hidden_layers, config.num_layers),
        "intermediate_size": (hf_config.intermediate_size, config.ffn_hidden_size),
        "num_attention_heads": (hf_config.num_attention_heads, config.num_attention_heads),
        "num_key_value_heads": (hf_config.num_key_value_heads, config.num_query_groups),
        "head_dim": (hf_head_dim(hf_config), config.kv_channels),
        "rms_norm_eps": (hf_config.rms_norm_eps, config.layernorm_epsilon),
        "tie_word_embeddings": (
            bool(hf_config.tie_word_embeddings),
            model.share_embeddings_and_output_weights,
        ),
        "qk_norm (Qwen3)": (model_family(hf_config) == "qwen3", config.qk_layernorm),
        "qkv bias (Qwen2)": (model_family(hf_config) == "qwen2", config.add_qkv_bias),
    }
    if built_theta is not None:
        theta = hf_rope_theta(hf_config)
        expected["rope_theta"] = (
            theta,
            theta if abs(built_theta - theta) <= 1e-3 * theta else built_theta,
        )
    wrong = [
        f"{name}: HF config has {hf}, Megatron model has {built}"
        for name, (hf, built) in expected.items()
        if hf != built
    ]
    if wrong:
        raise ConfigMismatchError(
            "Megatron model does not match the HF config:\n  " + "\n  ".join(wrong)
        )


# ------------------------------------------------------------------------------ forward


def forward_logits(model, layout: Layout) -> torch.Tensor:
    """Logits [rows, s, vocab / tp] at every position (vocab-parallel under tensor
    parallelism) on the last pipeline stage; on the others the hidden states handed to the
    next stage."""
    with rotary_positions(model, layout):
        return model(
            input_ids=layout.ids, position_ids=layout.positions, attention_mask=layout.mask
        )


def forward_response_logits(model, layout: Layout) -> torch.Tensor:
    """Logits [n, vocab / tp] at the n positions that predict a response token, sample after
    sample (`layout.response_positions`), on the last pipeline stage; on the others the hidden
    states handed to the next stage, as `forward_logits`.

    The final hidden states are picked at those positions before the output layer, as
    megatron's own inference path picks the last token's (`materialize_only_last_token_logits`):
    the prompts' and the padding's logits, most of a short-answer batch and with a 152k
    vocabulary its largest activation, are never computed, kept or back-propagated through.
    A critic (`critic.ValueHead` as the output layer) gets its [n, 1] values the same way.
    """
    gpt = _gpt_model(model)
    if not gpt.post_process:
        return forward_logits(model, layout)
    if gpt.config.sequence_parallel or gpt.config.mtp_num_layers:
        # The hidden states are split over the sequence (or carry the MTP layers' too): pick
        # from the logits instead.
        return forward_logits(model, layout)[layout.response_positions]
    rows, cols = layout.response_positions

    def at_response_positions(_module, _args, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[cols, rows].unsqueeze(1)  # [s, rows, h] -> [n, 1, h]

    handle = gpt.decoder.register_forward_hook(at_response_positions)
    try:
        logits = forward_logits(model, layout)  # [1, n, vocab / tp]
    finally:
        handle.remove()
    return logits[0]


def _gpt_model(model):
    """The GPTModel inside megatron's wrappers (DDP on CUDA, Float16Module)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def response_logprobs(
    logits: torch.Tensor, layout: Layout, vocab_logprobs: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-prob of every response token given its prefix: [n] fp32, packed.

    `logits` is `forward_response_logits`'s [n, vocab / tp]. Gradients flow (no_grad is the
    caller's). With the full-vocabulary log-softmax at hand (`vocab_logprobs`, computed anyway
    for the entropy or top-k terms) the log-probs are read from it; otherwise the
    vocab-parallel cross entropy does the softmax across tensor-parallel ranks, without
    gathering the vocabulary.
    """
    if vocab_logprobs is not None:
        return vocab_logprobs.gather(-1, layout.targets[:, None])[:, 0]
    from megatron.core import tensor_parallel

    # A fresh fp32 copy: the cross entropy works in place on its input.
    fresh = logits.to(torch.float32, copy=True)
    # vocab_parallel_cross_entropy wants [s, b, v] and [s, b]: here [n, 1, v] and [n, 1].
    return -tensor_parallel.vocab_parallel_cross_entropy(fresh[:, None], layout.targets[:, None])[
        :, 0
    ]


def response_vocab_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the whole vocabulary at the response positions: [n, vocab] fp32 from
    `forward_response_logits`'s [n, vocab / tp] (all-gathered under tensor parallel;
    differentiable). Compute it once per forward for the entropy and top-k terms."""
    from megatron.core import parallel_state, tensor_parallel

    logits = logits.float()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return torch.log_softmax(logits, dim=-1)


def response_entropy(vocab_logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every response position, [n], from
    `response_vocab_logprobs` (gradients flow)."""
    return -(vocab_logprobs.exp() * vocab_logprobs).sum(-1)


def response_logprobs_of(
    vocab_logprobs: torch.Tensor, layout: Layout, token_ids: list
) -> torch.Tensor:
    """Log-probs of given tokens at every response position, from `response_vocab_logprobs`
    (top-k OPD: the teacher's top-k ids, per sample a [len(response_i), k] array): [n, k],
    packed (gradients flow)."""
    # Already [t, k] per sample, possibly an empty [0, k]; k from any 2-d one.
    arrays = [np.asarray(ids) for ids in token_ids]
    k = max((a.shape[1] for a in arrays if a.ndim == 2), default=0)
    index = torch.from_numpy(
        np.concatenate([a.reshape(t, k) for a, t in zip(arrays, layout.lengths)]).astype(np.int64)
    ).to(vocab_logprobs.device)
    return vocab_logprobs.gather(-1, index)


def response_topk(logits: torch.Tensor, layout: Layout, k: int):
    """The model's k most likely tokens at every response position (top-k OPD, opd_type=megatron).

    Per sample (logprobs [t], topk_ids [t, k] int32, topk_logprobs [t, k] float32): the same
    triple as `EngineClient.score_topk` gets from a teacher server's `top_logprobs_num`.
    """
    vocab_logprobs = response_vocab_logprobs(logits)
    top_logprobs, top_ids = vocab_logprobs.topk(k, dim=-1)
    sampled = response_logprobs(logits, layout, vocab_logprobs)
    return list(
        zip(
            layout.split_numpy(sampled),
            layout.split_numpy(top_ids.to(torch.int32)),
            layout.split_numpy(top_logprobs),
        )
    )
