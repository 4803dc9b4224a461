"""Where a micro-batch's tokens sit in the model's input, and where each response token's
outputs come out.

    layout = Layout.of(prompt_ids, response_ids, share_prompts=True)
    logits = forward_response_logits(model, layout)    # [all response tokens, vocab / tp]
    per_sample = layout.split(logits)                  # [len(response_i), vocab / tp] each
    logprobs = response_logprobs(logits, layout)       # [all response tokens] (megatron.model)
    padded = layout.padded(logprobs)                   # [samples, longest response] for a loss

Position t of a row predicts the token in column t + 1, so the outputs for response token j
of a sample come from the column just before it; `response_positions` lists those (row,
column) pairs sample after sample, and every per-token quantity (log-probs, entropy, top-k,
the critic's values) is read there, packed: one [n, ...] tensor for the n response tokens of
the micro-batch, which `split` cuts per sample and `padded` lays out as [samples, width, ...].

Two layouts of the same samples:
- **one row per sample** (`share_prompts=False`): prompt + response, right-padded, causal;
  what slime's Megatron actor feeds the model. It needs no mask (`mask` is None): a real
  token's keys are all before it, so causal attention never reads the padding; only padding
  queries see other padding, and nothing reads their outputs. Causal attention without a mask
  is the cheaper kernel (SDPA's `is_causal`).
- **shared prompts**: one row per distinct prompt, holding it once followed by the responses
  of all its samples. A response token attends to the prompt and to its own response's earlier
  tokens only (the mask), and its rotary positions continue from the prompt's end as in its own
  row (`rotary_positions`), so each response token sees exactly the inputs it sees in the
  per-sample layout: the same logits up to float rounding and the same gradients (the prompt's
  activations receive the sum of its samples' gradients, as n copies' gradients would add up).
  The first response token of every sample is predicted by the prompt's last position, which
  the group now shares. GRPO rounds sample each prompt n times, so the prompt is computed once
  instead of n times: the toy round (78-token prompts, 4 samples of at most 16 tokens) becomes
  64 rows of at most 142 tokens instead of 256 rows of at most 94.

The shared layout needs core attention that applies the given mask as is (the SDPA and local
specs; Transformer Engine's causal kernels ignore an arbitrary mask) and unfused rotary
embeddings (`apply_rope_fusion` off, as `build_transformer_config` sets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Layout", "rotary_positions"]


@dataclass(frozen=True)
class Layout:
    ids: torch.Tensor  # [rows, s] token ids (0 in padding)
    # [rows, 1, s, s] bool, True = masked out (megatron's convention); None = causal.
    mask: torch.Tensor | None
    positions: torch.Tensor  # [rows, s] each token's position in its own sequence
    rows: torch.Tensor  # [n]: for each response token, sample after sample, its output row
    cols: torch.Tensor  # [n]: ... and its output column
    targets: torch.Tensor  # [n]: the response tokens themselves
    lengths: list[int]  # each sample's response length (how to split [n, ...] per sample)
    shared: bool  # the shared-prompt layout (rotary positions differ from the columns)
    samples: torch.Tensor  # [n]: for each response token, its sample ...
    offsets: torch.Tensor  # [n]: ... and its index in that sample's response

    @property
    def response_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`x[layout.response_positions]` packs a [rows, s, ...] output into [n, ...].

        One advanced-indexing gather instead of one slice per sample matters for the backward:
        the gradient of each slice is a zero tensor the size of all of `x`, so per-sample
        slicing costs one full-size tensor per sample where this costs one.
        """
        return self.rows, self.cols

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """[n, ...] -> one [len(response_i), ...] tensor per sample."""
        return list(packed.split(self.lengths))

    def split_numpy(self, packed: torch.Tensor) -> list[np.ndarray]:
        """[n, ...] -> one [len(response_i), ...] numpy array per sample (one copy to host)."""
        if not self.lengths:
            return []
        return np.split(packed.detach().cpu().numpy(), np.cumsum(self.lengths[:-1]))

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """[n, ...] -> [samples, longest response, ...], zero after each response (what the
        losses take). One scatter, differentiable, instead of a pad per sample."""
        width = max(self.lengths, default=0)
        out = packed.new_zeros((len(self.lengths), width, *packed.shape[1:]))
        return out.index_put((self.samples, self.offsets), packed)

    def padded_values(self, per_sample: list, what: str) -> torch.Tensor:
        """Per-sample arrays of [len(response_i), ...] values (what a TrainBatch holds: loss
        masks, advantages, old log-probs, ...; `what` names the field in errors) laid out as
        `padded` lays out a packed tensor, in fp32 on the layout's device."""
        arrays = [np.asarray(values) for values in per_sample]
        if len(arrays) != len(self.lengths):
            raise ValueError(f"{what}: {len(arrays)} samples for {len(self.lengths)} responses")
        trailing = max((a.shape[1:] for a in arrays), key=len, default=())
        for sample, (values, length) in enumerate(zip(arrays, self.lengths)):
            if len(values) != length:
                raise ValueError(
                    f"{what}: sample {sample} has {len(values)} values for {length} response tokens"
                )
        # np.concatenate copies: arrays arriving through Ray are read-only.
        packed = np.concatenate(
            [a.reshape(length, *trailing) for a, length in zip(arrays, self.lengths)]
        )
        return self.padded(torch.from_numpy(packed).to(self.targets.device, torch.float32))

    @classmethod
    def of(
        cls,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        share_prompts: bool = False,
        device=None,
    ) -> Layout:
        for row, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(
                    f"sample {row}: empty prompt (the first response token needs a prefix)"
                )
        device = device or (torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        # Nothing shared (every prompt once): the plain layout, which needs no per-row rotary.
        if share_prompts and len({tuple(p) for p in prompt_ids}) < len(prompt_ids):
            return cls._shared(prompt_ids, response_ids, device)
        return cls._per_sample(prompt_ids, response_ids, device)

    @classmethod
    def _per_sample(cls, prompt_ids, response_ids, device) -> Layout:
        width = max([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)] + [1])
        ids = np.zeros((len(prompt_ids), width), dtype=np.int64)
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            ids[row, : len(prompt)] = prompt
            ids[row, len(prompt) : len(prompt) + len(response)] = response
        lengths = np.array([len(r) for r in response_ids], dtype=np.int64)
        rows = np.repeat(np.arange(len(prompt_ids)), lengths)
        # Response token j of a sample is read at column len(prompt) - 1 + j.
        starts = np.array([len(p) - 1 for p in prompt_ids], dtype=np.int64)
        cols = np.repeat(starts, lengths) + _offsets(lengths)
        positions = torch.arange(width).expand(len(prompt_ids), width)
        return cls._build(
            torch.from_numpy(ids), None, positions, rows, cols, response_ids, False, device
        )

    @classmethod
    def _shared(cls, prompt_ids, response_ids, device) -> Layout:
        group_of: dict[tuple[int, ...], int] = {}
        members: list[list[int]] = []  # sample indices per distinct prompt, first-seen order
        for sample, prompt in enumerate(prompt_ids):
            group = group_of.setdefault(tuple(prompt), len(group_of))
            if group == len(members):
                members.append([])
            members[group].append(sample)
        width = max(len(prompt_ids[m[0]]) + sum(len(response_ids[s]) for s in m) for m in members)
        # Filled in numpy: a few hundred slice assignments cost ~1 us each there, ~5 in torch.
        ids = np.zeros((len(members), width), dtype=np.int64)
        positions = np.zeros((len(members), width), dtype=np.int64)
        # segment[r, c]: -1 for the prompt, k for the k-th response of the row, -2 for padding.
        segment = np.full((len(members), width), -2, dtype=np.int64)
        spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(prompt_ids)  # (row, start, end)
        for row, samples in enumerate(members):
            prompt = prompt_ids[samples[0]]
            ids[row, : len(prompt)] = prompt
            positions[row, : len(prompt)] = np.arange(len(prompt))
            segment[row, : len(prompt)] = -1
            start = len(prompt)
            for k, sample in enumerate(samples):
                response = response_ids[sample]
                end = start + len(response)
                ids[row, start:end] = response
                positions[row, start:end] = np.arange(len(prompt), len(prompt) + len(response))
                segment[row, start:end] = k
                spans[sample] = (row, start, end)
                start = end
        ids, positions, segment = map(torch.from_numpy, (ids, positions, segment))
        columns = torch.arange(width)
        query, key = segment[:, :, None], segment[:, None, :]  # [rows, s, 1], [rows, 1, s]
        allowed = (columns[None, :] <= columns[:, None])[None] & (
            (key == -1) | ((key == query) & (query >= 0))
        )
        allowed[..., 0] |= query[..., 0] == -2  # padding queries read column 0: never empty
        rows, cols = [], []
        for sample, (row, start, end) in enumerate(spans):
            if end > start:  # the prompt's last position predicts the first response token
                rows += [row] * (end - start)
                cols += [len(prompt_ids[sample]) - 1, *range(start, end - 1)]
        mask = ~allowed[:, None]
        return cls._build(ids, mask, positions, rows, cols, response_ids, True, device)

    @classmethod
    def _build(cls, ids, mask, positions, rows, cols, response_ids, shared, device) -> Layout:
        lengths = np.array([len(response) for response in response_ids], dtype=np.int64)
        targets = np.fromiter(
            (token for response in response_ids for token in response), np.int64, lengths.sum()
        )

        def on_device(values) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device)

        return cls(
            ids=ids.to(device),
            mask=None if mask is None else mask.to(device),
            positions=positions.contiguous().to(device),
            rows=on_device(rows),
            cols=on_device(cols),
            targets=on_device(targets),
            lengths=lengths.tolist(),
            shared=shared,
            samples=on_device(np.repeat(np.arange(len(lengths)), lengths)),
            offsets=on_device(_offsets(lengths)),
        )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """0..length-1 for each length, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths, lengths)


@contextlib.contextmanager
def rotary_positions(model: torch.nn.Module, layout: Layout) -> Iterator[None]:
    """Within the block, the model's rotary embeddings are those of `layout.positions`
    ([s, rows, 1, dim], one set per row) instead of the columns 0..s-1 megatron uses.

    Megatron's `RotaryEmbedding(seq_len)` gives the table for positions 0..seq_len-1 as
    [seq_len, 1, 1, dim]; every position of a layout is below its width, so the rows' own
    embeddings are that table indexed by their positions (its unfused rotary application
    broadcasts a per-row table as for multimodal rope). The per-sample layout needs nothing.
    """
    if not layout.shared:
        yield
        return
    # megatron lazily, as in model.py: the CLI imports this module and must start fast.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    positions = layout.positions.t()  # [s, rows]

    def at_positions(_module, _args, table: torch.Tensor) -> torch.Tensor:
        return table[:, 0, 0][positions].unsqueeze(2)

    handles = [
        module.register_forward_hook(at_positions)
        for module in model.modules()
        if isinstance(module, RotaryEmbedding)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
