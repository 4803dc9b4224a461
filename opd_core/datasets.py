"""Named dataset presets and prompt templates: how a known dataset's rows become prompts.

    data:
      train: {preset: zhuzilin/dapo-math-17k}              # source, keys and template filled in
    eval:
      benchmarks:
        - {preset: HuggingFaceH4/MATH-500}                 # problem/answer, DAPO instruction
        - {preset: HuggingFaceH4/aime_2024, source: data/aime24.jsonl}   # a local copy

A preset is named by the hub id of the dataset it describes. It only fills the fields a config
leaves out (an explicit field always wins), and it is resolved when the config is validated,
so the run's `config.yaml` shows every resolved key: nothing a preset does is hidden.

The field names were read from each dataset's card, and slime's docs for its copy:

- zhuzilin/dapo-math-17k (slime's copy, jsonl): `prompt` = [{role, content}] with the
  instruction in it, `label`.
- BytedTsinghua-SIA/DAPO-Math-17k (parquet, the verl layout): `prompt` = messages with the
  instruction in it, `reward_model.ground_truth`.
- HuggingFaceH4/MATH-500 (500 rows, split `test`): `problem` (bare), `answer` (LaTeX),
  `subject`, `level`.
- HuggingFaceH4/aime_2024 (30 rows, split `train`): `problem` (bare), `answer` (a string).
- openai/gsm8k (subset `main`, splits `train`/`test`): `question` (bare), `answer` (a
  solution whose last line is `#### <answer>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DAPO_BOXED_TEMPLATE",
    "DAPO_TEMPLATE",
    "LABEL_FORMATS",
    "PRESETS",
    "TEMPLATES",
    "Preset",
    "apply_template",
    "template_text",
]

# The instruction of the DAPO paper's dataset (BytedTsinghua-SIA/DAPO-Math-17k), verbatim: the
# bare problem goes where {problem} is. The answer format the verifier reads is this one.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    '\n\n{problem}\n\nRemember to put your answer on its own line after "Answer:".'
)
# slime's copy (zhuzilin/dapo-math-17k) asks for the answer boxed on that line.
DAPO_BOXED_TEMPLATE = DAPO_TEMPLATE.replace(
    "Answer: $Answer (without quotes) where", "Answer: \\boxed{$Answer} where"
)
# `none`: the prompt field is used as it is (already instructed, as in both DAPO copies).
TEMPLATES: dict[str, str | None] = {
    "none": None,
    "dapo": DAPO_TEMPLATE,
    "dapo_boxed": DAPO_BOXED_TEMPLATE,
}
PROBLEM = "{problem}"
# How the label field's text becomes the label: as it is, or GSM8K's solution text whose
# final answer follows `#### `.
LABEL_FORMATS = ("plain", "gsm8k")


@dataclass(frozen=True)
class Preset:
    """The fields of one known dataset (see DatasetSpec in opd_core/config.py for each)."""

    name: str  # the short benchmark name used in reports
    split: str
    input_key: str
    label_key: str
    template: str = "none"
    label_format: str = "plain"
    subset: str | None = None
    group_keys: tuple[str, ...] = ()  # fields to break eval results down by

    def fields(self, preset_id: str) -> dict[str, Any]:
        """The config fields this preset fills (source = the hub id it is named after)."""
        return {
            "source": f"hf:{preset_id}",
            "split": self.split,
            "subset": self.subset,
            "input_key": self.input_key,
            "label_key": self.label_key,
            "label_format": self.label_format,
            "template": self.template,
            "group_keys": list(self.group_keys),
        }


PRESETS: dict[str, Preset] = {
    "zhuzilin/dapo-math-17k": Preset("dapo-math-17k", "train", "prompt", "label"),
    "BytedTsinghua-SIA/DAPO-Math-17k": Preset(
        "dapo-math-17k", "train", "prompt", "reward_model.ground_truth"
    ),
    "HuggingFaceH4/MATH-500": Preset(
        "math500", "test", "problem", "answer", template="dapo", group_keys=("subject", "level")
    ),
    "HuggingFaceH4/aime_2024": Preset("aime2024", "train", "problem", "answer", template="dapo"),
    "openai/gsm8k": Preset(
        "gsm8k", "test", "question", "answer", template="dapo", label_format="gsm8k", subset="main"
    ),
}


def template_text(template: str) -> str | None:
    """The text of a template: a named one (`none`, `dapo`, `dapo_boxed`) or the user's own,
    which must contain `{problem}`. None = use the prompt as it is."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if PROBLEM not in template:
        raise ValueError(
            f"template {template[:60]!r} is neither a named template ({', '.join(TEMPLATES)}) "
            f"nor a text with {PROBLEM} in it"
        )
    return template


def apply_template(template: str, problem: str) -> str:
    """`problem` wrapped in `template`. Plain substitution, not str.format: LaTeX braces in a
    user template (`\\boxed{}`) stay as written."""
    text = template_text(template)
    return problem if text is None else text.replace(PROBLEM, problem)
