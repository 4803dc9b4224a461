"""Stage `download`: models and data into `download/` (`opd stage download --run-dir DIR`).

Its inputs are remote (hub ids), local paths or the toy seed: the config is the whole cache
key. The work is `opd_core.download.run_download` (which ends with the pre-flight check).
"""

from __future__ import annotations

from typing import Any

from opd_core.download import download_config_hash, run_download
from opd_core.stages.base import CachedStage


class Download(CachedStage):
    name = "download"

    def config_hash(self) -> str:
        # models, data, toy, preflight, the eval sets' dataset fields and the rollout lengths
        # the pre-flight check reads (not how the evals sample).
        return download_config_hash(self.cfg)

    def build(self) -> dict[str, Any]:
        return run_download(self.cfg, self.run_dir)
