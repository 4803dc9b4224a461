"""Per-request decoding state and the SGLang-shaped response dict built from it.

`Sequence` holds one request while the batch decodes: its output tokens, their log-probs,
stop conditions, and the finish reason. `Sequence.response()` gives exactly what SGLang's
/generate returns for one sequence:

    {"text", "output_ids", "meta_info": {"id", "prompt_tokens", "completion_tokens",
     "cached_tokens", "finish_reason", ["input_token_logprobs", "output_token_logprobs",
     "input_top_logprobs", "output_top_logprobs"]}}

SGLang details followed here (sglang 0.5.23 srt/managers/schedule_batch.py
`Req.update_finish_state`, and the detokenizer):
- the finish checks run in the order stop string, then stop token / eos, then length: a stop
  on the last allowed token is reported as `stop`, not `length`; with `ignore_eos` neither
  eos nor `stop_token_ids` stop generation;
- finish_reason is `{"type": "length", "length": max_new_tokens}`,
  `{"type": "stop", "matched": <token id or stop string>}`, or for a request whose client
  went away `{"type": "abort", "message": ...}`;
- `output_ids` keep the matched stop token; `text` drops it (and cuts the text before a
  matched stop string) unless `no_stop_trim`;
- logprob entries are `[logprob, token_id, text_or_None]`; the text is only filled with
  `return_text_in_logprobs`; the first input entry's logprob is always None.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from opd_core.engine.protocol import SingleRequest
from opd_core.engine.sampling import RowSampling


@dataclass
class Sequence:
    request: SingleRequest
    prompt_ids: list[int]
    max_new_tokens: int  # already clipped to the context length
    eos_ids: frozenset[int]
    seed: int | None  # this sequence's own random stream; None = the global torch RNG
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False  # set from the server's event loop when the client went away
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    input_top: list[tuple[list[float], list[int]] | None] | None = None
    cached_tokens: int = 0  # prompt tokens another sequence of the batch computed for it
    finish_reason: dict[str, Any] | None = None
    generator: torch.Generator | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def restarted(self) -> Sequence:
        """The same request from the start: no output yet, the random stream rewound."""
        return replace(
            self,
            output_ids=[],
            output_logprobs=[],
            output_top=[],
            input_logprobs=None,
            input_top=None,
            cached_tokens=0,
            finish_reason=None,
        )

    @property
    def params(self):
        return self.request.sampling_params

    @property
    def row(self) -> RowSampling:
        p = self.params
        return RowSampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def logprob_start(self) -> int:
        """First prompt position with an input entry (-1 = only the last prompt token)."""
        start = self.request.logprob_start_len
        return len(self.prompt_ids) - 1 if start < 0 else start

    def append(
        self, token: int, logprob: float | None, top: tuple[list[float], list[int]] | None, decode
    ) -> None:
        """Record one generated token and check whether the sequence is done."""
        self.output_ids.append(token)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top.append(top)
        stops = self.params.stop_strings
        if stops:
            text = decode(self.output_ids, self.params.skip_special_tokens)
            for stop in stops:
                if stop in text:
                    self.finish_reason = {"type": "stop", "matched": stop}
                    return
        stop_ids = self.params.stop_token_ids or ()
        if not self.params.ignore_eos and (token in self.eos_ids or token in stop_ids):
            self.finish_reason = {"type": "stop", "matched": token}
            return
        if len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = {"type": "length", "length": self.max_new_tokens}

    def finish_without_decoding(self) -> None:
        self.finish_reason = {"type": "length", "length": self.max_new_tokens}

    def abort(self, message: str) -> None:
        """Stop here (SGLang's FINISH_ABORT); what was generated so far is kept."""
        self.finish_reason = {"type": "abort", "message": message, "status_code": 400}

    def text(self, decode) -> str:
        ids = self.output_ids
        matched = (self.finish_reason or {}).get("matched")
        trim = not self.params.no_stop_trim
        if trim and isinstance(matched, int) and ids:
            ids = ids[:-1]
        text = decode(ids, self.params.skip_special_tokens)
        if trim and isinstance(matched, str) and matched in text:
            text = text[: text.find(matched)]
        return text

    def response(self, decode, token_text) -> dict[str, Any]:
        """The SGLang response dict; `decode(ids, skip_special)` and `token_text(id)` come from
        the tokenizer."""
        req = self.request
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
        }
        if req.return_logprob:
            text_of = token_text if req.return_text_in_logprobs else (lambda _id: None)
            input_ids = self.prompt_ids[self.logprob_start :]
            meta["input_token_logprobs"] = [
                [lp, t, text_of(t)] for lp, t in zip(self.input_logprobs or [], input_ids)
            ]
            meta["output_token_logprobs"] = [
                [lp, t, text_of(t)] for lp, t in zip(self.output_logprobs, self.output_ids)
            ]
            if req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [
                    None if top is None else [[v, i, text_of(i)] for v, i in zip(*top)]
                    for top in self.input_top or []
                ]
                meta["output_top_logprobs"] = [
                    [[v, i, text_of(i)] for v, i in zip(*top)] for top in self.output_top
                ]
        return {"text": self.text(decode), "output_ids": list(self.output_ids), "meta_info": meta}
