"""The pipeline: a `Job` run stage by stage (`run_pipeline`; several targets in one run, `run_targets`), the verify stage, held-out quality, and the report
merged from the stages' artifacts."""

from .job import Job, StageTimer
from .run import check_budget, run_pipeline, run_targets

__all__ = ["Job", "StageTimer", "check_budget", "run_pipeline", "run_targets"]
