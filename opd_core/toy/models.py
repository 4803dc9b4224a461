"""The built-in toy teacher and student: two real HF Qwen3 checkpoints trained on the toy task.

    models = build_toy_models(cfg.toy)        # ~1 minute on 2 CPU cores the first time
    models.teacher_dir, models.student_dir    # HF dirs (config, model.safetensors, tokenizer.json)
    models.teacher_pass_at_1, models.student_pass_at_1

The teacher is trained (AdamW, loss on the response tokens only) until its greedy pass@1 on
the eval split reaches `toy.teacher_min_pass_at_1`. The student is a smaller model of the
same family given a deliberately short SFT on the same data, so it starts weak but has the
capacity to learn the task: the gap on-policy distillation closes comes from training, not
from size. If the SFT budget would overshoot, it stops as soon as the student's pass@1 on a
held-out slice of train lands in `toy.student_pass_at_1_window`.

Everything is seeded from `toy.seed`; the result is cached under
`toy.cache_dir/<hash of the toy section>/` (built in a temp dir, then renamed), with the
measured numbers in `toy_models.json`. A second call returns the cache at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Qwen3ForCausalLM

from opd_core.config import ToyConfig, ToyModelSpec
from opd_core.evaluation import chat_prompt_ids
from opd_core.hf_utils import qwen3_config, save_hf_model
from opd_core.io import atomic_path, read_json, write_json
from opd_core.toy.task import make_toy_splits, target_response
from opd_core.toy.tokenizer import build_tokenizer
from opd_core.verifier import is_correct

__all__ = ["ToyModels", "build_toy_models", "greedy_pass_at_1", "toy_cache_dir"]

# Bump when the build procedure changes in a way the config hash cannot see.
BUILD_VERSION = 1
MANIFEST = "toy_models.json"


@dataclass(frozen=True)
class ToyModels:
    teacher_dir: Path
    student_dir: Path
    teacher_pass_at_1: float
    student_pass_at_1: float


def toy_cache_dir(cfg: ToyConfig) -> Path:
    """`cache_dir/<hash>`: the hash covers every toy field except where the cache lives."""
    payload = {"build_version": BUILD_VERSION, **cfg.model_dump(mode="json", exclude={"cache_dir"})}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / digest


def build_toy_models(cfg: ToyConfig, progress: bool = True) -> ToyModels:
    root = toy_cache_dir(cfg).resolve()  # absolute: callers may change directory later
    if (root / MANIFEST).is_file():
        return _load(root)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from intra-op threads, and on a shared CPU the
    # threads' spin-waits cost ~4x: one thread is much faster here.
    torch.set_num_threads(1)
    try:
        with atomic_path(root) as tmp:
            tmp.mkdir(parents=True)
            info = _build(cfg, tmp, progress)
            info["build_seconds"] = round(time.perf_counter() - started, 1)
            write_json(tmp / MANIFEST, info)
    finally:
        torch.set_num_threads(threads)
    return _load(root)


def _load(root: Path) -> ToyModels:
    info = read_json(root / MANIFEST)
    return ToyModels(
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        teacher_pass_at_1=info["teacher"]["pass_at_1"],
        student_pass_at_1=info["student"]["pass_at_1"],
    )


# ------------------------------------------------------------------------------ building


def _build(cfg: ToyConfig, out: Path, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.vocab_size)
    train, evaluation = make_toy_splits(cfg)
    train_prompts = chat_prompt_ids(tokenizer, train)
    train_responses = [
        _response_ids(tokenizer, label) for label in train.column("label").to_pylist()
    ]
    eval_prompts = chat_prompt_ids(tokenizer, evaluation)
    eval_labels = evaluation.column("label").to_pylist()
    max_new_tokens = max(len(r) for r in train_responses) + 2

    # Teacher: all of train, until pass@1 on the eval split is high enough.
    teacher = _new_model(tokenizer, cfg.teacher, seed=cfg.seed)
    teacher_steps = _train(
        teacher,
        cfg.teacher,
        list(zip(train_prompts, train_responses)),
        tokenizer,
        seed=cfg.seed,
        should_stop=lambda m: (
            greedy_pass_at_1(m, tokenizer, eval_prompts, eval_labels, max_new_tokens)
            >= cfg.teacher_min_pass_at_1
        ),
        desc="toy teacher",
        progress=progress,
    )
    teacher_pass = greedy_pass_at_1(teacher, tokenizer, eval_prompts, eval_labels, max_new_tokens)
    if teacher_pass < cfg.teacher_min_pass_at_1:
        raise RuntimeError(
            f"toy teacher reached pass@1 {teacher_pass:.2f} < toy.teacher_min_pass_at_1 "
            f"{cfg.teacher_min_pass_at_1} after {teacher_steps} steps; "
            "raise toy.teacher.train_steps"
        )

    # Student: a short SFT; the held-out tail of train decides an early stop, never eval.
    held_out = max(1, min(200, cfg.num_train // 10))
    sft_examples = list(zip(train_prompts[:-held_out], train_responses[:-held_out]))
    check_prompts = train_prompts[-held_out:]
    check_labels = train.column("label").to_pylist()[-held_out:]
    low, high = cfg.student_pass_at_1_window
    student = _new_model(tokenizer, cfg.student, seed=cfg.seed + 1)
    previous: dict[str, torch.Tensor] = {}
    reverted = []

    def student_in_window(model) -> bool:
        accuracy = greedy_pass_at_1(model, tokenizer, check_prompts, check_labels, max_new_tokens)
        if accuracy > high and previous:
            # Jumped over the window between two checks: go back to the last weights below it.
            model.load_state_dict(previous)
            reverted.append(cfg.student.check_every)
            return True
        previous.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return accuracy >= low

    student_steps = _train(
        student,
        cfg.student,
        sft_examples,
        tokenizer,
        seed=cfg.seed + 1,
        should_stop=student_in_window,
        desc="toy student",
        progress=progress,
    ) - sum(reverted)
    student_pass = greedy_pass_at_1(student, tokenizer, eval_prompts, eval_labels, max_new_tokens)

    save_hf_model(teacher, tokenizer, out / "teacher")
    save_hf_model(student, tokenizer, out / "student")
    return {
        "teacher": {
            "pass_at_1": teacher_pass,
            "steps": teacher_steps,
            "parameters": _num_params(teacher),
        },
        "student": {
            "pass_at_1": student_pass,
            "steps": student_steps,
            "parameters": _num_params(student),
        },
        "eval_prompts": len(eval_prompts),
        "config": cfg.model_dump(mode="json"),
    }


def _response_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    # The response ends with the end-of-turn token, which is the model's eos.
    return tokenizer(target_response(label), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def _new_model(
    tokenizer: PreTrainedTokenizerBase, spec: ToyModelSpec, seed: int
) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    shape = spec.model_dump(exclude={"train_steps", "batch_size", "lr", "check_every"})
    return Qwen3ForCausalLM(qwen3_config(tokenizer, **shape))


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding so only responses train."""
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(response)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts) - 1  # keep >= 1 prompt token in the per-row part
    for prompt in prompts:
        length = next((i for i in range(length) if prompt[i] != first[i]), length)
    return max(length, 0)


