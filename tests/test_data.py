"""opd_core.data.load_prompts: the toy source, local dapo-math files in all variants, errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_core.config import ToyConfig
from opd_core.data import DataError, load_prompts
from opd_core.io import write_arrow
from opd_core.schemas import PROMPTS

INSTRUCTION = "Solve: What is 2 + 2?"
# dapo-math variants seen in the wild: message lists, plain strings, int labels, verl layout.
ROWS = [
    {"prompt": [{"role": "user", "content": INSTRUCTION}], "label": "4"},
    {"prompt": "What is 3 + 4?", "label": 7},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        "reward_model": {"ground_truth": "2", "style": "rule"},
    },
]
EXPECTED = [
    {"index": 0, "prompt": [{"role": "user", "content": INSTRUCTION}], "label": "4"},
    {"index": 1, "prompt": [{"role": "user", "content": "What is 3 + 4?"}], "label": "7"},
    {
        "index": 2,
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        "label": "2",
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toy_source_train_and_eval_splits():
    cfg = ToyConfig(num_train=50, num_eval=10)
    train = load_prompts("toy", "train", toy_cfg=cfg)
    evaluation = load_prompts("toy", "test", toy_cfg=cfg)
    assert train.schema.equals(PROMPTS) and train.num_rows == 50 and evaluation.num_rows == 10
    assert load_prompts("toy", "train", toy_cfg=cfg, limit=5).num_rows == 5
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_prompts("toy", "dev", toy_cfg=cfg)


def test_jsonl_with_mixed_variants(tmp_path):
    # Each variant in its own file: a json file's column types must be consistent.
    for i, row in enumerate(ROWS):
        table = load_prompts(str(write_jsonl(tmp_path / f"r{i}.jsonl", [row, row])), "train")
        assert table.schema.equals(PROMPTS)
        assert table.to_pylist()[0] == {**EXPECTED[i], "index": 0}
        assert table.column("index").to_pylist() == [0, 1]


def test_parquet_and_arrow_and_json(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "label": i} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_arrow(tmp_path / "d.arrow", pa.Table.from_pylist(rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.arrow", "d.json"):
        table = load_prompts(str(tmp_path / name), limit=4)
        assert table.num_rows == 4, name
        assert table.column("label").to_pylist() == ["0", "1", "2", "3"], name
        assert table.column("prompt").to_pylist()[3] == [{"role": "user", "content": "q3"}], name


def test_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    table = load_prompts(str(path), input_key="question", label_key="answer")
    assert table.to_pylist() == [
        {"index": 0, "prompt": [{"role": "user", "content": "What is 1 + 1?"}], "label": "2"}
    ]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "a", "label": "1"}, {"prompt": "b", "label": None}],
            r"row 1, missing label \(field 'label'",
        ),
        (
            [{"prompt": [{"role": "user"}], "label": "1"}],
            r"row 0, field 'prompt'\[0\] is not a \{role, content\} message",
        ),
        (
            [{"prompt": "ok", "label": "1"}, {"prompt": 5, "label": "1"}],
            r"row 1, field 'prompt' must be a list of \{role, content\}",
        ),
        (
            [{"question": "a", "label": "1"}],
            r"no prompt field 'prompt'; fields are \['question', 'label'\]",
        ),
        (
            [{"prompt": "a", "answer": "1"}],
            r"no label field 'label' and no reward_model.ground_truth",
        ),
        ([{"prompt": "a", "label": ""}], r"row 0, field 'label' is empty"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        load_prompts(str(path))
    assert str(path) in str(info.value)


def test_empty_unknown_and_unsupported_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        load_prompts(str(empty))
    with pytest.raises(DataError, match="not 'toy', not 'hf:<dataset id>', and no such file"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("prompt,label\na,1\n")
    with pytest.raises(DataError, match="unsupported format"):
        load_prompts(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="expected hf:<dataset id>"):
        load_prompts("hf:")
