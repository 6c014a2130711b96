"""Fisher stage entry point, for ``ray job submit`` and orchestrators.

Run:
    python -m pipelines.fisher configs/fisher/rl_math.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m pipelines.fisher configs/fisher/rl_math.yaml --groups 8 --ranks-per-group 4 --device cuda --json

Inside a Ray job ``RAY_ADDRESS`` is set, so the groups are placed on that cluster. Flags are
those of ``sar-dist fisher``; exit codes too (0 done, 2 bad input, 1 failure).
"""

from __future__ import annotations

import sys

from sar_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``sar-dist fisher`` arguments and compute the statistics."""
    return cli_main(["fisher", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
