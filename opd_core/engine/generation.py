"""Batched generation and scoring with an HF causal LM: the compute behind the built-in server.

    generator = Generator("path/to/hf_model")            # fp32 on CPU, bf16 on CUDA
    [out] = generator.generate([{"input_ids": [1, 2, 3], "return_logprob": True,
                                 "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}}])
    out["meta_info"]["input_token_logprobs"]             # [[None, 1, None], [-5.2, 2, None], ...]

`generate` runs all requests as ONE left-padded batch (attention mask + position ids): a
prefill forward over the prompts, then one forward per new token with a KV cache
(transformers `DynamicCache`). Requests are dicts (or `SingleRequest`s) in SGLang's shape;
responses are SGLang's response dicts (see `sequence.py`). `prepare` validates a request
without running it (token ids inside the vocabulary, prompt within the context), raising
`RequestError` with the field name, so a server can reject one bad request up front.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from opd_core.engine.protocol import SingleRequest, per_sequence_params, validation_message
from opd_core.engine.sampling import output_logprobs, sample_tokens, top_logprobs
from opd_core.engine.sequence import Sequence

# SGLang clamps log-probs to the dtype's lowest finite value: -inf is not valid JSON.
_LOGPROB_FLOOR = torch.finfo(torch.float32).min


class RequestError(ValueError):
    """A request the engine cannot run; the message names the field (an HTTP 400)."""


def weights_fingerprint(model_path: str | Path) -> str:
    """A cheap content fingerprint of a model dir's weight files.

    Hashes every weight file's name, size, and first and last MiB: it changes whenever the
    weights are retrained or re-exported, and costs milliseconds even for a 60 GB teacher.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_path).iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


