#!/usr/bin/env bash
# Nightly batch denoising on a Ray cluster without Kubernetes: submit jobs/denoise.py with this
# checkout as the working directory and follow it to the end (the exit status is the job's).
#
#   infra/cron/nightly-denoise.sh [extra jobs/denoise.py options, e.g. --workers 4 --gpus-per-worker 1]
#
# RAY_API_SERVER_ADDRESS: the cluster's job server (dashboard), default http://127.0.0.1:8265.
# DENOISE_INPUT / DENOISE_OUTPUT / DENOISE_MODEL override the defaults below. With token auth on
# the cluster, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH as for any Ray client. The
# job's S3 and MLflow settings come from the cluster's environment (see docs/scheduling.md).
set -euo pipefail

cd "$(dirname "$0")/../.."
address=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
input=${DENOISE_INPUT:-s3://denoise/incoming}
output=${DENOISE_OUTPUT:-s3://denoise/denoised}
model=${DENOISE_MODEL:-models:/denoiser@champion}

echo "$(date -u +%FT%TZ) submitting nightly denoise to ${address}: ${input} -> ${output} (${model})"
exec ray job submit --address "${address}" --working-dir . -- \
    python jobs/denoise.py "${input}" "${output}" --model "${model}" --date today "$@"
