"""Small data files in the real layouts of the datasets this recipe uses, written by the tests.

    paths = write_fixtures(tmp_path)      # {"math500": .../math500.jsonl, "dapo_verl": ...}

The rows are made up; the layouts (file format, field names, nesting, label formats) are the
real ones, as listed in opd_core/datasets.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opd_core.datasets import DAPO_BOXED_TEMPLATE, DAPO_TEMPLATE

MATH500_ROWS = [
    ("What is $\\frac{28}{6}$ in lowest terms?", "\\frac{14}{3}", "Prealgebra", 2),
    (
        "Convert $(0,3)$ to polar coordinates.",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "Precalculus",
        2,
    ),
    ("Simplify $\\sqrt{18}$.", "3\\sqrt{2}", "Algebra", 1),
    ("Solve $x^2 - 5x + 6 \\le 0$.", "[2,3]", "Algebra", 4),
    ("What percent of 50 is 5?", "10\\%", "Prealgebra", 1),
    ("Which choice is prime? (A) 4 (B) 7 (C) 9", "\\text{(B)}", "Number Theory", 3),
]
AIME_ROWS = [
    ("Find the remainder when $2^{10}$ is divided by 1000.", "24"),
    ("What is $7 \\cdot 11 \\cdot 13$?", "1001"),
]
GSM8K_ROWS = [
    ("Tom has 3 apples and buys 4 more. How many does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 12 eggs. How many eggs are in 10 boxes?", "12 * 10 = <<12*10=120>>120\n#### 120"),
]
AOPS = "https://artofproblemsolving.com/wiki/index.php"
DAPO_PROBLEMS = [("What is 12 + 30?", "42"), ("What is 100 - 1?", "99"), ("What is 6 * 7?", "42")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def math500_rows() -> list[dict]:
    return [
        {
            "problem": problem,
            "solution": f"... so the answer is $\\boxed{{{answer}}}$.",
            "answer": answer,
            "subject": subject,
            "level": level,
            "unique_id": f"test/{subject.lower().replace(' ', '_')}/{i}.json",
        }
        for i, (problem, answer, subject, level) in enumerate(MATH500_ROWS)
    ]


def write_fixtures(root: Path) -> dict[str, Path]:
    """Every layout, one file each; returns {layout: path}."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"math500": write_jsonl(root / "math500.jsonl", math500_rows())}
    paths["aime2024"] = write_jsonl(
        root / "aime_2024.jsonl",
        [
            {
                "id": 60 + i,
                "problem": problem,
                "solution": "...",
                "answer": answer,
                "url": f"{AOPS}/2024_AIME_I_Problems/Problem_{i + 1}",
                "year": "2024",
            }
            for i, (problem, answer) in enumerate(AIME_ROWS)
        ],
    )
    gsm8k = [{"question": q, "answer": a} for q, a in GSM8K_ROWS]
    pq.write_table(pa.Table.from_pylist(gsm8k), root / "gsm8k.parquet")
    paths["gsm8k"] = root / "gsm8k.parquet"
    # slime's copy (zhuzilin/dapo-math-17k): messages with the instruction, a `label`.
    paths["dapo_slime"] = write_jsonl(
        root / "dapo-math-17k.jsonl",
        [
            {
                "prompt": [
                    {"content": DAPO_BOXED_TEMPLATE.replace("{problem}", p), "role": "user"}
                ],
                "label": label,
            }
            for p, label in DAPO_PROBLEMS
        ],
    )
    # BytedTsinghua-SIA/DAPO-Math-17k: the verl layout, parquet.
    verl = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": DAPO_TEMPLATE.replace("{problem}", p), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": label, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"id-{i}"},
        }
        for i, (p, label) in enumerate(DAPO_PROBLEMS)
    ]
    pq.write_table(pa.Table.from_pylist(verl), root / "dapo-math-17k.parquet")
    paths["dapo_verl"] = root / "dapo-math-17k.parquet"
    return paths
