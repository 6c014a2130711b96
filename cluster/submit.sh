#!/usr/bin/env bash
# Submit the whole pipeline to a running Ray cluster through the Jobs API: Fisher statistics for
# each fine-tune (side by side, as far as the cluster allows), the SAR merge, the report.
# Safe to rerun: every stage resumes from what is finished.
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh [configs/pipeline/s3_sar.yaml]
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265}"
ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml -- \
  python -m pipelines.run "${1:-configs/pipeline/s3_sar.yaml}" --json
