"""Load prompts from any supported source into a table of chat prompts and labels.

    load_prompts(cfg.data.train, toy_cfg=cfg.toy)                      # a DatasetSpec
    load_prompts("hf:HuggingFaceH4/MATH-500", preset="HuggingFaceH4/MATH-500", limit=50)
    load_prompts("data/math.jsonl", input_key="question", label_key="answer", template="dapo")

Sources: `toy` (the built-in task), `hf:<dataset id>` (through `datasets`, at `subset` /
`split`), or a local .jsonl, .json (an array of rows), .parquet or .arrow file (one split).
A row's prompt is a string (wrapped as one user message) or a list of {role, content}
messages; `template` wraps a bare problem (or the last user message) in an instruction. Its
label is a string or a number at `label_key` (dotted for nested fields), or GSM8K's `#### N`.

Every bad row raises `DataError` naming the file, where the row is and the field: `line 7`
in a jsonl file (1-based, as an editor shows it, blank lines counted), `row 8 (index 7)` in
the other formats (1-based, with the 0-based index a dataframe or the hub viewer shows). The
returned table carries each row's place in `location`, for later checks (prompt lengths) to
name it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from opd_core.config import DatasetSpec, ToyConfig
from opd_core.datasets import apply_template
from opd_core.errors import NotRetryable
from opd_core.schemas import MESSAGE
from opd_core.toy.task import make_toy_splits

__all__ = ["LOADED_PROMPTS", "DataError", "describe_source", "load_prompts"]

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".arrow")
TOY_SPLITS = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval"}

# What load_prompts returns: PROMPTS' columns, the group fields of an eval set (`tags`, e.g.
# {"subject": "Algebra", "level": "3"}) and where each row is in its source (`location`).
LOADED_PROMPTS = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),  # 0-based row number in the source
        pa.field("prompt", pa.list_(MESSAGE), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("tags", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("location", pa.string(), nullable=False),  # "line 7", "row 8 (index 7)"
    ]
)


class DataError(NotRetryable, ValueError):
    """A data source is unusable; the message names the source, the row and the field."""


def describe_source(spec: DatasetSpec) -> str:
    """How errors name a source: the file, or the hub id with its subset and split."""
    if spec.source.startswith("hf:"):
        subset = f"{spec.subset}, " if spec.subset else ""
        return f"{spec.source} ({subset}split {spec.split!r})"
    return spec.source


def load_prompts(
    spec: DatasetSpec | str, toy_cfg: ToyConfig | None = None, **fields: Any
) -> pa.Table:
    """The rows `spec` selects (offset, limit) as a LOADED_PROMPTS table.

    `spec` is a DatasetSpec, or a source string with DatasetSpec fields as keywords.
    """
    if isinstance(spec, str):
        spec = DatasetSpec.model_validate({"source": spec, **fields})
    where = describe_source(spec)
    rows = islice(
        _rows(spec, toy_cfg), spec.offset, None if spec.limit is None else spec.offset + spec.limit
    )
    out: dict[str, list] = {name: [] for name in LOADED_PROMPTS.names}
    for index, location, row in rows:
        at = f"{where}: {location}"
        _check_fields(row, spec, at)
        out["index"].append(index)
        out["prompt"].append(_prompt(_get(row, spec.input_key), spec, at))
        out["label"].append(_label(_get(row, spec.label_key), spec, at))
        out["tags"].append([(key, _tag(row, key, at)) for key in spec.group_keys])
        out["location"].append(location)
    if not out["index"]:
        raise DataError(f"{where}: no rows (offset {spec.offset}, limit {spec.limit})")
    return pa.Table.from_pydict(out, schema=LOADED_PROMPTS)


# ----------------------------------------------------------------------------- sources


def _rows(spec: DatasetSpec, toy_cfg: ToyConfig | None) -> Iterator[tuple[int, str, dict]]:
    """(index, location, row) for every row of the source, lazily: a broken line after the
    rows a limit takes is never read."""
    source = spec.source
    if source == "toy":
        yield from _toy_rows(spec.split, toy_cfg or ToyConfig())
    elif source.startswith("hf:"):
        yield from _hub_rows(spec)
    else:
        yield from _local_rows(Path(source))


def _toy_rows(split: str, cfg: ToyConfig) -> Iterator[tuple[int, str, dict]]:
    if split not in TOY_SPLITS:
        raise DataError(
            f"data source 'toy': unknown split {split!r}; use one of {sorted(TOY_SPLITS)}"
        )
    train, evaluation = make_toy_splits(cfg)
    table = train if TOY_SPLITS[split] == "train" else evaluation
    # The toy's index runs on across both splits (every problem has one id): keep it.
    for position, row in enumerate(table.to_pylist()):
        yield row["index"], f"toy {split} row {position + 1}", row


def _hub_rows(spec: DatasetSpec) -> Iterator[tuple[int, str, dict]]:
    import datasets  # slow to import; only hub sources need it

    dataset_id = spec.source[3:].strip()
    if not dataset_id:
        raise DataError(f"data source {spec.source!r}: expected hf:<dataset id>")
    try:
        dataset = datasets.load_dataset(dataset_id, spec.subset, split=spec.split)
    except Exception as err:  # network, auth, unknown split: all surface as one clear error
        raise DataError(f"{describe_source(spec)}: could not load: {err}") from err
    for position, row in enumerate(dataset):
        yield position, _row_location(position), row


def _local_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    if not path.exists():
        raise DataError(
            f"data source {str(path)!r}: not 'toy', not 'hf:<dataset id>', and no such file "
            f"(local files: {', '.join(LOCAL_FORMATS)})"
        )
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in LOCAL_FORMATS:
        raise DataError(
            f"data file {path}: unsupported format; expected one of {', '.join(LOCAL_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path}: empty file")
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
        return
    rows = _json_rows(path) if suffix == ".json" else _table(path, suffix).to_pylist()
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: {_row_location(position)} is a {type(row).__name__}, not an object"
            )
        yield position, _row_location(position), row


def _row_location(position: int) -> str:
    return f"row {position + 1} (index {position})"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    position = 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # a blank line (often the last) is not a row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {line_number}: not valid JSON ({err.msg} at column "
                    f"{err.colno}): {line.strip()[:80]!r}"
                    + (" (a truncated line?)" if not line.endswith("\n") else "")
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {line_number}: a JSON {type(row).__name__}, not an object"
                )
            yield position, f"line {line_number}", row
            position += 1


def _json_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows, got a {type(rows).__name__}")
    return rows


def _table(path: Path, suffix: str) -> pa.Table:
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        try:  # Arrow IPC: the file format (what write_arrow writes) or a stream (HF's cache)
            with pa.memory_map(str(path), "r") as source:
                return ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path), "r") as source:
                return ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data file {path}: could not be read as {suffix} ({err})") from err


# ------------------------------------------------------------------------------- rows


def _get(row: dict, key: str) -> Any:
    """row[key], where a dotted key walks nested objects (reward_model.ground_truth)."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _check_fields(row: dict, spec: DatasetSpec, at: str) -> None:
    for what, key in (("prompt", spec.input_key), ("label", spec.label_key)):
        if _get(row, key) is not None:
            continue
        if key in row:
            raise DataError(f"{at}: field {key!r} is null")
        hint = ""
        if what == "label" and isinstance(row.get("reward_model"), dict):
            hint = " (the verl layout: set label_key: reward_model.ground_truth)"
        raise DataError(f"{at}: no {what} field {key!r}; fields are {sorted(row)}{hint}")


