"""A persistent teacher-logprob cache: (teacher namespace, token ids) -> float32 log-probs.

    cache = LogprobCache(".cache/opd-teacher-logprobs")
    key = cache.key(model_namespace(teacher_dir), prompt_ids, response_ids)
    cache.put_many({key: np.array([...], np.float32)}); cache.get_many([key])

One SQLite file (WAL mode, so several processes can share it). Rescoring the same rollouts
with the same teacher weights, e.g. when a stage is rerun, is answered from here.

The namespace must change whenever the weights do, and real SGLang gives no help with that:
its /model_info has no weights fingerprint and its `weight_version` stays "default" unless
a caller sets it. So the namespace is built from what the project knows: the content of the
weight files (`model_namespace`), or a hub id with a pinned revision.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np

from opd_core.hash_memo import file_sha256

# What decides a model's outputs: its weights and its config (architecture, rope, ...).
_MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json")


def model_namespace(model: str | Path, revision: str | None = None) -> str | None:
    """A cache namespace for a model's weights, or None when there is no safe one.

    A local directory: `sha256:<digest>` over the sha256 of each weight file and config.json
    (the digests are remembered across runs by `hash_memo`, which the download stage has
    already filled), so a copied or moved model keeps its cache and a retrained one does not.
    A hub id: `hub:<id>@<revision>` with a pinned revision; without one, None (a branch
    moves, so it is not a key).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted({f for pattern in _MODEL_FILES for f in path.glob(pattern) if f.is_file()})
        if not any(f.name != "config.json" for f in files):
            return None
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
        return f"sha256:{digest.hexdigest()[:32]}"
    if revision:
        return f"hub:{model}@{revision}"
    return None


class LogprobCache:
    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / "teacher_logprobs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS logprobs (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
        )
        self._db.commit()

    @staticmethod
    def key(namespace: str, prompt_ids: list[int], response_ids: list[int]) -> str:
        digest = hashlib.sha256(namespace.encode())
        digest.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
        digest.update(b"|")  # the split matters: the same ids split differently score differently
        digest.update(np.asarray(response_ids, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, value FROM logprobs WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                found.update({k: np.frombuffer(v, dtype=np.float32).copy() for k, v in rows})
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO logprobs (key, value) VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM logprobs").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
