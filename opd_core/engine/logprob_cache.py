"""A persistent teacher-logprob cache: (teacher fingerprint, token ids) -> float32 log-probs.

    cache = LogprobCache(".cache/opd-teacher-logprobs")
    key = cache.key(fingerprint, prompt_ids, response_ids)
    cache.put_many({key: np.array([...], np.float32)}); cache.get_many([key])

One SQLite file (WAL mode, so several processes can share it). Rescoring the same rollouts
with the same teacher weights, e.g. when a stage is rerun, is answered from here.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np


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
    def key(fingerprint: str, prompt_ids: list[int], response_ids: list[int]) -> str:
        digest = hashlib.sha256(fingerprint.encode())
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