def _loss(examples, model, pad_id: int, shared: int) -> torch.Tensor:
    """Mean response-token cross-entropy of a batch.

    Every toy prompt starts with the same ~50 tokens (chat header + DAPO instruction): they
    are run once as a batch of one and their KV cache is repeated over the batch, which gives
    the same loss and gradients as the full forward at about half the compute.
    """
    batch = _collate(examples, pad_id)
    if shared == 0:
        return model(**batch).loss
    prefix = model(input_ids=batch["input_ids"][:1, :shared], use_cache=True).past_key_values
    prefix.batch_repeat_interleave(len(examples))
    return model(
        input_ids=batch["input_ids"][:, shared:],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"][:, shared:],
        past_key_values=prefix,
    ).loss


def _train(
    model,
    spec: ToyModelSpec,
    examples,
    tokenizer,
    seed: int,
    should_stop,
    desc: str,
    progress: bool,
) -> int:
    """AdamW with linear warmup and cosine decay over `spec.train_steps`; returns steps taken.

    Every `spec.check_every` steps `should_stop(model)` runs; True ends training there.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.train_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * step / max(1, spec.train_steps))).item())
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    shared = _common_prefix_length([prompt for prompt, _ in examples])
    bar = tqdm(range(spec.train_steps), desc=desc, disable=not progress, leave=False)
    step = 0
    for step in bar:
        model.train()
        picks = torch.randint(len(examples), (spec.batch_size,), generator=generator).tolist()
        loss = _loss([examples[i] for i in picks], model, tokenizer.pad_token_id, shared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % spec.check_every == 0 and should_stop(model):
            return step + 1
    return step + 1 if spec.train_steps else 0


# ----------------------------------------------------------------------------- checking


@torch.no_grad()
def greedy_pass_at_1(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    labels: list[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Greedy accuracy with the math verifier, via HF `generate` on left-padded batches."""
    model.eval()
    correct = 0
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(
            is_correct(text, label)
            for text, label in zip(texts, labels[start : start + batch_size])
        )
    model.train()
    return correct / len(prompt_ids)
