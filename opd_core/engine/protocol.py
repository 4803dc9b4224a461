"""Request models of the SGLang HTTP protocol subset the built-in server speaks, and SGLang's
context-length rules.

    request = GenerateRequest.model_validate(json_body)   # 400 on a ValidationError
    for single in request.split(): ...                   # one SingleRequest per sequence
    limits = ContextLimits(context_length=4096)
    params = cap_max_new_tokens(prompt_lengths, sampling_params, limits)   # fit the context

What SGLang 0.5.23 does, and so what the built-in engine does (files under python/sglang/):
- Unknown top-level /generate fields are ignored (api/v1/api_types.py GenerateRequest:
  "unknown keys ignored"): sglang-router adds `model`, `log_metrics`, `background`, ... .
  Fields SGLang knows but the built-in engine cannot honour (`return_hidden_states`,
  `image_data`, ...) are a 400 when set, not silently dropped.
- Unknown sampling params are a 400 (api_types.py SamplingParams: "unknown keys rejected");
  so is `seed`, which is not SGLang's name (`sampling_seed` is). The ranges are those of
  srt/sampling/sampling_params.py `SamplingParams.verify`; SGLang params the built-in engine
  does not implement are accepted only at their default value.
- `n` samples per prompt are expanded prompt-major into one flat response list, and a single
  prompt with n > 1 is answered with a list (srt/managers/io_struct.py
  `_handle_parallel_sampling`, tokenizer_manager.py `_handle_batch_request`).
- Types are strict, as in SGLang's contract (`"5"` is not a token id, `1.0` not an int).

Beyond SGLang, every list and string has a bound (`MAX_*` below), so that no single request
can make the server allocate without limit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top_k (sampling_params.py TOP_K_ALL)
MAX_STOP_COUNT = 32  # SGLang's MAX_STOP_COUNT
MAX_STOP_CHARS = 1024  # ours: a stop string is searched in the output text at every step
MAX_STOP_TOKEN_IDS = 1024
MAX_RID_CHARS = 512
MAX_N = 1024
MAX_TOP_LOGPROBS = 1024  # ours: each position's top list is JSON the server must build
MAX_SEQUENCES = 4096  # sequences (prompts x n) in one request
SAMPLING_SEED_RANGE = (-(2**63), 2**63 - 1)  # SamplingParams.verify

# SGLang's request fields that the built-in engine cannot honour: a 400 when set to anything
# but their default, never silently ignored (the answer would not be what SGLang gives).
_UNSUPPORTED_TOP_LEVEL = (
    "return_hidden_states",
    "token_ids_logprob",
    "input_embeds",
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "custom_logit_processor",
    "return_sampling_mask",
    "session_params",
)
_UNSUPPORTED_SAMPLING = {  # name: the only value accepted
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "beam_width": None,
    "watermark": None,
}


class SamplingParams(BaseModel):
    """SGLang's sampling params (every name it accepts), with its defaults and ranges."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # SGLang's default; 0 = score the prompt only; None = as many as the context allows
    max_new_tokens: int | None = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1  # -1 = no top-k; values past the vocabulary mean the whole vocabulary
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stream_interval: int | None = Field(None, ge=1)
    sampling_seed: int | None = Field(None, ge=SAMPLING_SEED_RANGE[0], le=SAMPLING_SEED_RANGE[1])
    custom_params: dict[str, Any] | None = None  # only read by custom logit processors
    choice: list[str] = Field([], max_length=0)  # accepted only empty: no choice decoding
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_new_tokens: int = Field(0, ge=0)
    stop_regex: str | list[str] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    logit_bias: dict[str, float] | None = None
    beam_width: int | None = Field(None, ge=1)
    watermark: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # SGLang's SamplingParams.__post_init__: "treat None as 'use default' so that callers
        # can pass null" (max_new_tokens None keeps its meaning: no limit but the context).
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None or k == "max_new_tokens"}
        return data

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        # As in SGLang: 0 is neither "disabled" nor a valid k. Above 2**30 SGLang's int32
        # top-k tensor overflows and fails the whole batch; here it is this request's 400.
        if value != -1 and not 1 <= value <= TOP_K_ALL:
            raise ValueError(f"top_k must be -1 (disable) or in [1, 2**30], got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_COUNT:  # SGLang's normalize()
            raise ValueError(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(stops)}")
        for stop in stops:
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(
                    f"a stop string has {len(stop)} characters; at most {MAX_STOP_CHARS}"
                )
        return value

    @model_validator(mode="after")
    def _supported(self) -> SamplingParams:
        for name, default in _UNSUPPORTED_SAMPLING.items():
            value = getattr(self, name)
            if value != default and not (default is None and value in ({}, [], "")):
                raise ValueError(f"{name}: the built-in engine supports only {default!r}")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class SingleRequest(BaseModel):
    """One sequence: what `Generator.generate` takes (as a model or a plain dict)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = SamplingParams()
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1)  # -1 = output tokens only
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    return_text_in_logprobs: bool = False
    rid: str | None = Field(None, max_length=MAX_RID_CHARS)

    @model_validator(mode="after")
    def _one_input(self) -> SingleRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        if self.sampling_params.n != 1:
            raise ValueError("sampling_params.n: one sequence is one sample (n > 1 is a batch)")
        return self


class GenerateRequest(BaseModel):
    """Body of POST /generate: one sequence, or a batch when `text`/`input_ids` is a list of
    prompts or `sampling_params.n` > 1. Unknown fields are ignored, as in SGLang."""

    model_config = ConfigDict(extra="ignore", strict=True)

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = False
    rid: str | list[str] | None = None
    # SGLang fields the built-in engine cannot honour: only their "off" values pass.
    return_hidden_states: Any = None
    token_ids_logprob: Any = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    return_sampling_mask: Any = None
    session_params: Any = None

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        for name in _UNSUPPORTED_TOP_LEVEL:
            value = getattr(self, name)
            if not _is_off(value):
                raise ValueError(f"{name}: not supported by the built-in engine")
        if self.input_ids == [] or self.text == []:
            raise ValueError("input_ids/text: cannot be empty")  # SGLang's words
        return self

    @property
    def n(self) -> int:
        params = self.sampling_params
        if isinstance(params, list):
            return params[0].n if params else 1
        return params.n if params is not None else 1

    @property
    def is_batch(self) -> bool:
        """A list of prompts, or n > 1: the response is a list (SGLang's is_single=False)."""
        if self.n > 1:
            return True
        if self.text is not None:
            return isinstance(self.text, list)
        return isinstance(self.input_ids[0], list)

    def split(self) -> list[SingleRequest]:
        """One SingleRequest per sequence: each prompt's n samples next to each other."""
        prompts_are_list = (
            isinstance(self.text, list)
            if self.text is not None
            else isinstance(self.input_ids[0], list)
        )
        size = len(self.text if self.text is not None else self.input_ids)
        size = size if prompts_are_list else 1
        n = self.n
        if size * n > MAX_SEQUENCES:
            raise ValueError(
                f"{size} prompts x n={n} is {size * n} sequences; at most {MAX_SEQUENCES}"
            )
        per_sequence = ("sampling_params", "return_logprob", "logprob_start_len")
        per_sequence += ("top_logprobs_num", "rid")
        for name in per_sequence:
            value = getattr(self, name)
            if not isinstance(value, list):
                continue
            if not prompts_are_list:
                raise ValueError(f"{name}: a list is only allowed for a batch request")
            if len(value) != size:
                raise ValueError(
                    f"{name}: has {len(value)} entries but the batch has {size} sequences"
                )
            if n > 1 and name not in ("sampling_params", "rid"):
                raise ValueError(f"{name}: Cannot use a list with n > 1")  # SGLang's rule
        if isinstance(self.sampling_params, list) and any(p.n != n for p in self.sampling_params):
            raise ValueError("sampling_params: n must be the same for all sequences of a batch")
        rids = self.rid if isinstance(self.rid, list) else None
        if rids is not None and len(set(rids)) != len(rids):
            duplicates = sorted(r for r, count in Counter(rids).items() if count > 1)
            raise ValueError(f"rid: duplicate request ids {duplicates[:5]}")
        singles = []
        for i in range(size):
            fields = self._pick(i if prompts_are_list else None, i)
            if n > 1:  # SGLang gives every sample its own id (regenerate_rid)
                fields["rid"] = None
            singles.extend([SingleRequest(**fields)] * n)  # the samples differ in state only
        return singles

    def _pick(self, i: int | None, index: int) -> dict[str, Any]:
        def item(value: Any, default: Any) -> Any:
            value = value[index] if isinstance(value, list) else value
            return default if value is None else value

        params = item(self.sampling_params, None) or SamplingParams()
        rid = item(self.rid, None)
        if isinstance(self.rid, str) and i is not None:
            rid = f"{self.rid}_{index}"  # SGLang's _normalize_rid for a batch
        return {
            "text": self.text[i] if i is not None and self.text is not None else self.text,
            "input_ids": self.input_ids[i]
            if i is not None and self.input_ids is not None
            else self.input_ids,
            "sampling_params": params.model_copy(update={"n": 1}) if params.n != 1 else params,
            "return_logprob": item(self.return_logprob, False),
            "logprob_start_len": item(self.logprob_start_len, -1),
            "top_logprobs_num": item(self.top_logprobs_num, 0),
            "return_text_in_logprobs": bool(self.return_text_in_logprobs),
            "rid": rid,
        }


def _is_off(value: Any) -> bool:
    return (
        value is None
        or value is False
        or value in ([], {}, "")
        or (isinstance(value, list) and all(_is_off(v) for v in value))
    )


class UpdateWeightsRequest(BaseModel):
    """Body of POST /update_weights_from_disk (srt/managers/io_struct.py
    UpdateWeightFromDiskReqInput); fields the built-in engine has no use for are accepted."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model_path: str = Field(min_length=1, max_length=4096)
    load_format: str | None = None
    weight_version: str | None = Field(None, max_length=256)
    abort_all_requests: bool = False
    flush_cache: bool = True


class UpdateWeightVersionRequest(BaseModel):
    """Body of POST /update_weight_version (io_struct.py UpdateWeightVersionReqInput)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    new_version: str = Field(min_length=1, max_length=256)
    abort_all_requests: bool = False


def per_sequence_params(sampling_params: dict | list[dict], count: int) -> dict | list[dict]:
    """Spread a call-wide seed: with `sampling_seed` (or its alias `seed`, turned into
    `sampling_seed`, SGLang's only name) in one shared dict, sequence i gets seed + i. One
    seed shared by n samples of the same prompt would, with SGLang's semantics, give n
    identical samples; this keeps them distinct and still reproducible. A list of
    per-sequence dicts is returned unchanged except for the rename."""
    if isinstance(sampling_params, list):
        return [_renamed_seed(p) for p in sampling_params]
    params = _renamed_seed(sampling_params)
    if params.get("sampling_seed") is not None:
        base = int(params["sampling_seed"])
        return [{**params, "sampling_seed": _wrap_seed(base + i)} for i in range(count)]
    return params


def _renamed_seed(params: dict) -> dict:
    if "seed" not in params:
        return params
    params = dict(params)
    seed = params.pop("seed")
    params.setdefault("sampling_seed", seed)
    return params


def _wrap_seed(seed: int) -> int:
    """Into SGLang's int64 range, so that seed + i never turns into a 400."""
    return (seed - SAMPLING_SEED_RANGE[0]) % 2**64 + SAMPLING_SEED_RANGE[0]


# ---------------------------------------------------------------------- context length


class PromptTooLongError(ValueError):
    """Prompts that no `max_new_tokens` can make fit the server's context."""


@dataclass(frozen=True)
class ContextLimits:
    """What an SGLang server accepts for a model with `context_length` tokens of context.

    SGLang 0.5.23 answers 400 (python/sglang/srt/managers/):
    - `len(prompt) >= context_length` ("The input (N tokens) is longer than the model's
      context length (C tokens).") and `len(prompt) + max_new_tokens > context_length`
      ("Requested token count exceeds ...") in tokenizer_manager.py `_validate_one_request`;
    - `len(prompt) >= max_req_input_len` in the scheduler (utils.py `validate_input_length`),
      where tp_worker.py sets max_req_input_len = min(context_length - 1, kv_tokens - 1) - 5.
    and then quietly lowers max_new_tokens to `(context_length - 1) - len(prompt) - 1`
    (scheduler.py, "Keep this bound consistent with PrefillAdder's admission budget").
    Real servers report `max_req_input_len` in /server_info; without it, the KV pool is
    assumed to hold a whole context.
    """

    context_length: int
    max_req_input_len: int | None = None

    @property
    def input_limit(self) -> int:
        """Prompts must be shorter than this (SGLang's max_req_input_len)."""
        if self.max_req_input_len is not None:
            return self.max_req_input_len
        return self.context_length - 1 - 5

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the server accepts (with max_new_tokens 0)."""
        return min(self.input_limit, self.context_length) - 1

    def error(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """SGLang's 400 message for this request, or None if it is accepted."""
        context = self.context_length
        if prompt_len >= context:
            return (
                f"The input ({prompt_len} tokens) is longer than the model's context length "
                f"({context} tokens)."
            )
        if prompt_len + max_new_tokens > context:
            return (
                "Requested token count exceeds the model's maximum context length of "
                f"{context} tokens. You requested a total of {prompt_len + max_new_tokens} "
                f"tokens: {prompt_len} tokens from the input messages and {max_new_tokens} "
                "tokens for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )
        if prompt_len >= self.input_limit:
            return (
                f"Input length ({prompt_len} tokens) exceeds the maximum allowed length "
                f"({self.input_limit} tokens). Use a shorter input or enable "
                "--allow-auto-truncate."
            )
        return None

    def generated_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """How many tokens an accepted request can generate at most (the scheduler's clip)."""
        return max(0, min(max_new_tokens, self.context_length - 1 - prompt_len - 1))

    def cap(self, prompt_len: int, max_new_tokens: int) -> int:
        """The largest max_new_tokens <= the asked one that the server accepts."""
        if prompt_len > self.max_prompt_tokens:
            raise PromptTooLongError(self.error(prompt_len, 0))
        return min(max_new_tokens, self.context_length - prompt_len)


DEFAULT_MAX_NEW_TOKENS = SamplingParams.model_fields["max_new_tokens"].default


def cap_max_new_tokens(
    prompt_lengths: list[int], sampling_params: dict | list[dict], limits: ContextLimits
) -> dict | list[dict]:
    """`sampling_params` with each sequence's max_new_tokens lowered to fit `limits`.

    Returns the input unchanged when every sequence fits, else one dict per sequence. A
    prompt that cannot fit at all is an error naming every such sequence (nothing is skipped
    silently: the caller decides, e.g. by filtering its data before the run).
    """
    per_sequence = isinstance(sampling_params, list)
    asked = [
        (sampling_params[i] if per_sequence else sampling_params).get(
            "max_new_tokens", DEFAULT_MAX_NEW_TOKENS
        )
        for i in range(len(prompt_lengths))
    ]
    asked = [limits.context_length if m is None else m for m in asked]  # None: up to the end
    too_long = [i for i, n in enumerate(prompt_lengths) if n > limits.max_prompt_tokens]
    if too_long:
        shown = ", ".join(f"{i} ({prompt_lengths[i]} tokens)" for i in too_long[:10])
        raise PromptTooLongError(
            f"{len(too_long)} prompt(s) longer than the {limits.max_prompt_tokens} tokens a "
            f"server with context length {limits.context_length} accepts: sequence {shown}"
            + (" ..." if len(too_long) > 10 else "")
        )
    capped = [limits.cap(n, m) for n, m in zip(prompt_lengths, asked)]
    if capped == asked:
        return sampling_params
    return [
        {**(sampling_params[i] if per_sequence else sampling_params), "max_new_tokens": capped[i]}
        for i in range(len(prompt_lengths))
    ]


# ------------------------------------------------------------------------------ errors


def validation_message(err: ValidationError) -> str:
    """One line per wrong field, e.g. `sampling_params.max_new_tokens: Input should be >= 0`.

    Union fields (`input_ids` is a list or a list of lists) make pydantic report one error
    per branch, labelled with the branch's type; we drop those labels, and drop "should be a
    list/object" branch errors when a more specific error about the same field exists.
    At most 10 errors are listed: a 10,000-element list of wrong ids is one message.
    """
    errors = []
    for e in err.errors(include_url=False, include_input=False):
        loc = [str(p) for p in e["loc"] if not _is_branch_label(p)]
        errors.append(
            (".".join(loc) or "(body)", e["msg"].removeprefix("Value error, "), e["type"])
        )
    specific = [
        e
        for e in errors
        if e[2] not in ("list_type", "model_type", "dict_type", "model_attributes_type")
    ]
    chosen = list(dict.fromkeys(f"{field}: {msg}" for field, msg, _ in (specific or errors)))
    more = f"; ... ({len(chosen) - 10} more)" if len(chosen) > 10 else ""
    return "; ".join(chosen[:10]) + more


def _is_branch_label(part) -> bool:
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("bool", "int", "float", "str", "none")
    )
