"""Whole-pipeline entry point, for ``ray job submit`` and orchestrators.

Run:
    python -m pipelines.run configs/pipeline/demo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.run configs/pipeline/s3_sar.yaml --json
    python -m pipelines.run configs/pipeline/s3_sar.yaml --stage fisher --model rl-math --json

Inside a Ray job ``RAY_ADDRESS`` is set, so every stage runs on that cluster. Flags are those
of ``sar-dist run``; exit codes too (0 done, 2 bad input, 1 failure).
"""

from __future__ import annotations

import sys

from sar_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``sar-dist run`` arguments and run the pipeline (or one stage of it)."""
    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