def _prompt(value: Any, spec: DatasetSpec, at: str) -> list[dict[str, str]]:
    field = spec.input_key
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{at}: field {field!r} is an empty string")
        return [{"role": "user", "content": apply_template(spec.template, value)}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{at}: field {field!r} must be a list of {{role, content}} messages or a string "
            f"(got {value!r:.80})"
        )
    messages = []
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{at}: field {field!r}[{position}] is not a {{role, content}} message "
                f"(got {message!r:.80})"
            )
        if not message["role"].strip() or not message["content"].strip():
            empty = "role" if not message["role"].strip() else "content"
            raise DataError(f"{at}: field {field!r}[{position}] has an empty {empty}")
        messages.append({"role": message["role"], "content": message["content"]})
    if spec.template != "none":
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise DataError(f"{at}: field {field!r} has no user message to apply the template to")
        last = messages[users[-1]]
        last["content"] = apply_template(spec.template, last["content"])
    return messages


def _label(value: Any, spec: DatasetSpec, at: str) -> str:
    field = spec.label_key
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{at}: field {field!r} must be a string or a number (got {value!r:.80})")
    text = str(value).strip()
    if spec.label_format == "gsm8k":
        if "####" not in text:
            raise DataError(
                f"{at}: field {field!r} has no '#### <answer>' (label_format gsm8k): {text[-60:]!r}"
            )
        text = text.rsplit("####", 1)[1].strip()
    if not text:
        raise DataError(f"{at}: field {field!r} is empty")
    if text.count("{") != text.count("}"):
        raise DataError(f"{at}: field {field!r} has unbalanced braces: {text[:80]!r}")
    return text


def _tag(row: dict, key: str, at: str) -> str:
    value = _get(row, key)
    if value is None:
        raise DataError(f"{at}: no group field {key!r} (group_keys); fields are {sorted(row)}")
    return str(value)
