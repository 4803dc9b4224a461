"""Megatron core attention computed by `torch.nn.functional.scaled_dot_product_attention`.

    from opd_core.megatron.attention import SDPACoreAttention
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention

A drop-in for megatron-core 0.16's local `DotProductAttention` (same constructor, forward
signature, tensor layouts and mask semantics), for machines without Transformer Engine. The
local module materialises the scores with `baddbmm`, masks them with `masked_fill` and runs a
separate softmax and `bmm`, each a full [b, heads, s, s] tensor in memory and again in the
backward; PyTorch's SDPA does the same math in one fused kernel (flash attention on CPU as on
GPU) and reads the grouped key/value heads without repeating them. The result is the same
attention up to float rounding (tests/test_megatron_attention.py checks logits and gradients
against `DotProductAttention`).

Layouts, as `SelfAttention` calls it: query [sq, b, np, hn], key and value [sk, b, ng, hn]
with np / ng query heads per key/value group (GQA; `ng` not yet expanded), np and ng already
divided by the tensor-parallel size; output [sq, b, np * hn].

Mask, as in `DotProductAttention`: a given `attention_mask` (bool, broadcastable to
[b, 1, sq, sk], True = masked out) is applied as is, whatever the mask type; with no mask, a
causal layer is causal (`is_causal`) and any other attends everywhere. One difference, in rows
nobody reads: a query row whose keys are all masked (a sequence of length 0) gives zeros here
and the mean of the values there (megatron fills masked scores with -10000, not -inf).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """`DotProductAttention` with the scores, mask, softmax and weighted sum in one SDPA call."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        unsupported = []
        if config.context_parallel_size != 1:
            unsupported.append(f"context_parallel_size={config.context_parallel_size}")
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            unsupported.append(f"window_size={config.window_size}")
        if config.softmax_type != "vanilla":
            unsupported.append(f"softmax_type={config.softmax_type!r}")
        if unsupported:
            raise ValueError(
                "SDPACoreAttention does not support " + ", ".join(unsupported) + " (use the "
                "Transformer Engine spec, or attention_backend='local' where megatron has it)"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = pg_collection.tp.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.hidden_size_per_partition = divide(
            config.kv_channels * config.num_attention_heads, tp_size
        )
        # DotProductAttention divides its scale by layer_number under
        # apply_query_key_layer_scaling and multiplies the scores back before the softmax (an
        # fp16 range trick): the net scale is this one.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "SDPACoreAttention supports neither packed sequences nor an attention bias "
                "(as megatron's DotProductAttention): use the Transformer Engine spec"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        seq_q, batch = query.shape[:2]
        # [s, b, heads, d] -> [b, heads, s, d] as views: SDPA takes strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:
            # SDPA's boolean mask is True where attention is allowed: the opposite convention.
            mask = ~attention_mask
            is_causal = False
        else:
            mask = None
            is_causal = mask_type == AttnMaskType.causal and seq_q > 1
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        with (
            tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext()
        ):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, self.hidden_size_per_partition)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters or buffers (as DotProductAttention with the vanilla softmax)
