"""Batched generation and scoring with an HF causal LM: the compute behind the built-in server.

    generator = Generator("path/to/hf_model")            # fp32 on CPU, bf16 on CUDA
    [out] = generator.generate([{"input_ids": [1, 2, 3], "return_logprob": True,
                                 "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}}])
    out["meta_info"]["input_token_logprobs"]             # [[None, 1, None], [-5.2, 2, None], ...]

`generate` runs all requests as ONE left-padded batch (attention mask + position ids): a
prefill forward over the prompts, then one forward per new token with a KV cache
(transformers `DynamicCache`). Requests are dicts (or `SingleRequest`s) in SGLang's shape;
responses are SGLang's response dicts (see `sequence.py`). `prepare` validates a request
without running it (token ids inside the vocabulary, SGLang's context-length rules from
`protocol.ContextLimits`), raising `RequestError` with the field name, so a server can reject
one bad request up front. `encode_texts` tokenizes without holding the GIL, so a server can
run it on a thread of its own while the event loop keeps answering.

`sampling_seed_mode` says what a request's `sampling_seed` does:
- "honour" (the default, in process): it seeds that sequence's random stream; sequences
  without one draw from a stream seeded by `seed`, or from torch's global RNG;
- "ignore": what SGLang does unless started with `--enable-deterministic-inference`
  (srt/sampling/sampling_batch_info.py only builds the seed tensor under that flag): every
  sequence draws as if unseeded;
- "deterministic": SGLang with that flag: honoured, and a sequence without one is seeded
  with 42 (SGLang's default there), so unseeded samples of one prompt are identical.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from opd_core.engine.prefix import PrefixPlan
from opd_core.engine.protocol import (
    ContextLimits,
    SingleRequest,
    cap_max_new_tokens,
    per_sequence_params,
    validation_message,
)
from opd_core.engine.sampling import output_logprobs, sample_tokens, top_logprobs
from opd_core.engine.sequence import Sequence

logger = logging.getLogger("opd.engine")

SamplingSeedMode = Literal["honour", "ignore", "deterministic"]
DETERMINISTIC_DEFAULT_SEED = 42  # SGLang's seed for unseeded requests under the flag
# from_pretrained switches process-global state (it builds the model on torch's meta device):
# two loads at once in one process (two in-process servers) break each other.
_LOAD_LOCK = threading.Lock()

# SGLang clamps log-probs to the dtype's lowest finite value: -inf is not valid JSON.
_LOGPROB_FLOOR = torch.finfo(torch.float32).min


class RequestError(ValueError):
    """A request the engine cannot run; the message names the field (an HTTP 400)."""


def check_model_path(model_path: str | Path) -> None:
    """A path that is clearly meant to be local (absolute, ./ or ../) must be a directory;
    anything else may be a hub id, which from_pretrained resolves."""
    text = str(model_path)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        raise RequestError(f"model_path: {text} is not a directory")


class Generator:
    def __init__(
        self,
        model_path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        context_length: int | None = None,
        sampling_seed_mode: SamplingSeedMode = "honour",
        trust_remote_code: bool = False,
        prefix_cache: bool = True,
    ):
        check_model_path(model_path)
        # SGLang's radix cache (off with --disable-radix-cache): shared prompt prefixes of a
        # batch are computed once (`prefix.py`).
        self.prefix_cache = prefix_cache
        self.model_path = str(model_path)
        self.trust_remote_code = trust_remote_code
        self.sampling_seed_mode = sampling_seed_mode
        self._ignored_seed_logged = False
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = {
                "float32": torch.float32,
                "fp32": torch.float32,
                "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16,
                "float16": torch.float16,
                "fp16": torch.float16,
            }[dtype]
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, trust_remote_code=trust_remote_code
        )
        self.model = self._load_model(self.model_path)
        config = self.model.config
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.context_length_arg = context_length  # what /server_info reports, as SGLang does
        self.context_length = int(
            context_length or getattr(config, "max_position_embeddings", 1 << 30)
        )
        self.limits = ContextLimits(self.context_length)
        self.eos_ids = frozenset(self._eos_ids())
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos_ids, default=0)
        )
        self.weight_version = "default"  # SGLang's; only an update that names one changes it
        # Without a per-request seed, rollouts are still reproducible when the server has one.
        self._seed_source = torch.Generator().manual_seed(seed) if seed is not None else None

    # ---------------------------------------------------------------------------- model

    def _load_model(self, model_path: str) -> torch.nn.Module:
        """The HF causal LM in `model_path`; RequestError naming the file if it is unreadable."""
        check_model_path(model_path)
        for weights in sorted(Path(model_path).glob("*.safetensors")):
            try:  # reads only the header, which also checks the file's length
                with safe_open(str(weights), framework="pt"):
                    pass
            except Exception as err:
                raise RequestError(f"model_path: {weights} is unreadable: {err}") from err
        try:
            with _LOAD_LOCK:
                model = AutoModelForCausalLM.from_pretrained(
                    model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code
                )
        except Exception as err:  # any way a checkpoint can be broken is this request's 400
            raise RequestError(
                f"model_path: cannot load an HF causal LM from {model_path}: "
                f"{type(err).__name__}: {err}"
            ) from err
        return model.to(self.device).eval()

    def _eos_ids(self) -> Iterable[int]:
        if self.tokenizer.eos_token_id is not None:
            yield self.tokenizer.eos_token_id
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is not None:
            yield from ([eos] if isinstance(eos, int) else eos)

    def load_weights(self, model_path: str | Path, weight_version: str | None = None) -> str:
        """Swap in the weights of another checkpoint of the same architecture, in place.

        The new checkpoint is loaded fully before anything is copied, so a bad path, a
        truncated file or a shape mismatch leaves the current weights untouched. Like SGLang,
        `weight_version` changes only when the caller names the new one.
        """
        model_path = str(model_path)
        if not Path(model_path).is_dir():
            raise RequestError(f"model_path: {model_path} is not a directory")
        new_state = self._load_model(model_path).state_dict()
        current = self.model.state_dict()
        if set(new_state) != set(current):
            missing = sorted(set(current) - set(new_state))[:3]
            extra = sorted(set(new_state) - set(current))[:3]
            raise RequestError(
                f"model_path: {model_path} has different parameters "
                f"(missing {missing}, extra {extra})"
            )
        for name, tensor in new_state.items():
            if tensor.shape != current[name].shape:
                raise RequestError(
                    f"model_path: {model_path}: {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(current[name].shape)}"
                )
        self.model.load_state_dict(new_state)
        self.model_path = model_path
        if weight_version is not None:
            self.weight_version = weight_version
        return f"Succeeded to update model weights from {model_path}."

    def model_info(self) -> dict[str, Any]:
        """SGLang's /model_info keys (http_server.py `model_info`): no weights fingerprint,
        no context length (SGLang reports neither here)."""
        config = self.model.config
        return {
            "model_path": self.model_path,
            "served_model_name": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }

    # ------------------------------------------------------------------------- requests

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as `tokenizer.encode` gives them, from the Rust tokenizer's
        `encode_batch`, which releases the GIL (its plain `encode` holds it for the whole
        text: 4 s for 2 MB here), so other threads, the event loop included, keep running."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return [self.tokenizer.encode(text) for text in texts]
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]

    def prepare(
        self, request: SingleRequest | dict[str, Any], prompt_ids: list[int] | None = None
    ) -> Sequence:
        """Validate one request and turn it into decoding state; RequestError if it is bad.

        `prompt_ids` are the request's text already tokenized (by `encode_texts`).
        """
        if not isinstance(request, SingleRequest):
            try:
                request = SingleRequest.model_validate(request)
            except ValidationError as err:
                raise RequestError(validation_message(err)) from None
        field = "input_ids" if request.input_ids is not None else "text"
        if request.input_ids is not None:
            prompt = request.input_ids
            self._check_ids(prompt, field)
        else:
            prompt = prompt_ids if prompt_ids is not None else self.encode_texts([request.text])[0]
        if not prompt:
            raise RequestError(f"{field}: the prompt is empty (need at least one token)")
        params = request.sampling_params
        if request.return_logprob and request.logprob_start_len >= len(prompt):
            raise RequestError(
                f"logprob_start_len: {request.logprob_start_len} is not below the prompt "
                f"length {len(prompt)}"
            )
        if request.top_logprobs_num > self.vocab_size:
            raise RequestError(
                f"top_logprobs_num: {request.top_logprobs_num} is more than the vocabulary "
                f"({self.vocab_size})"
            )
        self._check_ids(params.stop_token_ids or [], "sampling_params.stop_token_ids")
        max_new_tokens = params.max_new_tokens
        if max_new_tokens is None:  # SGLang: no limit but the context's
            max_new_tokens = max(0, self.context_length - len(prompt))
        too_long = self.limits.error(len(prompt), max_new_tokens)
        if too_long:
            raise RequestError(f"{field}: {too_long}")
        return Sequence(
            request=request,
            prompt_ids=list(prompt),
            max_new_tokens=self.limits.generated_tokens(len(prompt), max_new_tokens),
            eos_ids=self.eos_ids,
            seed=self._seed_of(params.sampling_seed),
            **({"rid": request.rid} if request.rid else {}),
        )

    def _check_ids(self, ids: list[int], field: str) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # fast path: C-level min/max
            pos = next(p for p, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise RequestError(
                f"{field}[{pos}]: token id {ids[pos]} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    def _seed_of(self, sampling_seed: int | None) -> int | None:
        """The seed of one sequence's random stream, by `sampling_seed_mode`."""
        if self.sampling_seed_mode == "ignore" and sampling_seed is not None:
            if not self._ignored_seed_logged:
                self._ignored_seed_logged = True
                logger.warning(
                    "sampling_seed is ignored, as by SGLang without "
                    "--enable-deterministic-inference (logged once)"
                )
            sampling_seed = None
        if sampling_seed is None and self.sampling_seed_mode == "deterministic":
            return DETERMINISTIC_DEFAULT_SEED
        if sampling_seed is None and self._seed_source is not None:
            return int(torch.randint(0, 2**62, (), generator=self._seed_source))
        return sampling_seed

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # ------------------------------------------------------------------------ the batch

    @torch.inference_mode()
    def generate(
        self,
        requests: list[SingleRequest | dict[str, Any] | Sequence],
        on_step: Callable[[list[Sequence]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run all requests as one batch; `on_step(sequences)` is called after every token."""
        seqs = [r if isinstance(r, Sequence) else self.prepare(r) for r in requests]
        if not seqs:
            return []
        self._run(seqs, on_step)
        return [s.response(self.decode, self.token_text) for s in seqs]

    def generate_ids(
        self,
        input_ids: list[list[int]],
        sampling_params: dict | list[dict],
        return_logprob: bool = False,
        context_length: int | None = None,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """`EngineClient.generate`'s signature, in process (same call-wide seed rule).

        With `context_length`, each sequence's max_new_tokens is capped to fit
        `min(context_length, the model's)` by SGLang's rules (`protocol.cap_max_new_tokens`);
        a prompt that cannot fit at all is a `PromptTooLongError` naming it.
        """
        params = per_sequence_params(sampling_params, len(input_ids))
        if context_length is not None:
            limits = ContextLimits(min(context_length, self.context_length))
            params = cap_max_new_tokens([len(ids) for ids in input_ids], params, limits)
        return self.generate(
            [
                {
                    "input_ids": list(ids),
                    "sampling_params": params[i] if isinstance(params, list) else params,
                    "return_logprob": return_logprob,
                    **fields,
                }
                for i, ids in enumerate(input_ids)
            ]
        )

    def _cacheable(self, seq: Sequence) -> int:
        """How many leading prompt tokens `seq` may share (see `prefix.py`): none with the
        cache off or with logprob_start_len 0, else up to its logprob start."""
        if not self.prefix_cache:
            return 0
        return seq.logprob_start if seq.request.return_logprob else len(seq.prompt_ids) - 1

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of `rows`, left-padded so every row ends in the last
        column."""
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row) :] = torch.tensor(row)
                attention_mask[i, width - len(row) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _run(self, seqs: list[Sequence], on_step) -> None:
        batch = len(seqs)
        wants_input = [s.request.return_logprob for s in seqs]
        plan = PrefixPlan.of([s.prompt_ids for s in seqs], [self._cacheable(s) for s in seqs])
        # A KV cache for the segments after the first and for decoding; a scoring batch with
        # nothing shared (one segment, no new tokens) keeps none.
        decoding = any(s.max_new_tokens > 0 for s in seqs)
        cache = (
            DynamicCache(config=self.model.config) if decoding or len(plan.segments) > 1 else None
        )
        # The prefill, segment by segment (one segment when nothing is shared): the cache and
        # the mask follow each row to the rows that extend it, so a row's keys are exactly
        # its own prompt, with padding between segments masked out.
        attention_mask = None
        for segment in plan.segments:
            if segment.parents is not None:
                index = torch.tensor(segment.parents, device=self.device)
                cache.reorder_cache(index)
                attention_mask = attention_mask[index]
            input_ids, segment_mask = self._left_padded(segment.rows)
            attention_mask = (
                segment_mask
                if attention_mask is None
                else torch.cat([attention_mask, segment_mask], dim=1)
            )
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            last = segment is plan.segments[-1]
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                # Only the last position's logits are needed unless someone asked for prompt
                # logprobs (which only the last segment holds).
                logits_to_keep=0 if last and any(wants_input) else 1,
            )
        for seq, cached in zip(seqs, plan.cached_tokens):
            seq.cached_tokens = cached
        logits = out.logits
        if any(wants_input):
            self._input_logprobs(
                [s for s, w in zip(seqs, wants_input) if w],
                logits[wants_input],
                input_ids[wants_input],
                [start for start, w in zip(plan.suffix_starts, wants_input) if w],
            )
        for seq in seqs:
            if seq.max_new_tokens <= 0:
                seq.finish_without_decoding()
        next_logits = logits[:, -1]
        del out, logits

        while not all(s.finished for s in seqs):
            for seq in seqs:  # a client that went away: stop spending steps on its sequences
                if seq.cancelled and not seq.finished:
                    seq.abort("the client disconnected")
            if all(s.finished for s in seqs):
                break
            rows = [s.row for s in seqs]
            need_logprobs = any(s.request.return_logprob and not s.finished for s in seqs)
            logprobs = output_logprobs(next_logits, rows) if need_logprobs else None
            tokens = sample_tokens(next_logits, rows, [s.generator for s in seqs]).tolist()
            for i, seq in enumerate(seqs):
                if seq.finished:
                    continue
                want = seq.request.return_logprob
                top = (
                    top_logprobs(logprobs[i : i + 1], seq.request.top_logprobs_num)
                    if want and seq.request.top_logprobs_num
                    else None
                )
                seq.append(
                    tokens[i],
                    max(float(logprobs[i, tokens[i]]), _LOGPROB_FLOOR) if want else None,
                    (top[0][0], top[1][0]) if top else None,
                    self.decode,
                )
            if on_step is not None:
                on_step(seqs)
            if all(s.finished for s in seqs):
                break
            # Finished rows keep riding along (fed padding, outputs ignored): cheaper than
            # reshaping the cache for a toy batch, and it keeps the batch a single tensor.
            feed = torch.tensor(
                [[self.pad_id if s.finished else t] for s, t in zip(seqs, tokens)],
                device=self.device,
            )
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(
                input_ids=feed,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            next_logits = out.logits[:, -1]

    def _input_logprobs(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        suffix_starts: list[int],
    ) -> None:
        """Prompt log-probs at temperature 1 for positions logprob_start..end, first one None.

        `input_ids` are the last prefill segment's (left-padded) rows, sequence i's prompt
        from position `suffix_starts[i]` on (which is at most its logprob start). One gather
        and one logsumexp for the whole batch: the logits in column c predict the token in
        column c+1, so log p(token c+1) = logit[c, token] - logsumexp(logit[c]).
        """
        targets = input_ids[:, 1:].unsqueeze(2)
        shifted = logits[:, :-1]
        token_logprobs = shifted.gather(2, targets).squeeze(2).float() - torch.logsumexp(
            shifted.float(), dim=-1
        )
        token_logprobs = token_logprobs.clamp(min=_LOGPROB_FLOOR).cpu()
        longest = input_ids.shape[1]
        for row, (seq, offset) in enumerate(zip(seqs, suffix_starts)):
            # Positions in this row: prompt position j sits in column pad + j - offset.
            pad, start, length = (
                longest - (len(seq.prompt_ids) - offset),
                seq.logprob_start - offset,
                len(seq.prompt_ids) - offset,
            )
            # Entry for prompt token j (j > start) comes from column pad + j - 1.
            seq.input_logprobs = [
                None,
                *token_logprobs[row, pad + start : pad + length - 1].tolist(),
            ]
            if seq.request.top_logprobs_num:
                window = torch.log_softmax(
                    logits[row, pad + start : pad + length - 1].float(), dim=-1
                )
                top_values, top_ids = top_logprobs(window, seq.request.top_logprobs_num)
                seq.input_top = [None, *zip(top_values, top_ids)]
