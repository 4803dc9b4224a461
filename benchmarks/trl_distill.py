"""TRL's on-policy distillation of the toy student, run inside its own venv (.venv-trl).

    .venv-trl/bin/python benchmarks/trl_distill.py JOB.json

The peer side of `benchmarks/peer_trl.py`, which writes JOB.json and reads what this writes;
it imports only torch, transformers, datasets and trl (no opd_core: that lives in the main
venv). JOB.json gives the student and teacher HF dirs, the prompts of every step in order
(chat messages, `batch_size` per step), the lr of every step, the seed, the sampling and
AdamW settings and `out_dir`. Writes `out_dir/model/` (the trained student, an HF dir) and
`out_dir/result.json`: `train_seconds` (trainer.train()), `script_seconds` (this process
from its first line) and the logged per-step metrics.

TRL 1.16's `DistillationTrainer` with beta = 1 (the reverse KL over the full vocabulary),
every batch generated on-policy by the student with HF `generate` (n = 1 per dataset row:
each prompt appears `n_samples_per_prompt` times in its step), the teacher in-process, fp32
on the CPU, no gradient checkpointing, the dataset in the given order (no shuffling).
"""

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of the script's cost

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = job["steps"]  # one list of `batch_size` prompts (message lists) per step
    dataset = Dataset.from_list([{"prompt": messages} for step in steps for messages in step])

    tokenizer = AutoTokenizer.from_pretrained(job["student_dir"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(job["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(job["teacher_dir"], dtype=torch.float32)
    args = DistillationConfig(
        output_dir=str(out_dir / "trainer"),
        seed=job["seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        beta=1.0,  # reverse KL(student || teacher), full vocabulary
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=0,
        max_completion_length=job["max_new_tokens"],
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1,  # one generation and one optimizer step per batch
        max_steps=len(steps),
        shuffle_dataset=False,  # the steps' prompts, in the given order
        learning_rate=job["lr"],  # the peak; the schedule below scales it per step
        adam_beta1=job["adam_beta1"],
        adam_beta2=job["adam_beta2"],
        adam_epsilon=job["adam_epsilon"],
        weight_decay=job["weight_decay"],
        max_grad_norm=job["clip_grad"],
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    # The exact per-step lr of the project's schedule (computed by the driver), as factors.
    lrs = job["lrs"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lrs[min(step, len(lrs) - 1)] / args.learning_rate
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, schedule),
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.save_model(str(out_dir / "model"))
    tokenizer.save_pretrained(str(out_dir / "model"))
    result = {
        "train_seconds": train_seconds,
        "script_seconds": time.perf_counter() - STARTED,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"trl: {len(steps)} steps in {train_seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
