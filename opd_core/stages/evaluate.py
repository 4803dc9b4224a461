"""Stages `baseline_eval` and `final_eval`: the student on the eval split, before and after.

Inputs: the model's HF dir and the eval split (the final eval also the baseline's summary,
for its before/after report: `report.md`, `curves.png`). The work is
`opd_core.evaluation.evaluate` on the in-process engine (`opd_core.engine.generation`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from opd_core.engine.generation import Generator
from opd_core.evaluation import evaluate, write_eval
from opd_core.io import read_arrow, read_json
from opd_core.report import write_report
from opd_core.schemas import PROMPTS
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
        """pass@1 / pass@k of `model_dir` on the eval split -> `<stage>/`."""
        prompts = read_arrow(self.run_dir.eval_data, PROMPTS)
        generator = Generator(self.model_dir)
        # max_new_tokens capped per prompt to fit the context (SGLang's rule: no 400s).
        generate = partial(generator.generate_ids, context_length=generator.context_length)
        samples, summary = evaluate(
            generate, generator.tokenizer, prompts, self.cfg.eval, seed=self.cfg.seed
        )
        summary["model_dir"] = str(self.model_dir)
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
