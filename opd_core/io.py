"""Atomic file writes and Arrow IPC files, the glue between stages.

Every write goes to a temporary name in the same directory and is renamed into place, so a
crash never leaves a half-written file that a later stage would read. A write that fails
because the disk is full raises `DiskFullError` ("no space left on <dir> ..."), with the
previous version of the file still in place and the partial temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc


class ArtifactError(ValueError):
    """A stored artifact is missing or does not have the expected shape."""


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the directory. An OSError with
    errno ENOSPC, built from (errno, message) only, so it survives pickling (Ray actors)."""

    def __str__(self) -> str:
        return str(self.args[1])


# What the kernel's ENOSPC / EDQUOT look like once a library has wrapped them: safetensors
# (Rust) reports `StorageFull`, and torch.save to a path ends in an `unexpected pos` enforce
# failure of its C++ writer with the errno lost (its context is `basic_ios::clear: iostream
# error`), so for that one the free space decides (below).
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "StorageFull")
_LOST_ERRNO_MESSAGES = ("unexpected pos", "iostream error")
# A write that failed for lack of space leaves the filesystem about this full: the kernel
# fills it to the last block before it returns ENOSPC.
_FULL_BELOW_BYTES = 16 << 20


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def free_bytes(path: str | Path) -> int | None:
    """Bytes available to this user on the filesystem holding `path` (None if unknown)."""
    for candidate in (Path(path), *Path(path).parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """Whether `err`, raised while writing under `path`, means the disk (or quota) is full."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(message in str(e) for message in _FULL_MESSAGES):
            return True
    lost_errno = any(m in str(e) for e in _chain(err) for m in _LOST_ERRNO_MESSAGES)
    free = free_bytes(path)
    return lost_errno and free is not None and free < _FULL_BELOW_BYTES


def disk_full_error(path: str | Path, what: str, kept: str) -> DiskFullError:
    """The error to raise instead: `no space left on <dir> while writing <what> ...; <kept>`."""
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    free = free_bytes(directory)
    left = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on {directory}{left} while writing {what}; {kept}. "
        "Free some space (or point run.artifacts_dir at a bigger disk) and run again.",
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    Works for files and directories alike (a directory target is replaced whole). If the
    block fails because the disk is full, `DiskFullError` names the directory, and `path` is
    left as it was (the temporary copy is deleted, which also gives the space back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (
        Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    )
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # Two renames keep the old directory readable until the new one is complete.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:  # torch.distributed.checkpoint's errors are BaseExceptions
        stop = (DiskFullError, KeyboardInterrupt, SystemExit, GeneratorExit)
        if isinstance(err, stop) or not is_disk_full(err, path.parent):
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise disk_full_error(path.parent, path, kept) from err
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (NaN/inf become null, so any JSON reader can load it), written atomically."""
    return write_text(
        path,
        json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n",
    )


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err


def write_arrow(path: str | Path, table: pa.Table, schema: pa.Schema | None = None) -> Path:
    """Write an Arrow IPC file atomically, cast to `schema` when given."""
    if schema is not None:
        table = conform(table, schema, where=str(path))
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    return Path(path)


def read_arrow(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read an Arrow IPC file; with `schema`, check the required columns are there."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing Arrow file: {path}")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = ipc.open_file(source).read_all()
    except pa.ArrowInvalid as err:
        raise ArtifactError(f"{path}: not a readable Arrow IPC file ({err})") from err
    return conform(table, schema, where=str(path)) if schema is not None else table


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Select and cast `table` to `schema`, naming the file and column on any mismatch."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ArtifactError(f"{where}: missing column(s) {missing}; have {table.column_names}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ArtifactError(
                    f"{where}: column {field.name!r} has type {column.type}, expected {field.type}"
                ) from err
        if not field.nullable and column.null_count:
            row = next(i for i, v in enumerate(column.to_pylist()) if v is None)
            raise ArtifactError(f"{where}: row {row}, column {field.name!r} is null")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: str | Path) -> list[Path]:
    """Every file under `root`, sorted, hidden files and directories (temporaries) skipped."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def sha256_tree(root: str | Path, hash_file: Callable[[Path], str] = sha256_file) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by relative path (sorted, hidden files skipped)."""
    root = Path(root)
    return {str(p.relative_to(root)): hash_file(p) for p in tree_files(root)}


def copy_tree(src: str | Path, dst: str | Path) -> Path:
    """Copy a directory atomically (the destination appears complete or not at all)."""
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)
    return Path(dst)
