"""The pipeline's stages, one object each, in order:

download -> convert -> teacher -> baseline_eval -> train -> final_eval

from opd_core.stages import Train
Train(cfg, run_dir).run(teacher=fleet)         # what `tasks/train.py` wraps for Prefect
"""

from opd_core.stages.base import CachedStage, Stage, StageOutcome
from opd_core.stages.convert import Convert
from opd_core.stages.download import Download
from opd_core.stages.evaluate import BaselineEval, FinalEval
from opd_core.stages.teacher import Teacher
from opd_core.stages.train import Train

__all__ = [
    "BaselineEval",
    "CachedStage",
    "Convert",
    "Download",
    "FinalEval",
    "Stage",
    "StageOutcome",
    "Teacher",
    "Train",
]
