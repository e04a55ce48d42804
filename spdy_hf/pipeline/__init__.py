"""The pipeline: a `Job` run stage by stage (`run_pipeline`), the verify stage, held-out quality, and the report
merged from the stages' artifacts."""

from .job import Job, StageTimer
from .run import check_budget, run_pipeline

__all__ = ["Job", "StageTimer", "check_budget", "run_pipeline"]
