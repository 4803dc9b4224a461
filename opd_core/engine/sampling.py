"""Next-token log-probs and sampling, with SGLang's semantics, for one decoding step of a batch.

    logprobs = output_logprobs(logits, temperatures)          # what the server reports
    tokens = sample_tokens(logits, logprobs, params, generators)

Semantics checked against SGLang's `python/sglang/srt/layers/sampler.py` (2025):
- temperature 0 means greedy: the token is argmax of the raw logits and its reported
  log-prob is `log_softmax(logits)` (SGLang turns temperature < 1e-6 into top_k=1, T=1).
- otherwise SGLang divides the logits by the temperature, takes the softmax, samples with
  top-k / top-p / min-p, and reports `log(probs)` of the *temperature-scaled* distribution,
  before any top-k/top-p truncation (unless SGLANG_RETURN_ORIGINAL_LOGPROB is set, which
  reports the raw `log_softmax(logits)`; we honour the same environment variable).
- prompt (input) log-probs are always plain `log_softmax(logits)` at temperature 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS: temperatures below it are greedy


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings of one sequence in the batch."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _return_original_logprob() -> bool:
    return os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes")


def output_logprobs(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Log-probs `[B, V]` that SGLang reports for output tokens (see module docstring)."""
    logits = logits.float()
    if _return_original_logprob():
        return torch.log_softmax(logits, dim=-1)
    temperatures = torch.tensor(
        [1.0 if r.greedy else r.temperature for r in rows], dtype=logits.dtype
    )
    return torch.log_softmax(logits / temperatures.to(logits.device).unsqueeze(1), dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    rows: list[RowSampling],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Pick the next token of every row: argmax for greedy rows, else a top-k/top-p/min-p draw.

    Each row draws its uniform number from its own `torch.Generator` (when given), so a seeded
    request gives the same tokens whatever else is in the batch.
    """
    logits = logits.float()
    next_tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if not sampled:
        return next_tokens
    index = torch.tensor(sampled, device=logits.device)
    temperatures = torch.tensor(
        [rows[i].temperature for i in sampled], device=logits.device
    ).unsqueeze(1)
    probs = torch.softmax(logits[index] / temperatures, dim=-1)
    vocab = probs.shape[-1]
    # Inverse-CDF draw with one uniform number per row from that row's generator.
    uniforms = torch.stack(
        [torch.rand((), generator=generators[i], device="cpu") for i in sampled]
    ).to(logits.device)
    if not any(_truncates(rows[i], vocab) for i in sampled):
        # Nothing to cut away: the draw needs no sorted order (the sort was a fifth of a
        # toy rollout's time), the same distribution over the vocabulary's own order.
        cdf = probs.cumsum(dim=-1)
        position = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True)
        next_tokens[index] = position.clamp(max=vocab - 1).squeeze(1)
        return next_tokens
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    # Same order of filters as SGLang's torch fallback: top-k, top-p (on the untruncated
    # cumulative mass), then min-p relative to the most likely token.
    top_k = torch.tensor(
        [rows[i].top_k if rows[i].top_k > 0 else vocab for i in sampled], device=logits.device
    )
    top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits.device)
    min_p = torch.tensor([rows[i].min_p for i in sampled], device=logits.device)
    cumulative = sorted_probs.cumsum(dim=-1)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    drop |= (cumulative - sorted_probs) > top_p.unsqueeze(1)
    drop |= sorted_probs < (sorted_probs[:, :1] * min_p.unsqueeze(1))
    drop[:, 0] = False  # the most likely token always survives
    kept = sorted_probs.masked_fill(drop, 0.0)
    kept_cdf = kept.cumsum(dim=-1)
    position = torch.searchsorted(kept_cdf, (uniforms * kept_cdf[:, -1]).unsqueeze(1), right=True)
    position = position.clamp(max=vocab - 1)
    next_tokens[index] = sorted_ids.gather(1, position).squeeze(1)
    return next_tokens


def _truncates(row: RowSampling, vocab: int) -> bool:
    """Whether top-k, top-p or min-p cut anything from this row's distribution."""
    return 0 < row.top_k < vocab or row.top_p < 1.0 or row.min_p > 0.0


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """The k largest log-probs of every row and their token ids, as Python lists."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return values.tolist(), ids.tolist()
