"""Training throughput: the Megatron actor vs plain transformers, same model, same batch.

    python -m benchmarks.train_step [--batch 32] [--prompt-len 24] [--response-len 16] [--steps 5]

Both sides do the same work per step: forward over prompt+response, PPO-clip policy loss on
the response tokens (`opd_core.algorithm.losses.policy_loss`), backward, grad clipping and
an AdamW step, in fp32 on this machine's CPU (bf16 on CUDA for both). Tokens/s counts every
token in the (unpadded) batch. Prints a table and writes benchmarks/results/train_step.json. The two are timed alternately
and the median step is reported, so load from other processes affects both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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
}


def make_batch(args, vocab: int, seed: int = 0):
    from opd_core.algorithm.batch import TrainBatch

    rng = np.random.default_rng(seed)
    prompts = [
        list(
            map(
                int, rng.integers(3, vocab, rng.integers(args.prompt_len // 2, args.prompt_len + 1))
            )
        )
        for _ in range(args.batch)
    ]
    responses = [
        list(
            map(
                int,
                rng.integers(3, vocab, rng.integers(args.response_len // 2, args.response_len + 1)),
            )
        )
        for _ in range(args.batch)
    ]
    advantages = [rng.standard_normal(len(r)).astype(np.float32) for r in responses]
    return TrainBatch(prompts, responses, advantages=advantages)


def megatron_step(hf_dir, ckpt, cfg, batch):
    from opd_core.megatron.parallel import free_port
    from opd_core.trainer.actor import ActorSpec, TrainActor

    actor = TrainActor()
    actor.setup(0, 1, "127.0.0.1", free_port(), ActorSpec.from_config(cfg, hf_dir, ckpt))
    batch.old_logprobs = actor.compute_logprobs(batch)
    return lambda: actor.train_step(batch)


def transformers_step(hf_dir, cfg, batch):
    from transformers import AutoModelForCausalLM

    from opd_core.algorithm.losses import policy_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2)
    )
    sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    length = max(map(len, sequences))
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], attention[i, : len(seq)] = torch.tensor(seq), 1
    width = max(map(len, batch.response_ids))
    gather_index = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    advantages = torch.zeros(len(sequences), width)
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        gather_index[i, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        mask[i, : len(r)], advantages[i, : len(r)] = 1, torch.tensor(batch.advantages[i])
    targets = torch.gather(torch.roll(ids, -1, 1), 1, gather_index)
    ids, attention, gather_index, targets = (
        ids.to(device),
        attention.to(device),
        gather_index.to(device),
        targets.to(device),
    )
    mask, advantages = mask.to(device), advantages.to(device)

    def step() -> None:
        optimizer.zero_grad()
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        picked = torch.gather(logits, 1, gather_index[..., None].expand(-1, -1, logits.shape[-1]))
        logprobs = torch.log_softmax(picked, -1).gather(-1, targets[..., None])[..., 0]
        loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, cfg.algorithm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    return step


def timed_interleaved(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, alternating the contenders so machine load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()

    from opd_core.config import OPDRunConfig
    from opd_core.hf_utils import make_tiny_qwen3
    from opd_core.megatron.convert import hf_to_torch_dist

    cfg = OPDRunConfig.model_validate(
        {"train": {"global_batch_size": args.batch, "micro_batch_size": args.batch}}
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            hf_dir = make_tiny_qwen3(Path(tmp) / f"hf{len(rows)}", **MODELS[name])
            ckpt = hf_to_torch_dist(hf_dir, Path(tmp) / f"ckpt{len(rows)}")
            batch = make_batch(args, vocab=300)
            tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
            seconds = timed_interleaved(
                {
                    "megatron": megatron_step(hf_dir, ckpt, cfg, batch),
                    "transformers": transformers_step(hf_dir, cfg, batch),
                },
                args.steps,
            )
            megatron_s, hf_s = seconds["megatron"], seconds["transformers"]
            rows.append(
                {
                    "model": name,
                    "tokens_per_step": tokens,
                    "megatron_s_per_step": megatron_s,
                    "transformers_s_per_step": hf_s,
                    "megatron_tokens_per_s": tokens / megatron_s,
                    "transformers_tokens_per_s": tokens / hf_s,
                    "speedup": hf_s / megatron_s,
                }
            )
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\ntraining step (fwd + bwd + AdamW), batch {args.batch}, prompt <= {args.prompt_len}, "
        f"response <= {args.response_len}, {device}"
    )
    print(
        f"{'model':<24}{'tokens/step':>12}{'megatron tok/s':>16}{'transformers tok/s':>20}{'megatron/hf':>13}"
    )
    for row in rows:
        print(
            f"{row['model']:<24}{row['tokens_per_step']:>12}{row['megatron_tokens_per_s']:>16.0f}"
            f"{row['transformers_tokens_per_s']:>20.0f}{row['speedup']:>12.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
