"""OPD vs RL vs off-policy distillation on the toy task, at equal cost.

    python -m benchmarks.opd_vs_baselines [--rounds 8] [--seeds 0] [--eval-prompts 200]

Same toy teacher and student, same prompts per round, same number of student samples and
optimizer steps, same seed:

  opd          pure on-policy distillation as the toy config runs it: top-8 OPD, dense reverse
               KL over the teacher's top-8 tokens on the student's own samples, no task reward
  opd_sampled  pure OPD as slime's example runs it: the sampled token's reverse KL as the
               advantage penalty
  grpo         GRPO with the task reward only (math verifier), no teacher
  grpo+opd     GRPO with the task reward plus top-8 OPD
  offpolicy    off-policy distillation: SFT on teacher-sampled answers to the same prompts,
               as many teacher samples as OPD scores student samples
  opd_kl0.5    top-8 OPD with opd_kl_coef 0.5
  opd_kl2.0    top-8 OPD with opd_kl_coef 2.0

Every method keeps the config's lr schedule, batch and rounds (one optimizer step a round).
Greedy pass@1 on the eval split every `--eval-every` rounds (and after the last). Prints a
table, writes `benchmarks/results/opd_vs_baselines.json` and
`benchmarks/results/opd_vs_baselines.png`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from opd_core.config import EvalConfig, OPDRunConfig, load_config
from opd_core.download import run_download
from opd_core.engine.client import EngineClient
from opd_core.engine.generation import Generator
from opd_core.engine.launcher import launch_server
from opd_core.evaluation import chat_prompt_ids, evaluate
from opd_core.io import read_arrow, write_json
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS
from opd_core.stages import Convert, Train
from opd_core.trainer.group import TrainerGroup
from opd_core.trainer.rollouts import generate_rollouts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Every method names its OPD mode explicitly, so the table does not depend on the config's.
TOPK = ["algorithm.use_opd=true", "algorithm.opd_topk=8"]
METHODS: dict[str, list[str]] = {
    "opd": ["reward.type=none", *TOPK],
    "opd_sampled": ["reward.type=none", "algorithm.use_opd=true", "algorithm.opd_topk=0"],
    "grpo": [
        "reward.type=math",
        "algorithm.use_opd=false",
        "algorithm.opd_type=null",
        "algorithm.opd_topk=0",
    ],
    "grpo+opd": ["reward.type=math", *TOPK],
    "offpolicy": ["algorithm.opd_topk=0"],  # its own loop below
    "opd_kl0.5": ["reward.type=none", *TOPK, "algorithm.opd_kl_coef=0.5"],
    "opd_kl2.0": ["reward.type=none", *TOPK, "algorithm.opd_kl_coef=2.0"],
}


def prepare_base(cfg: OPDRunConfig, root: Path) -> RunDir:
    """download + convert once; every method's run directory links to them."""
    base = RunDir.create(root, "base")
    if not base.eval_data.is_file():
        run_download(cfg, base)
    if not (base.student_torch_dist / "latest_checkpointed_iteration.txt").is_file():
        Convert(cfg, base).build()
    return base


def method_run_dir(base: RunDir, root: Path, name: str) -> RunDir:
    run = RunDir(root / name)
    shutil.rmtree(run.root / "train", ignore_errors=True)  # always a fresh training run
    run.root.mkdir(parents=True, exist_ok=True)
    for stage in ("download", "convert"):
        link = run.root / stage
        if not link.exists():
            link.symlink_to(base.root / stage)
    return run


