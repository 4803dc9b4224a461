"""The config reference in README.md, generated from the pydantic tree so it cannot drift.

    python -m opd_core.config_doc              # prints the markdown table README.md embeds
    python -m opd_core.config_doc README.md    # rewrites that table in README.md

Each row: dotted field, type, default, and the comment written beside the field in
`opd_core/config.py` (the one place a field is explained).
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from opd_core.config import OPDRunConfig

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """A field's comment: the one beside it, else the comment block right above it; fields a
    section inherits (rollout and teacher share ServerConfig's) are read from their base."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        if "model_fields" not in vars(cls) and not cls.__annotations__:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in source.splitlines():
            if match := _COMMENT.match(line):
                above.append(match.group(1).strip())
            elif (match := _FIELD.match(line)) and match.group(1) in model.model_fields:
                out[match.group(1)] = (match.group(2) or " ".join(above)).strip()
                above = []
            else:
                above = []
    return out


def _type_name(annotation) -> str:
    text = (
        str(annotation)
        if typing.get_origin(annotation)
        else getattr(annotation, "__name__", str(annotation))
    )
    return text.replace("typing.", "").replace("NoneType", "None").replace("Literal", "one of ")


def rows(config: BaseModel | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, comment) for every leaf of the default config."""
    config = config if config is not None else OPDRunConfig()
    comments = _comments(type(config))
    out = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):  # a section: its defaults as this tree sets them
            out.extend(rows(value, f"{prefix}{name}."))
        elif value and isinstance(value, list) and isinstance(value[0], BaseModel):
            # A list of sections (eval.benchmarks): the fields of one item, as `name[].field`.
            out.extend(rows(value[0], f"{prefix}{name}[]."))
        else:
            out.append(
                (
                    f"{prefix}{name}",
                    _type_name(field.annotation),
                    repr(value),
                    comments.get(name, ""),
                )
            )
    return out


def markdown() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field, type_name, default, comment in rows():
        type_name, comment = type_name.replace("|", "&#124;"), comment.replace("|", "&#124;")
        lines.append(f"| `{field}` | {type_name} | `{default}` | {comment} |")
    return "\n".join(lines)


def update_readme(path: Path) -> None:
    """Replace the config reference table in `path` (from its header row to the next blank
    line) with the current one."""
    text = path.read_text()
    start = text.index("| field | type | default | meaning |")
    end = text.index("\n\n", start)
    path.write_text(text[:start] + markdown() + text[end:])


if __name__ == "__main__":
    # python -m opd_core.config_doc            print the table
    # python -m opd_core.config_doc README.md  rewrite the table in README.md
    if len(sys.argv) > 1:
        update_readme(Path(sys.argv[1]))
    else:
        print(markdown())
