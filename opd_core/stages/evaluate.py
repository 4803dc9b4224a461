"""Stages `baseline_eval` and `final_eval`: the student on the eval split, before and after.

Inputs: the model's HF dir and the eval split (the final eval also the baseline's summary,
for its before/after report: `report.md`, `curves.png`). The work is
`opd_core.evaluation.evaluate_benchmarks` on the in-process engine (`opd_core.engine.generation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd_core.engine.generation import Generator
from opd_core.evaluation import evaluate_benchmarks, write_eval
from opd_core.io import read_arrow, read_json
from opd_core.report import write_report
from opd_core.schemas import EVAL_PROMPTS
from opd_core.stages.base import CachedStage


class BaselineEval(CachedStage):
    name = "baseline_eval"
    sections = ("eval", "seed")

    @property
    def model_dir(self) -> Path:
        return self.run_dir.student_hf

    def inputs(self) -> list[Path]:
        return [self.model_dir, self.run_dir.eval_data]

    def build(self) -> dict[str, Any]:
        """Every eval benchmark on `model_dir` -> `<stage>/` (a summary per benchmark under
        `benchmarks`, the first one's numbers at the top level)."""
        prompts = read_arrow(self.run_dir.eval_data, EVAL_PROMPTS)
        generator = Generator(self.model_dir)
        samples, summary = evaluate_benchmarks(
            generator.generate_ids,
            generator.tokenizer,
            prompts,
            self.cfg.eval,
            seed=self.cfg.seed,
            context_length=generator.context_length,
            chat_template_kwargs=self.cfg.data.chat_template_kwargs,
        )
        summary["model_dir"] = self.run_dir.relative(self.model_dir)
        write_eval(self.out_dir, samples, summary)
        return summary


class FinalEval(BaselineEval):
    name = "final_eval"

    @property
    def model_dir(self) -> Path:
        return self.run_dir.final_student_hf

    def inputs(self) -> list[Path]:
        return [*super().inputs(), self.run_dir.eval_summary("baseline_eval")]

    def build(self) -> dict[str, Any]:
        summary = super().build()
        baseline = read_json(self.run_dir.eval_summary("baseline_eval"))
        write_report(self.cfg, self.run_dir, baseline, summary)
        return summary
