"""sha256 of files, remembered across runs: stage cache keys without rereading checkpoints.

    digest = file_sha256(Path("artifacts/latest/download/teacher/model-00001-of-00017.safetensors"))

Every stage's cache key hashes its inputs' contents (`rundir.stage_key`). For Qwen3-8B and
a 32B teacher that is ~80 GB, minutes of reading on every `opd run`, and twice for train
(the flow checks whether train is cached before deciding to start a teacher). The digest of
a file is kept in one SQLite table (WAL, shared by concurrent runs) under its resolved path
and a stamp of (size, mtime, ctime, inode); a file whose stamp is unchanged is not reread.
The ctime makes the stamp safe against edits that restore the mtime (`touch -d`, `cp -p`
over the old file): the kernel sets ctime on every change and no tool can set it back. A
file changed in the last `SETTLE_SECONDS` is hashed but not remembered (git's "racy" rule):
timestamps are coarse, so a second write within the same tick could keep the same stamp.

The memo lives at `$OPD_HASH_MEMO`, default `~/.cache/opd/file_hashes.sqlite`. If it cannot
be opened or written (read-only home, a locked file), files are simply hashed every time.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from opd_core.io import sha256_file

logger = logging.getLogger("opd.hash_memo")

SETTLE_SECONDS = 2.0

_lock = threading.Lock()
_db: sqlite3.Connection | None = None
_db_path: Path | None = None


def memo_path() -> Path:
    return Path(
        os.environ.get("OPD_HASH_MEMO") or Path.home() / ".cache" / "opd" / "file_hashes.sqlite"
    ).expanduser()


def _connection() -> sqlite3.Connection | None:
    """The memo for the current `memo_path()` (reopened when it changes), or None if unusable:
    an unusable path is tried, and warned about, once."""
    global _db, _db_path
    path = memo_path()
    if _db_path == path:
        return _db
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS files"
            " (path TEXT PRIMARY KEY, stamp TEXT NOT NULL, sha256 TEXT NOT NULL)"
        )
        db.commit()
    except (OSError, sqlite3.Error) as err:
        logger.warning("file-hash memo %s unusable (%s): hashing every input in full", path, err)
        db = None
    _db, _db_path = db, path
    return db


def file_sha256(path: Path) -> str:
    """The file's sha256, from the memo when its (size, mtime, ctime, inode) are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
    with _lock:
        db = _connection()
        if db is not None:
            try:
                row = db.execute(
                    "SELECT sha256 FROM files WHERE path = ? AND stamp = ?", (str(path), stamp)
                ).fetchone()
            except sqlite3.Error:
                row = None
            if row:
                return row[0]
    digest = sha256_file(path)  # outside the lock: reading a big file must not block other threads
    settled = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLE_SECONDS * 1e9
    with _lock:
        if db is not None and settled:
            try:
                db.execute(
                    "INSERT OR REPLACE INTO files (path, stamp, sha256) VALUES (?, ?, ?)",
                    (str(path), stamp, digest),
                )
                db.commit()
            except sqlite3.Error as err:
                # A busy or read-only memo costs a rehash next time, nothing else.
                logger.warning("file-hash memo: cannot record %s (%s)", path, err)
    return digest