def offpolicy_distillation(cfg: OPDRunConfig, run: RunDir, teacher: EngineClient) -> list[Path]:
    """SFT on teacher samples, through the same Megatron actors and optimizer as OPD.

    With advantages = 1 and old log-probs = the current ones, the PPO-clip surrogate's gradient
    is exactly the token-mean negative log-likelihood gradient, i.e. SFT.
    """
    prompts = read_arrow(run.train_data, PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(run.student_hf)
    prompt_ids = chat_prompt_ids(tokenizer, prompts, cfg.data.chat_template_kwargs)
    exports = []
    with TrainerGroup(
        cfg, hf_config_dir=run.student_hf, ckpt_dir=run.student_torch_dist
    ) as trainer:
        for round_index in range(cfg.rollout.num_rollout):
            samples = generate_rollouts(cfg, round_index, prompts, prompt_ids, teacher, tokenizer)
            batch = samples.batch()
            batch.old_logprobs = trainer.compute_logprobs(batch)
            batch.advantages = [np.ones(len(r), dtype=np.float32) for r in batch.response_ids]
            trainer.train_step(batch)
            exports.append(Path(trainer.export_hf(run.hf_export(round_index))))
    return exports


def pass_at_1(model_dir: Path, prompts, num_prompts: int, seed: int) -> float:
    generator = Generator(model_dir)
    _, summary = evaluate(
        generator.generate_ids,
        generator.tokenizer,
        prompts,
        EvalConfig(num_prompts=num_prompts, n_samples=1),
        seed=seed,
    )
    return summary["pass_at_1"]


def run_method(name: str, cfg: OPDRunConfig, base: RunDir, root: Path, teacher_url: str) -> dict:
    run = method_run_dir(base, root / f"seed{cfg.seed}", name)
    started = time.perf_counter()
    if name == "offpolicy":
        with EngineClient.from_config(teacher_url, cfg.client) as teacher:
            exports = offpolicy_distillation(cfg, run, teacher)
    else:
        Train(cfg, run).build(teacher=[teacher_url] if cfg.algorithm.use_opd else None)
        exports = [run.hf_export(r) for r in range(cfg.rollout.num_rollout)]
    seconds = time.perf_counter() - started
    return {"exports": exports, "seconds": seconds}


def plot(results: dict, out_png: Path) -> None:
    fig = Figure(figsize=(7, 4.5))  # a bare Figure, not pyplot: no GUI backend to select
    ax = fig.subplots()
    for name, method in results["methods"].items():
        ax.plot(
            [0, *method["rounds"]],
            [results["baseline_pass_at_1"], *method["pass_at_1_by_round"]],
            marker="o",
            label=name,
        )
    ax.set_xlabel("rounds of training (0 = before)")
    ax.set_ylabel("greedy pass@1 (eval)")
    ax.set_title("toy task: OPD vs baselines at equal samples and steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per method (default: the config's)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument(
        "--eval-every", type=int, default=10, help="evaluate every N rounds' export"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "bench-opd-vs-baselines"))
    args = parser.parse_args()

    root = Path(args.out)
    rounds = [f"rollout.num_rollout={args.rounds}"] if args.rounds else []
    base_cfg = load_config(args.config, rounds)
    base = prepare_base(base_cfg, root)
    eval_prompts = read_arrow(base.eval_data, PROMPTS)
    results: dict = {
        "baseline_pass_at_1": pass_at_1(base.student_hf, eval_prompts, args.eval_prompts, 0),
        "methods": {},
    }
    per_seed: dict[str, list[dict]] = {m: [] for m in args.methods}
    with launch_server(
        "builtin",
        base.teacher_hf,
        base_cfg.teacher.model_copy(update={"port": 0, "tp": 1}),
        root / "teacher.log",
    ) as teacher:
        for seed in args.seeds:
            for name in args.methods:
                cfg = load_config(args.config, [*rounds, f"seed={seed}", *METHODS[name]])
                out = run_method(name, cfg, base, root, teacher.url)
                evaluated = [
                    r
                    for r in range(len(out["exports"]))
                    if (r + 1) % args.eval_every == 0 or r == len(out["exports"]) - 1
                ]
                curve = [
                    pass_at_1(out["exports"][r], eval_prompts, args.eval_prompts, seed)
                    for r in evaluated
                ]
                per_seed[name].append(
                    {
                        "pass_at_1_by_round": curve,
                        "rounds": [r + 1 for r in evaluated],
                        "seconds": out["seconds"],
                    }
                )
                Console().print(
                    f"[bold]{name}[/] seed {seed}: pass@1 by round "
                    f"{[f'{p:.3f}' for p in curve]} ({out['seconds']:.0f} s)"
                )
    for name, runs in per_seed.items():
        results["methods"][name] = {
            "pass_at_1_by_round": np.mean([r["pass_at_1_by_round"] for r in runs], axis=0)
            .round(4)
            .tolist(),
            "rounds": runs[0]["rounds"],  # rounds completed at each pass@1 point
            "seconds": round(float(np.mean([r["seconds"] for r in runs])), 1),
            "seeds": args.seeds,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "opd_vs_baselines.json", results)
    plot(results, RESULTS / "opd_vs_baselines.png")

    table = Table(
        title=f"toy task, {len(args.seeds)} seed(s), greedy pass@1 on {args.eval_prompts} "
        "eval prompts"
    )
    for column in ("method", "final pass@1", "gain over baseline", "train seconds"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row(
        "baseline (student before training)", f"{results['baseline_pass_at_1']:.3f}", "", ""
    )
    for name, method in results["methods"].items():
        final = method["pass_at_1_by_round"][-1]
        table.add_row(
            name,
            f"{final:.3f}",
            f"{final - results['baseline_pass_at_1']:+.3f}",
            f"{method['seconds']:.0f}",
        )
    Console().print(table)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
