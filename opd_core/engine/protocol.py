"""Request models of the SGLang HTTP protocol subset the built-in server speaks.

    request = GenerateRequest.model_validate(json_body)   # 400 on a ValidationError
    for single in request.split(): ...                   # one SingleRequest per sequence

Field names and defaults follow SGLang's `GenerateReqInput` and `SamplingParams`. Unknown
fields are errors (`extra="forbid"`) and types are strict (`"5"` is not a token id), so a
typo or a wrong type gets a 400 naming the field instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", strict=True)


class SamplingParams(BaseModel):
    model_config = _STRICT

    max_new_tokens: int = Field(128, ge=0)  # SGLang's default; 0 = score the prompt only
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)  # -1 = no top-k
    min_p: float = Field(0.0, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None  # SGLang's name
    seed: int | None = None  # alias of sampling_seed

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0:  # as in SGLang: 0 is neither "disabled" nor a valid k
            raise ValueError("top_k must be -1 (disabled) or at least 1")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def effective_seed(self) -> int | None:
        return self.sampling_seed if self.sampling_seed is not None else self.seed


class SingleRequest(BaseModel):
    """One sequence: what `Generator.generate` takes (as a model or a plain dict)."""

    model_config = _STRICT

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = SamplingParams()
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1)  # -1 = output tokens only
    top_logprobs_num: int = Field(0, ge=0)
    return_text_in_logprobs: bool = False
    rid: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> SingleRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        return self


class GenerateRequest(BaseModel):
    """Body of POST /generate: one sequence, or a batch when `text`/`input_ids` is a list."""

    model_config = _STRICT

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        return self

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def split(self) -> list[SingleRequest]:
        """One SingleRequest per sequence; per-sequence lists must match the batch size."""
        if not self.is_batch:
            return [SingleRequest(**self._pick(None))]
        size = len(self.text if self.text is not None else self.input_ids)
        for name in (
            "sampling_params",
            "return_logprob",
            "logprob_start_len",
            "top_logprobs_num",
            "rid",
        ):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != size:
                raise ValueError(
                    f"{name}: has {len(value)} entries but the batch has {size} sequences"
                )
        return [SingleRequest(**self._pick(i)) for i in range(size)]

    def _pick(self, i: int | None) -> dict[str, Any]:
        def item(value: Any) -> Any:
            return value[i] if i is not None and isinstance(value, list) else value

        fields = {
            "text": item(self.text),
            "input_ids": self.input_ids[i]
            if i is not None and self.input_ids is not None
            else self.input_ids,
            "sampling_params": item(self.sampling_params) or SamplingParams(),
            "return_logprob": item(self.return_logprob),
            "logprob_start_len": item(self.logprob_start_len),
            "top_logprobs_num": item(self.top_logprobs_num),
            "return_text_in_logprobs": self.return_text_in_logprobs,
            "rid": item(self.rid),
        }
        if i is None:
            for name in (
                "return_logprob",
                "logprob_start_len",
                "top_logprobs_num",
                "rid",
                "sampling_params",
            ):
                if isinstance(getattr(self, name), list):
                    raise ValueError(f"{name}: a list is only allowed for a batch request")
        return fields


def per_sequence_params(sampling_params: dict | list[dict], count: int) -> dict | list[dict]:
    """Spread a call-wide seed: with `seed` (or `sampling_seed`) in one shared dict, sequence i
    gets seed + i. One seed shared by n samples of the same prompt would, with SGLang's
    semantics, give n identical samples; this keeps them distinct and still reproducible.
    A list of per-sequence dicts is returned unchanged."""
    if isinstance(sampling_params, list):
        return sampling_params
    for key in ("sampling_seed", "seed"):
        if sampling_params.get(key) is not None:
            base = int(sampling_params[key])
            return [{**sampling_params, key: (base + i) % 2**63} for i in range(count)]
    return sampling_params


class UpdateWeightsRequest(BaseModel):
    model_config = _STRICT

    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    abort_all_requests: bool = False


def validation_message(err: ValidationError) -> str:
    """One line per wrong field, e.g. `sampling_params.max_new_tokens: Input should be >= 0`.

    Union fields (`input_ids` is a list or a list of lists) make pydantic report one error
    per branch, labelled with the branch's type; we drop those labels, and drop "should be a
    list/object" branch errors when a more specific error about the same field exists.
    """
    errors = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not _is_branch_label(p)]
        errors.append((".".join(loc) or "(body)", e["msg"], e["type"]))
    specific = [
        e
        for e in errors
        if e[2] not in ("list_type", "model_type", "dict_type", "model_attributes_type")
    ]
    chosen = specific or errors
    return "; ".join(dict.fromkeys(f"{field}: {msg}" for field, msg, _ in chosen))


def _is_branch_label(part) -> bool:
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("bool", "int", "float", "str", "none")
    )
