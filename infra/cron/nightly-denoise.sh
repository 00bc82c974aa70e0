#!/usr/bin/env bash
# Nightly batch denoising on a Ray cluster: submit jobs/denoise.py with this checkout as the
# working directory and follow it to the end. Used by cron (infra/cron/crontab) and by the
# Kubernetes CronJob (infra/k8s/cronjob-denoise-submit.yaml).
#
#   infra/cron/nightly-denoise.sh [extra jobs/denoise.py options, e.g. --workers 4 --gpus-per-worker 1]
#
# RAY_API_SERVER_ADDRESS: the cluster's job server (dashboard), default http://127.0.0.1:8265.
# DENOISE_INPUT / DENOISE_OUTPUT / DENOISE_MODEL override the defaults below. With token auth on
# the cluster, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as for any
# Ray client. The job's S3 and MLflow settings come from the cluster's environment, never from
# this script (see docs/scheduling.md).
#
# Never two nights at once:
# - one submitter per host: `flock -n` on DENOISE_LOCK_FILE; a second start logs and exits 75;
# - one Ray job per night: its submission id is <DENOISE_JOB_NAME>-<UTC date> (default name
#   nightly-denoise), then -2, -3, ... after a failed or stopped attempt; a submitter that finds
#   tonight's job still running follows it instead of submitting another, and one that finds the
#   previous night's job still running (its submitter was killed) stops it first;
# - SIGTERM/SIGINT/SIGHUP (cron host shutdown, the CronJob's deadline, a deleted pod) stop the Ray
#   job before the script exits.
# Exit status: 0 when tonight's job succeeded (now or in an earlier attempt), 1 when it failed or
# was stopped, 75 when another submitter holds the lock, 143 when stopped by a signal.
set -euo pipefail

cd "$(dirname "$0")/../.."
address=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
input=${DENOISE_INPUT:-s3://denoise/incoming}
output=${DENOISE_OUTPUT:-s3://denoise/denoised}
model=${DENOISE_MODEL:-models:/denoiser@champion}
name=${DENOISE_JOB_NAME:-nightly-denoise}
lock=${DENOISE_LOCK_FILE:-${TMPDIR:-/tmp}/${name}.lock}
max_attempts=20

say() { echo "$(date -u +%FT%TZ) nightly-denoise: $*"; }

exec 9>>"${lock}"
if ! flock -n 9; then
    say "another nightly run holds ${lock}; not starting a second one"
    exit 75
fi

# The state of Ray job $1: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, ... or NONE if unknown.
job_state() {
    local out
    if ! out=$(ray job status --address "${address}" "$1" 2>&1); then
        echo NONE
        return
    fi
    case "${out}" in
        *"Job '$1' succeeded"*) echo SUCCEEDED ;;
        *"Job '$1' failed"*) echo FAILED ;;
        *"Job '$1' was stopped"*) echo STOPPED ;;
        *"Status for job '$1': "*) sed -n "s/.*Status for job '$1': \([A-Z]*\).*/\1/p" <<<"${out}" | head -n 1 ;;
        *) echo NONE ;;
    esac
}

# The submission id of attempt $2 of night $1.
attempt_id() { if [[ $2 -eq 1 ]]; then echo "${name}-$1"; else echo "${name}-$1-$2"; fi; }

tonight=$(date -u +%F)
yesterday=$(date -u -d "${tonight} -1 day" +%F)

# An earlier night still running means its submitter died without stopping it: stop it now.
for ((n = 1; n <= max_attempts; n++)); do
    old=$(attempt_id "${yesterday}" "${n}")
    state=$(job_state "${old}")
    [[ ${state} == NONE ]] && break
    if [[ ${state} == PENDING || ${state} == RUNNING ]]; then
        say "Ray job ${old} of ${yesterday} is still ${state} with no submitter; stopping it"
        ray job stop --address "${address}" "${old}" || say "could not stop ${old}"
    fi
done

id=""
for ((n = 1; n <= max_attempts; n++)); do
    candidate=$(attempt_id "${tonight}" "${n}")
    state=$(job_state "${candidate}")
    case "${state}" in
        NONE) id=${candidate}; break ;;
        SUCCEEDED) say "Ray job ${candidate} already succeeded tonight; nothing to do"; exit 0 ;;
        PENDING | RUNNING) id=${candidate}; break ;;
        *) ;;  # FAILED or STOPPED: the next attempt gets the next id
    esac
done
if [[ -z ${id} ]]; then
    say "${max_attempts} attempts of ${tonight} already failed; not submitting another"
    exit 1
fi

child=""
stop_job() {
    say "stopping Ray job ${id} (submitter got a signal)"
    ray job stop --address "${address}" "${id}" || say "could not stop ${id}"
    if [[ -n ${child} ]]; then kill "${child}" 2>/dev/null || true; fi
    exit 143
}
trap stop_job TERM INT HUP

if [[ ${state} == PENDING || ${state} == RUNNING ]]; then
    say "Ray job ${id} is already ${state}; following it instead of submitting another"
    ray job logs --address "${address}" --follow "${id}" &
else
    say "submitting ${id} to ${address}: ${input} -> ${output} (${model})"
    # In the background, so the trap runs as soon as a signal arrives.
    ray job submit --address "${address}" --submission-id "${id}" --working-dir . -- \
        python jobs/denoise.py "${input}" "${output}" --model "${model}" --date today "$@" &
fi
child=$!
rc=0
wait "${child}" || rc=$?
child=""

state=$(job_state "${id}")
say "Ray job ${id} ended ${state} (submitter status ${rc})"
[[ ${state} == SUCCEEDED ]]
