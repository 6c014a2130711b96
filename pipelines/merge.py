"""Merge job entry point, for ``ray job submit`` and orchestrators.

Run:
    python -m pipelines.merge configs/ties_tiny.yaml --output /tmp/merged
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m pipelines.merge configs/ties_tiny.yaml --output s3://bucket/merged --json

Inside a Ray job ``RAY_ADDRESS`` is set, so tasks run on that cluster. Flags are those
of ``sar-dist merge``; exit codes too (0 done, 2 bad input, 1 failure).
"""

from __future__ import annotations

import sys

from sar_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``sar-dist merge`` arguments and run the merge."""
    return cli_main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
