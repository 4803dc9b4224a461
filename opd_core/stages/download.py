"""Stage `download`: models and data into `download/` (`opd stage download --run-dir DIR`).

Its inputs are remote (hub ids), local paths or the toy seed: the config sections are the
whole cache key. The work is `opd_core.download.run_download`.
"""

from __future__ import annotations

from typing import Any

from opd_core.download import run_download
from opd_core.stages.base import CachedStage


class Download(CachedStage):
    name = "download"
    sections = ("models", "data", "toy")

    def build(self) -> dict[str, Any]:
        return run_download(self.cfg, self.run_dir)
