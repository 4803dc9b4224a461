"""Shared prompt prefixes of one batch, computed once: the built-in engine's radix cache.

    plan = PrefixPlan.of([s.prompt_ids for s in seqs], [s.cacheable for s in seqs])
    plan.segments          # forward these in order, the KV cache re-indexed by `parents`
    plan.cached_tokens     # per sequence: prompt tokens another sequence computed for it

SGLang keeps the KV of every prompt prefix it has computed in a radix tree, so the n samples
of one prompt, and every prompt of a dataset template, compute their shared prefix once
(`cached_tokens` in each answer's meta_info says how many prompt tokens were reused). On the
toy task a prompt is 78 tokens, 49 of them the DAPO instruction every prompt starts with, and
each prompt comes n_samples_per_prompt times; computing every row in full, as a plain
batched forward does, spends ~3x the prefill compute SGLang spends on the rollout engine and
the teacher alike.

The plan has three segments, each one forward over the rows it names:
1. the head: the longest prefix all cacheable prefixes share (one row);
2. the distinct cacheable prefixes, past the head (one row each);
3. every sequence's own rest (its last prompt token at least), one row per sequence.
Between two segments the KV cache and the attention mask are re-indexed by `parents` (row r of
a segment extends row parents[r] of the one before), so every sequence attends to exactly its
own prompt. A segment with nothing to compute is left out.

What is cacheable follows SGLang: a prefix never reaches into the positions whose log-probs
were asked for (`logprob_start_len`; 0 turns the cache off for that request, as the
radix-cache match is cut at the logprob start), and the last prompt token is always computed,
since its logits give the first new token.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrefixPlan", "Segment"]


@dataclass(frozen=True)
class Segment:
    rows: list[list[int]]  # the token ids each row of this segment computes (may be empty)
    parents: list[int] | None  # row of the previous segment each row extends; None: the first


def _common_prefix_length(sequences: list[tuple[int, ...]]) -> int:
    shortest, longest = min(sequences), max(sequences)  # lexicographic: their LCP is everyone's
    length = 0
    for a, b in zip(shortest, longest):
        if a != b:
            break
        length += 1
    return length


@dataclass(frozen=True)
class PrefixPlan:
    segments: list[Segment]
    cached_tokens: list[int]  # per sequence
    suffix_starts: list[int]  # per sequence: the prompt position its last segment starts at

    @classmethod
    def of(cls, prompts: list[list[int]], cacheable: list[int]) -> PrefixPlan:
        """The plan for `prompts` whose first `cacheable[i]` tokens may be shared."""
        prefixes = [
            tuple(p[: min(c, len(p) - 1)]) if c > 0 else () for p, c in zip(prompts, cacheable)
        ]
        distinct = list(dict.fromkeys(prefixes))  # first-seen order
        head = _common_prefix_length(distinct) if len(distinct) > 1 else 0
        if distinct == [()] or (not head and len(distinct) == len(prompts)):
            # Nothing shared (or nothing cacheable): one plain forward.
            zeros = [0] * len(prompts)
            return cls([Segment([list(p) for p in prompts], None)], zeros, zeros)
        index_of = {prefix: i for i, prefix in enumerate(distinct)}
        segments: list[Segment] = []
        if head:
            segments.append(Segment([list(distinct[0][:head])], None))
        segments.append(
            Segment([list(p[head:]) for p in distinct], [0] * len(distinct) if head else None)
        )
        segments.append(
            Segment(
                [list(p[len(prefix) :]) for p, prefix in zip(prompts, prefixes)],
                [index_of[prefix] for prefix in prefixes],
            )
        )
        # Who computed what: the first sequence computes the head, the first of each distinct
        # prefix its part past the head; every other prefix token was reused (SGLang's
        # cached_tokens, as if the batch had been admitted one request after another).
        cached, first_of = [], set()
        for i, prefix in enumerate(prefixes):
            own = 0
            if prefix not in first_of:
                first_of.add(prefix)
                own += len(prefix) - head if prefix else 0
            if i == 0:
                own += head
            cached.append(max(0, len(prefix) - own))
        return cls(segments, cached, [len(prefix) for prefix in prefixes])
