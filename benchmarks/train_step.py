"""Training throughput: the Megatron actor vs plain transformers, same model, same batch.

    python -m benchmarks.train_step [--steps 7] [--min-seconds 5] [--shapes NAME ...] [--out FILE]

Both sides do the same work per step: forward over prompt+response, PPO-clip policy loss on
the response tokens (`opd_core.algorithm.losses.policy_loss`), backward, grad clipping and
an AdamW step, in fp32 on this machine's CPU (bf16 on CUDA for both), over the same
micro-batches (gradients accumulate). The "toy round" shape is one round of `make demo`: the
toy student, 64 prompts x 4 samples of 16 tokens in two micro-batches of 128, and the top-8
OPD term (`topk_reverse_kl` on the teacher's top-8 ids) added to the loss on both sides.
Also timed on the same actor: its separate old-logprob forward (what a round that is one
on-policy step no longer runs, `cfg.old_logprobs_forward`), and the step of a second actor with
megatron's unfused local attention (`train.attention_backend=local`, the actor before SDPA).
Tokens/s counts every token in the (unpadded) batch. The two are timed alternately and the
median step is reported, so load from other processes affects both alike; the load average
at start and end is recorded. Prints a table and writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

TOY_STUDENT = dict(  # ToyConfig.student: the model `make demo` trains
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=192,
)
MODELS = {  # name -> make_tiny_qwen3 overrides
    "toy-student (h48, 2L)": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
    ),
    "small (h256, 4L)": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=768,
    ),
    "medium (h512, 8L)": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
    ),
    "toy round (top-8 OPD)": TOY_STUDENT,
}
# name -> batch shape: samples, micro-batch, prompt / response lengths (uniform in [min, max]),
# teacher top-k (0 = none), samples per prompt (consecutive samples share their prompt)
DEFAULT_SHAPE = dict(
    batch=32, micro_batch=32, prompt_len=(24, 48), response_len=(16, 32), topk=0, per_prompt=1
)
SHAPES = {name: DEFAULT_SHAPE for name in MODELS} | {
    # The toy task's chat prompts are 78 tokens; responses stop at 16 (most reach it); a
    # round samples each of its 64 prompts 4 times.
    "toy round (top-8 OPD)": dict(
        batch=256, micro_batch=128, prompt_len=(78, 78), response_len=(12, 16), topk=8, per_prompt=4
    )
}


def make_batch(shape: dict, vocab: int, seed: int = 0):
    from opd_core.algorithm.batch import TrainBatch

    rng = np.random.default_rng(seed)

    def tokens(lengths: tuple[int, int]) -> list[int]:
        return list(map(int, rng.integers(3, vocab, rng.integers(lengths[0], lengths[1] + 1))))

    per_prompt = shape["per_prompt"]
    prompts = [
        prompt
        for prompt in (tokens(shape["prompt_len"]) for _ in range(shape["batch"] // per_prompt))
        for _ in range(per_prompt)
    ]
    responses = [tokens(shape["response_len"]) for _ in range(shape["batch"])]
    advantages = [rng.standard_normal(len(r)).astype(np.float32) for r in responses]
    batch = TrainBatch(prompts, responses, advantages=advantages)
    if shape["topk"]:
        k = shape["topk"]
        batch.teacher_topk_ids = [
            rng.choice(vocab, (len(r), k), replace=True).astype(np.int32) for r in responses
        ]
        # A plausible teacher: k sorted log-probs of a peaked distribution (sum < 1).
        batch.teacher_topk_logprobs = [
            np.log(np.sort(rng.dirichlet(np.full(4 * k, 0.3), len(r))[:, :k], -1)[:, ::-1])
            .astype(np.float32)
            .copy()
            for r in responses
        ]
    return batch


def run_config(shape: dict, attention_backend: str = "auto", share_prompts: str = "auto"):
    from opd_core.config import OPDRunConfig

    algorithm = {"use_opd": True, "opd_topk": shape["topk"]} if shape["topk"] else {}
    return OPDRunConfig.model_validate(
        {
            "train": {
                "global_batch_size": shape["batch"],
                "micro_batch_size": shape["micro_batch"],
                "attention_backend": attention_backend,
                "share_prompts": share_prompts,
            },
            "algorithm": algorithm,
        }
    )


def megatron_step(hf_dir, ckpt, cfg, batch):
    """(the actor's train step, its separate old-logprob forward): a round that is one
    on-policy step runs the first alone; one that needs stored old log-probs runs both."""
    from opd_core.megatron.parallel import free_port
    from opd_core.trainer.actor import ActorSpec, TrainActor

    actor = TrainActor()
    actor.setup(0, 1, "127.0.0.1", free_port(), ActorSpec.from_config(cfg, hf_dir, ckpt))
    batch.old_logprobs = actor.compute_logprobs(batch)
    return (lambda: actor.train_step(batch)), (lambda: actor.compute_logprobs(batch))


def transformers_step(hf_dir, cfg, batch):
    from transformers import AutoModelForCausalLM

    from opd_core.algorithm.losses import masked_mean, policy_loss, topk_reverse_kl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2)
    )
    size = cfg.train.micro_batch_size
    micro_batches = [
        _padded_tensors(batch.select(list(range(i, min(i + size, len(batch))))), device)
        for i in range(0, len(batch), size)
    ]
    total_tokens = sum(float(micro["mask"].sum()) for micro in micro_batches)

    def step() -> None:
        optimizer.zero_grad()
        for micro in micro_batches:
            logits = model(input_ids=micro["ids"], attention_mask=micro["attention"]).logits
            index = micro["gather_index"][..., None].expand(-1, -1, logits.shape[-1])
            # Only the response positions, as the actor does.
            full = torch.log_softmax(torch.gather(logits.float(), 1, index), -1)
            logprobs = full.gather(-1, micro["targets"][..., None])[..., 0]
            mask = micro["mask"]
            loss, _ = policy_loss(
                logprobs, logprobs.detach(), micro["advantages"], mask, cfg.algorithm
            )
            if "topk_ids" in micro:
                kl = topk_reverse_kl(full.gather(-1, micro["topk_ids"]), micro["topk_logprobs"])
                loss = loss + cfg.algorithm.opd_kl_coef * masked_mean(kl, mask)
            (loss * (float(mask.sum()) / total_tokens)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    return step


def _padded_tensors(batch, device) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask, and per response token: where its logits are,
    its target, mask, advantage (and the teacher's top-k ids and log-probs)."""
    sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], attention[i, : len(seq)] = torch.tensor(seq), 1
    width = max(map(len, batch.response_ids))
    out = {
        "gather_index": torch.zeros(len(sequences), width, dtype=torch.long),
        "mask": torch.zeros(len(sequences), width),
        "advantages": torch.zeros(len(sequences), width),
    }
    k = batch.teacher_topk_ids[0].shape[1] if batch.teacher_topk_ids else 0
    if k:
        out["topk_ids"] = torch.zeros(len(sequences), width, k, dtype=torch.long)
        out["topk_logprobs"] = torch.zeros(len(sequences), width, k)
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        out["gather_index"][i, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        out["mask"][i, : len(r)] = 1
        out["advantages"][i, : len(r)] = torch.tensor(batch.advantages[i])
        if k:
            out["topk_ids"][i, : len(r)] = torch.tensor(batch.teacher_topk_ids[i])
            out["topk_logprobs"][i, : len(r)] = torch.tensor(batch.teacher_topk_logprobs[i])
    out["targets"] = torch.gather(torch.roll(ids, -1, 1), 1, out["gather_index"])
    out |= {"ids": ids, "attention": attention}
    return {name: tensor.to(device) for name, tensor in out.items()}


def timed_interleaved(
    steps: dict, repeats: int, min_seconds: float = 0.0
) -> dict[str, dict[str, float]]:
    """Median wall and CPU (all threads of this process) seconds per call, alternating the
    contenders so machine load hits both alike: at least `repeats` calls each, and more until
    every contender ran `min_seconds` (a 20 ms step then gets hundreds of samples, so a burst
    of load elsewhere moves the median less). CPU seconds move less than wall seconds when
    other processes share the cores."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up

    def enough() -> bool:
        return all(
            len(values) >= repeats and sum(wall for wall, _ in values) >= min_seconds
            for values in times.values()
        )

    while not enough():
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    return {
        name: {
            "wall": float(np.median([wall for wall, _ in values])),
            "cpu": float(np.median([cpu for _, cpu in values])),
        }
        for name, values in times.items()
    }


def measure_shape(name: str, steps: int, min_seconds: float) -> dict:
    """Median step seconds of both contenders on the shape `name` (in a process of its own)."""
    from opd_core.hf_utils import make_tiny_qwen3
    from opd_core.megatron.convert import hf_to_torch_dist

    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_qwen3(Path(tmp) / "hf", **MODELS[name])
        ckpt = hf_to_torch_dist(hf_dir, Path(tmp) / "ckpt")
        cfg = run_config(shape)
        batch = make_batch(shape, vocab=300)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
        step, old_logprob_pass = megatron_step(hf_dir, ckpt, cfg, batch)
        # megatron's unfused local attention: the actor before its SDPA core attention.
        local_step, _ = megatron_step(hf_dir, ckpt, run_config(shape, "local"), batch)
        # One row per sample (the actor before its shared-prompt layout; what transformers runs).
        per_sample_step, _ = megatron_step(hf_dir, ckpt, run_config(shape, "auto", "off"), batch)
        seconds = timed_interleaved(
            {
                "megatron": step,
                "megatron_local_attention": local_step,
                "megatron_per_sample_layout": per_sample_step,
                "old_logprob_pass": old_logprob_pass,
                "transformers": transformers_step(hf_dir, cfg, batch),
            },
            steps,
            min_seconds,
        )
    megatron_s, hf_s = seconds["megatron"]["wall"], seconds["transformers"]["wall"]
    return {
        "model": name,
        "shape": shape,
        "tokens_per_step": tokens,
        "megatron_s_per_step": megatron_s,
        "transformers_s_per_step": hf_s,
        "megatron_cpu_s_per_step": seconds["megatron"]["cpu"],
        # The forward a round skips when it is one on-policy step (cfg.old_logprobs_forward).
        "old_logprob_pass_s": seconds["old_logprob_pass"]["wall"],
        "megatron_local_attention_s_per_step": seconds["megatron_local_attention"]["wall"],
        "megatron_per_sample_layout_s_per_step": seconds["megatron_per_sample_layout"]["wall"],
        "transformers_cpu_s_per_step": seconds["transformers"]["cpu"],
        "megatron_tokens_per_s": tokens / megatron_s,
        "transformers_tokens_per_s": tokens / hf_s,
        "speedup": hf_s / megatron_s,
        "speedup_cpu": seconds["transformers"]["cpu"] / seconds["megatron"]["cpu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="at least this many timed steps")
    parser.add_argument(
        "--min-seconds", type=float, default=5.0, help="and at least this long per contender"
    )
    parser.add_argument("--shapes", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()

    load_start = os.getloadavg()
    rows = []
    for name in args.shapes:
        # Each shape in a fresh process: the actors of earlier shapes (their models, Python
        # objects and heap) would otherwise slow the later ones.
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure_shape, name, args.steps, args.min_seconds).result()
        rows.append(row)
        print(
            f"{name}: megatron {row['megatron_s_per_step']:.4f} s, "
            f"transformers {row['transformers_s_per_step']:.4f} s",
            flush=True,
        )
    load_end = os.getloadavg()
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\ntraining step (fwd + bwd + AdamW), {device}, load average (1/5/15 min) "
        f"{_load(load_start)} at start, {_load(load_end)} at end"
    )
    print(
        f"{'shape':<24}{'batch':>12}{'tokens/step':>12}{'megatron tok/s':>16}"
        f"{'transformers tok/s':>20}{'megatron/hf':>13}{'by CPU s':>10}{'old-lp pass s':>15}"
        f"{'local-attn s':>14}{'per-sample s':>14}{'step s':>9}"
    )
    for row in rows:
        shape = row["shape"]
        print(
            f"{row['model']:<24}{shape['batch']:>6} x {shape['micro_batch']:<3}"
            f"{row['tokens_per_step']:>12}{row['megatron_tokens_per_s']:>16.0f}"
            f"{row['transformers_tokens_per_s']:>20.0f}{row['speedup']:>12.2f}x"
            f"{row['speedup_cpu']:>9.2f}x{row['old_logprob_pass_s']:>15.4f}"
            f"{row['megatron_local_attention_s_per_step']:>14.4f}"
            f"{row['megatron_per_sample_layout_s_per_step']:>14.4f}{row['megatron_s_per_step']:>9.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device,
        "args": vars(args),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


if __name__ == "__main__":
    main()