class Generator:
    def __init__(
        self,
        model_path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        context_length: int | None = None,
    ):
        self.model_path = str(model_path)
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
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = self._load_model(self.model_path)
        config = self.model.config
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.context_length = int(
            context_length or getattr(config, "max_position_embeddings", 1 << 30)
        )
        self.eos_ids = frozenset(self._eos_ids())
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos_ids, default=0)
        )
        self.weight_version = "default"
        self.fingerprint = weights_fingerprint(self.model_path)
        # Without a per-request seed, rollouts are still reproducible when the server has one.
        self._seed_source = torch.Generator().manual_seed(seed) if seed is not None else None

    # ---------------------------------------------------------------------------- model

    def _load_model(self, model_path: str) -> torch.nn.Module:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        except (OSError, ValueError) as err:
            raise RequestError(
                f"model_path: cannot load an HF causal LM from {model_path}: {err}"
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

        The new checkpoint is loaded fully before anything is copied, so a bad path or a
        shape mismatch leaves the current weights untouched.
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
                f"model_path: {model_path} has different parameters (missing {missing}, extra {extra})"
            )
        for name, tensor in new_state.items():
            if tensor.shape != current[name].shape:
                raise RequestError(
                    f"model_path: {model_path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(current[name].shape)}"
                )
        self.model.load_state_dict(new_state)
        self.model_path = model_path
        self.fingerprint = weights_fingerprint(model_path)
        self.weight_version = weight_version or str(
            int(self.weight_version) + 1 if self.weight_version.isdigit() else 1
        )
        return f"Succeeded to update model weights from {model_path}."

    def model_info(self) -> dict[str, Any]:
        # SGLang's /get_model_info keys, plus what a client needs for caching and checks.
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "weights_fingerprint": self.fingerprint,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "eos_token_ids": sorted(self.eos_ids),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "backend": "builtin",
        }

    # ------------------------------------------------------------------------- requests

    def prepare(self, request: SingleRequest | dict[str, Any]) -> Sequence:
        """Validate one request and turn it into decoding state; RequestError if it is bad."""
        if not isinstance(request, SingleRequest):
            try:
                request = SingleRequest.model_validate(request)
            except ValidationError as err:
                raise RequestError(validation_message(err)) from None
        if request.input_ids is not None:
            prompt = list(request.input_ids)
            if prompt and (
                min(prompt) < 0 or max(prompt) >= self.vocab_size
            ):  # fast path: C-level min/max
                pos = next(p for p, t in enumerate(prompt) if not 0 <= t < self.vocab_size)
                raise RequestError(
                    f"input_ids[{pos}]: token id {prompt[pos]} is outside the vocabulary [0, {self.vocab_size})"
                )
        else:
            prompt = self.tokenizer.encode(request.text)
        field = "input_ids" if request.input_ids is not None else "text"
        if not prompt:
            raise RequestError(f"{field}: the prompt is empty (need at least one token)")
        if len(prompt) > self.context_length:
            raise RequestError(
                f"{field}: the prompt has {len(prompt)} tokens, longer than the model's context length {self.context_length}"
            )
        if request.return_logprob and request.logprob_start_len >= len(prompt):
            raise RequestError(
                f"logprob_start_len: {request.logprob_start_len} is not below the prompt length {len(prompt)}"
            )
        params = request.sampling_params
        for token in params.stop_token_ids or []:
            if not 0 <= token < self.vocab_size:
                raise RequestError(
                    f"sampling_params.stop_token_ids: {token} is outside the vocabulary [0, {self.vocab_size})"
                )
        seed = params.effective_seed
        if seed is None and self._seed_source is not None:
            seed = int(torch.randint(0, 2**62, (), generator=self._seed_source))
        return Sequence(
            request=request,
            prompt_ids=prompt,
            max_new_tokens=min(params.max_new_tokens, self.context_length - len(prompt)),
            eos_ids=self.eos_ids,
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            **({"rid": request.rid} if request.rid else {}),
        )

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
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """`EngineClient.generate`'s signature, in process (same call-wide seed rule)."""
        params = per_sequence_params(sampling_params, len(input_ids))
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

    def _run(self, seqs: list[Sequence], on_step) -> None:
        batch, longest = len(seqs), max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for i, seq in enumerate(seqs):  # left padding: every prompt ends at the last column
            input_ids[i, longest - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            attention_mask[i, longest - len(seq.prompt_ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention_mask, position_ids = (
            t.to(self.device) for t in (input_ids, attention_mask, position_ids)
        )

        decoding = any(s.max_new_tokens > 0 for s in seqs)
        wants_input = [s.request.return_logprob for s in seqs]
        cache = DynamicCache(config=self.model.config) if decoding else None
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=decoding,
            # Only the last position's logits are needed unless someone asked for prompt logprobs.
            logits_to_keep=0 if any(wants_input) else 1,
        )
        logits = out.logits
        if any(wants_input):
            self._input_logprobs(
                [s for s, w in zip(seqs, wants_input) if w],
                logits[wants_input],
                input_ids[wants_input],
            )
        for seq in seqs:
            if seq.max_new_tokens <= 0:
                seq.finish_without_decoding()
        next_logits = logits[:, -1]
        del out, logits

        while not all(s.finished for s in seqs):
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
        self, seqs: list[Sequence], logits: torch.Tensor, input_ids: torch.Tensor
    ) -> None:
        """Prompt log-probs at temperature 1 for positions logprob_start..end, first one None.

        One gather and one logsumexp for the whole (left-padded) batch: the logits in column
        c predict the token in column c+1, so log p(token c+1) = logit[c, token] - logsumexp(logit[c]).
        """
        targets = input_ids[:, 1:].unsqueeze(2)
        shifted = logits[:, :-1]
        token_logprobs = shifted.gather(2, targets).squeeze(2).float() - torch.logsumexp(
            shifted.float(), dim=-1
        )
        token_logprobs = token_logprobs.clamp(min=_LOGPROB_FLOOR).cpu()
        longest = input_ids.shape[1]
        for row, seq in enumerate(seqs):
            pad, start, length = (
                longest - len(seq.prompt_ids),
                seq.logprob_start,
                len(seq.prompt_ids),
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
