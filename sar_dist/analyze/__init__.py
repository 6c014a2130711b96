"""``sar-dist analyze``: sparsity, overlap, sign conflicts, cosine and off-principal share of task vectors."""

from sar_dist.analyze.run import run_analyze

__all__ = ["run_analyze"]
