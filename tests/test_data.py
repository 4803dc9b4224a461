"""opd_core.data.load_prompts: the toy source, every real dataset layout through its preset,
templates, and errors that name the file, the row (1-based) and the field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    AIME_ROWS,
    DAPO_PROBLEMS,
    GSM8K_ROWS,
    MATH500_ROWS,
    write_fixtures,
    write_jsonl,
)

from opd_core.config import ConfigError, DatasetSpec, ToyConfig, validate_config
from opd_core.data import LOADED_PROMPTS, DataError, load_prompts
from opd_core.datasets import DAPO_TEMPLATE
from opd_core.io import write_arrow

INSTRUCTION = "Solve: What is 2 + 2?"


def test_toy_source_train_and_eval_splits():
    cfg = ToyConfig(num_train=50, num_eval=10)
    train = load_prompts("toy", cfg, split="train")
    evaluation = load_prompts("toy", cfg, split="test")
    assert train.schema.equals(LOADED_PROMPTS) and train.num_rows == 50
    assert evaluation.num_rows == 10
    # The toy's ids run on across both splits: every problem has one id.
    assert evaluation.column("index").to_pylist() == list(range(50, 60))
    assert load_prompts("toy", cfg, split="train", limit=5).num_rows == 5
    assert load_prompts("toy", cfg, split="train", offset=48).column("index").to_pylist() == [
        48,
        49,
    ]
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_prompts("toy", cfg, split="dev")


def test_every_preset_layout_loads_templated(tmp_path):
    paths = write_fixtures(tmp_path)
    math = load_prompts(str(paths["math500"]), preset="HuggingFaceH4/MATH-500")
    assert math.column("label").to_pylist() == [answer for _, answer, _, _ in MATH500_ROWS]
    content = math.column("prompt").to_pylist()[0][0]["content"]
    assert content == DAPO_TEMPLATE.replace("{problem}", MATH500_ROWS[0][0])
    assert dict(math.column("tags").to_pylist()[0]) == {"subject": "Prealgebra", "level": "2"}
    assert math.column("location").to_pylist()[:2] == ["line 1", "line 2"]

    aime = load_prompts(str(paths["aime2024"]), preset="HuggingFaceH4/aime_2024")
    assert aime.column("label").to_pylist() == [a for _, a in AIME_ROWS]
    assert aime.column("prompt").to_pylist()[1][0]["content"].startswith("Solve the following")

    gsm8k = load_prompts(str(paths["gsm8k"]), preset="openai/gsm8k")
    assert gsm8k.column("label").to_pylist() == ["7", "120"]  # what follows '#### '
    assert GSM8K_ROWS[0][0] in gsm8k.column("prompt").to_pylist()[0][0]["content"]
    assert gsm8k.column("location").to_pylist() == ["row 1 (index 0)", "row 2 (index 1)"]

    # Both DAPO layouts: the prompt already carries the instruction (no template on top).
    slime = load_prompts(str(paths["dapo_slime"]), preset="zhuzilin/dapo-math-17k")
    verl = load_prompts(str(paths["dapo_verl"]), preset="BytedTsinghua-SIA/DAPO-Math-17k")
    for table in (slime, verl):
        assert table.column("label").to_pylist() == [label for _, label in DAPO_PROBLEMS]
        assert table.column("prompt").to_pylist()[0][0]["content"].count("Solve the following") == 1


def test_a_preset_is_resolved_into_explicit_fields_and_explicit_fields_win():
    spec = DatasetSpec.model_validate({"preset": "HuggingFaceH4/MATH-500"})
    assert (spec.source, spec.split, spec.input_key, spec.label_key, spec.template) == (
        "hf:HuggingFaceH4/MATH-500",
        "test",
        "problem",
        "answer",
        "dapo",
    )
    assert spec.group_keys == ["subject", "level"]
    own = DatasetSpec.model_validate(
        {"preset": "HuggingFaceH4/MATH-500", "source": "m.jsonl", "template": "none"}
    )
    assert (own.source, own.template, own.input_key) == ("m.jsonl", "none", "problem")
    # The run's config.yaml (the validated tree) shows the resolved keys, not just the name.
    cfg = validate_config({"eval": {"benchmarks": [{"preset": "openai/gsm8k"}]}})
    dumped = cfg.model_dump(mode="json")["eval"]["benchmarks"][0]
    assert dumped["subset"] == "main" and dumped["label_format"] == "gsm8k"
    assert dumped["name"] == "gsm8k" and dumped["input_key"] == "question"
    with pytest.raises(ConfigError, match="unknown preset 'nope/x'"):
        validate_config({"data": {"train": {"preset": "nope/x"}}})
    with pytest.raises(ConfigError, match="neither a named template"):
        validate_config({"data": {"train": {"template": "Solve this: {question}"}}})


def test_user_template_and_dotted_label_key(tmp_path):
    path = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"q": "What is 1 + 1?", "meta": {"answer": 2}},
            {"q": "Is \\{x\\} a set?", "meta": {"answer": "yes"}},
        ],
    )
    table = load_prompts(
        str(path),
        input_key="q",
        label_key="meta.answer",
        template="Q: {problem}\nEnd with \\boxed{}.",
    )
    assert table.column("prompt").to_pylist()[0] == [
        {"role": "user", "content": "Q: What is 1 + 1?\nEnd with \\boxed{}."}
    ]
    assert table.column("label").to_pylist() == ["2", "yes"]
    # A template applies to the last user message of a message list.
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "1+1?"},
                ],
                "label": 2,
            }
        ],
    )
    messages = load_prompts(str(path), template="dapo").column("prompt").to_pylist()[0]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == DAPO_TEMPLATE.replace("{problem}", "1+1?")


def test_parquet_arrow_file_arrow_stream_and_json(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "label": i} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_arrow(tmp_path / "d.arrow", pa.Table.from_pylist(rows))
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)  # HF datasets' cache files are IPC streams
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.arrow", "s.arrow", "d.json"):
        loaded = load_prompts(str(tmp_path / name), limit=4)
        assert loaded.column("label").to_pylist() == ["0", "1", "2", "3"], name
        assert loaded.column("prompt").to_pylist()[3] == [{"role": "user", "content": "q3"}], name


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "a", "label": "1"}, {"prompt": "b", "label": None}],
            r"line 2: field 'label' is null",
        ),
        (
            [{"prompt": [{"role": "user"}], "label": "1"}],
            r"line 1: field 'prompt'\[0\] is not a \{role, content\} message",
        ),
        (
            [{"prompt": "ok", "label": "1"}, {"prompt": 5, "label": "1"}],
            r"line 2: field 'prompt' must be a list of \{role, content\}",
        ),
        (
            [{"question": "a", "label": "1"}],
            r"line 1: no prompt field 'prompt'; fields are \['label', 'question'\]",
        ),
        (
            [{"prompt": "a", "reward_model": {"ground_truth": "1"}}],
            r"no label field 'label'.*set label_key: reward_model.ground_truth",
        ),
        ([{"prompt": "a", "label": ""}], r"line 1: field 'label' is empty"),
        ([{"prompt": "a", "label": True}], r"line 1: field 'label' must be a string or a number"),
        ([{"prompt": "a", "label": "\\frac{1}{"}], r"line 1: field 'label' has unbalanced braces"),
        (
            [{"prompt": [{"role": "user", "content": "  "}], "label": "1"}],
            r"line 1: field 'prompt'\[0\] has an empty content",
        ),
        ([{"prompt": "   ", "label": "1"}], r"line 1: field 'prompt' is an empty string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        load_prompts(str(path))
    assert str(path) in str(info.value)


def test_line_numbers_count_blank_lines_and_name_a_truncated_line(tmp_path):
    good = json.dumps({"prompt": "What is 1 + 1?", "label": "2"})
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n\n{good}\n" + json.dumps({"prompt": "x", "label": ""}) + "\n")
    with pytest.raises(DataError, match=f"{path}: line 4: field 'label' is empty"):
        load_prompts(str(path))
    path.write_text(f"{good}\n{good}\n" + good[:25])  # the writer was killed mid-line
    with pytest.raises(DataError, match=rf"{path}: line 3: not valid JSON .*truncated line"):
        load_prompts(str(path))
    # A broken line after the rows a limit takes is never read.
    assert load_prompts(str(path), limit=2).num_rows == 2


def test_parquet_and_gsm8k_errors_give_1_based_rows(tmp_path):
    rows = [{"question": "q", "answer": "#### 3"}, {"question": "q2", "answer": "no final answer"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    with pytest.raises(
        DataError, match=r"g.parquet: row 2 \(index 1\): field 'answer' has no '#### <answer>'"
    ):
        load_prompts(str(tmp_path / "g.parquet"), preset="openai/gsm8k")
    with pytest.raises(DataError, match=r"row 1 \(index 0\): no group field 'subject'"):
        load_prompts(
            str(tmp_path / "g.parquet"),
            input_key="question",
            label_key="answer",
            group_keys=["subject"],
        )


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
    only_blank = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "label": 1}])
    with pytest.raises(DataError, match=r"no rows \(offset 5"):
        load_prompts(str(only_blank), offset=5)
