"""Load prompts in dapo-math-17k's shape from any supported source into a PROMPTS table.

    load_prompts("toy", "train", toy_cfg=cfg.toy)                         # the built-in task
    load_prompts("hf:BytedTsinghua-SIA/DAPO-Math-17k", "train", limit=1000)  # the HF hub
    load_prompts("data/math.jsonl", "train")                              # .jsonl .json .parquet .arrow

Every source goes through `datasets` (a local file is one split; `split` only applies to
hub datasets). Accepted row variants, as found in dapo-math copies in the wild:
`prompt` is a list of {role, content} messages or a plain string (wrapped as one user
message); `label` is a string or a number; with no label column, `reward_model.ground_truth`
(the verl/slime layout) is used. Bad rows raise `DataError` naming source, row and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from opd_core.config import ToyConfig
from opd_core.schemas import PROMPTS

__all__ = ["DataError", "load_prompts", "normalize_rows"]

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TOY_SPLITS = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval"}


class DataError(ValueError):
    """A data source is unusable; the message names the source, the row and the field."""


def load_prompts(
    source: str,
    split: str = "train",
    input_key: str = "prompt",
    label_key: str = "label",
    limit: int | None = None,
    toy_cfg: ToyConfig | None = None,
) -> pa.Table:
    """Rows of `source` as a PROMPTS table (index = row number in the source)."""
    if source == "toy":
        return _toy(split, toy_cfg or ToyConfig(), limit)
    if source.startswith("hf:"):
        dataset_id = source[3:].strip()
        if not dataset_id:
            raise DataError(f"data source {source!r}: expected hf:<dataset id>")
        dataset = _load_hub(dataset_id, split)
    else:
        dataset = _load_local(Path(source))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return normalize_rows(dataset, source, input_key, label_key)


def _toy(split: str, cfg: ToyConfig, limit: int | None) -> pa.Table:
    from opd_core.toy.task import make_toy_splits

    if split not in TOY_SPLITS:
        raise DataError(
            f"data source 'toy': unknown split {split!r}; use one of {sorted(TOY_SPLITS)}"
        )
    train, evaluation = make_toy_splits(cfg)
    table = train if TOY_SPLITS[split] == "train" else evaluation
    return table.slice(0, limit) if limit is not None else table


def _load_hub(dataset_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # network, auth, unknown split: all surface as one clear error
        raise DataError(
            f"data source hf:{dataset_id} (split {split!r}): could not load: {err}"
        ) from err


def _load_local(path: Path):
    import datasets

    if not path.exists():
        raise DataError(
            f"data source {str(path)!r}: not 'toy', not 'hf:<dataset id>', and no such file "
            f"(local files: {', '.join(LOCAL_FORMATS)})"
        )
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if path.is_dir() or builder is None:
        raise DataError(
            f"data file {path}: unsupported format; expected one of {', '.join(LOCAL_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path}: empty file")
    try:
        # A local file is a single split; datasets names it "train".
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        raise DataError(f"data file {path}: could not be read as {path.suffix} ({err})") from err
    if len(dataset) == 0:
        raise DataError(f"data file {path}: no rows")
    return dataset


def normalize_rows(
    rows: Any, source: str, input_key: str = "prompt", label_key: str = "label"
) -> pa.Table:
    """Validate and convert dataset rows (a `datasets.Dataset` or a list of dicts) to PROMPTS."""
    columns = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    if input_key not in columns:
        raise DataError(f"{source}: no prompt field {input_key!r}; fields are {columns}")
    if label_key not in columns and "reward_model" not in columns:
        raise DataError(
            f"{source}: no label field {label_key!r} and no reward_model.ground_truth; fields are {columns}"
        )
    wanted = [c for c in (input_key, label_key, "reward_model") if c in columns]
    if hasattr(rows, "select_columns"):
        rows = rows.select_columns(wanted)  # skip large unrelated columns
    prompts, labels = [], []
    for row_number, row in enumerate(rows):
        prompts.append(_messages(row.get(input_key), source, row_number, input_key))
        labels.append(_label(row, source, row_number, label_key))
    return pa.Table.from_pydict(
        {"index": list(range(len(prompts))), "prompt": prompts, "label": labels}, schema=PROMPTS
    )


def _messages(value: Any, source: str, row: int, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{source}: row {row}, field {field!r} is an empty string")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        messages = []
        for position, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{source}: row {row}, field {field!r}[{position}] is not a {{role, content}} message (got {message!r:.80})"
                )
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
    raise DataError(
        f"{source}: row {row}, field {field!r} must be a list of {{role, content}} messages or a string (got {value!r:.80})"
    )


def _label(row: dict, source: str, row_number: int, label_key: str) -> str:
    value = row.get(label_key)
    field = label_key
    if value is None and isinstance(row.get("reward_model"), dict):
        value, field = row["reward_model"].get("ground_truth"), "reward_model.ground_truth"
    if value is None:
        raise DataError(
            f"{source}: row {row_number}, missing label (field {label_key!r} or reward_model.ground_truth)"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{source}: row {row_number}, field {field!r} must be a string or a number (got {value!r:.80})"
        )
    text = str(value).strip()
    if not text:
        raise DataError(f"{source}: row {row_number}, field {field!r} is empty")
    return text
