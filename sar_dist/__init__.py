"""sar-dist: distributed, out-of-core merging of very large RLVR-trained LLMs on Ray.

Public API (everything else is internal):
    MergeJob          a validated merge config (``MergeJob.from_dict(yaml_dict)``)
    build_plan        plan a merge from safetensors headers only
    prepare, execute  check the output, then run the plan (``executor="ray"|"local"``) and commit
    METHODS           the registered merge methods
    Storage           fsspec/local storage with range reads and atomic writes
"""

from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.merge.registry import METHODS
from sar_dist.plan.planner import build_plan
from sar_dist.storage import Storage

__all__ = ["METHODS", "MergeJob", "Storage", "build_plan", "execute", "prepare"]
__version__ = "0.1.0"
