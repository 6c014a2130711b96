#!/usr/bin/env bash
# Submit the whole pipeline to a running Ray cluster through the Jobs API: Fisher statistics for
# each fine-tune, then the SAR merge. Each command is safe to rerun: it resumes.
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265}"
for model in rl-math rl-code; do
  ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python -m pipelines.fisher configs/fisher/rl_math.yaml \
      --model "s3://models/$model" --data "s3://calib/$model.jsonl" --output "s3://fisher/$model" --json
done
ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml -- \
  python -m pipelines.merge configs/s3_sar.yaml --output s3://models/merged-sar --json
