#!/usr/bin/env bash
# Nightly batch denoising on a Ray cluster: submit jobs/denoise.py and follow it to the end,
# resubmitting only after a transient failure (exit 75). Used by cron (infra/cron/crontab) and by
# the Kubernetes CronJob (infra/k8s/cron-fallback/).
#
#   infra/cron/nightly-denoise.sh [extra jobs/denoise.py options, e.g. --workers 4 --gpus-per-worker 1]
#
# RAY_API_SERVER_ADDRESS: the cluster's job server (dashboard), default http://127.0.0.1:8265.
# DENOISE_INPUT / DENOISE_OUTPUT / DENOISE_MODEL override the defaults below. DENOISE_WORKING_DIR is
# uploaded as the job's working directory (default: this checkout); set it empty when the cluster's
# image holds the code. DENOISE_RETRIES (default 2) and DENOISE_RETRY_DELAY (seconds, default 300):
# resubmissions after the job exited 75. With token auth on the cluster, export RAY_AUTH_MODE=token
# and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as for any Ray client. The job's S3 and MLflow
# settings come from the cluster's environment, never from this script (see docs/scheduling.md).
#
# Never two nights at once:
# - one submitter per host: `flock -n` on DENOISE_LOCK_FILE; a second start logs and exits 2;
# - one Ray job per night: its submission id is <DENOISE_JOB_NAME>-<UTC date> (default name
#   nightly-denoise), then -2, -3, ... after a failed or stopped attempt; a submitter that finds
#   tonight's job still running follows it instead of submitting another, and one that finds the
#   previous night's job still running (its submitter was killed) stops it first;
# - SIGTERM/SIGINT/SIGHUP (cron host shutdown, the CronJob's deadline, a deleted pod) stop the Ray
#   job before the script exits.
# Exit status, the jobs' table: 0 tonight's job succeeded (now or in an earlier attempt); 1 it
# failed unexpectedly (exit 1, or no exit code), someone else stopped it, or tonight's attempts ran
# out; 2 it failed permanently (exit 2), or another submitter holds the lock; 75 the job server is
# unreachable, or the job still exited 75 after the retries; 130 SIGINT; 143 SIGTERM or SIGHUP.
set -euo pipefail

cd "$(dirname "$0")/../.."
address=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
input=${DENOISE_INPUT:-s3://denoise/incoming}
output=${DENOISE_OUTPUT:-s3://denoise/denoised}
model=${DENOISE_MODEL:-models:/denoiser-sidd@champion}
name=${DENOISE_JOB_NAME:-nightly-denoise}
lock=${DENOISE_LOCK_FILE:-${TMPDIR:-/tmp}/${name}.lock}
working_dir=${DENOISE_WORKING_DIR-.}
retries=${DENOISE_RETRIES:-2}
retry_delay=${DENOISE_RETRY_DELAY:-300}
max_attempts=20

say() { echo "$(date -u +%FT%TZ) nightly-denoise: $*"; }

exec 9>>"${lock}"
if ! flock -n 9; then
    say "another nightly run holds ${lock}; not starting a second one"
    exit 2
fi

# Ask the job server about Ray job $1. Sets `state` (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED,
# NONE when there is no such job, UNREACHABLE when the server did not answer) and `code` (the
# entrypoint's exit code of a FAILED job; empty when Ray failed it without running it to the end).
query_job() {
    local out
    code=""
    if ! out=$(ray job status --address "${address}" "$1" 2>&1); then
        case "${out}" in
            *"does not exist"*) state=NONE ;;
            *) state=UNREACHABLE ;;
        esac
        return 0
    fi
    case "${out}" in
        *"Job '$1' succeeded"*) state=SUCCEEDED ;;
        *"Job '$1' failed"*)
            state=FAILED
            code=$(sed -n 's/.*failed with exit code \([0-9][0-9]*\).*/\1/p' <<<"${out}" | head -n 1) ;;
        *"Job '$1' was stopped"*) state=STOPPED ;;
        *"Status for job '$1': "*)
            state=$(sed -n "s/.*Status for job '$1': \([A-Z]*\).*/\1/p" <<<"${out}" | head -n 1) ;;
        *) state=NONE ;;
    esac
}

unreachable() {
    say "the job server at ${address} does not answer; try again later"
    exit 75
}

# The submission id of attempt $2 of night $1.
attempt_id() { if [[ $2 -eq 1 ]]; then echo "${name}-$1"; else echo "${name}-$1-$2"; fi; }

tonight=$(date -u +%F)
yesterday=$(date -u -d "${tonight} -1 day" +%F)

# An earlier night still running means its submitter died without stopping it: stop it now.
for ((n = 1; n <= max_attempts; n++)); do
    old=$(attempt_id "${yesterday}" "${n}")
    query_job "${old}"
    [[ ${state} == UNREACHABLE ]] && unreachable
    [[ ${state} == NONE ]] && break
    if [[ ${state} == PENDING || ${state} == RUNNING ]]; then
        say "Ray job ${old} of ${yesterday} is still ${state} with no submitter; stopping it"
        ray job stop --address "${address}" "${old}" || say "could not stop ${old}"
    fi
done

# Tonight's first attempt that has not failed: follow it if it runs, submit it if it is new.
for ((n = 1; ; n++)); do
    if ((n > max_attempts)); then
        say "${max_attempts} attempts of ${tonight} already failed; not submitting another"
        exit 1
    fi
    id=$(attempt_id "${tonight}" "${n}")
    query_job "${id}"
    case "${state}" in
        UNREACHABLE) unreachable ;;
        SUCCEEDED) say "Ray job ${id} already succeeded tonight; nothing to do"; exit 0 ;;
        NONE | PENDING | RUNNING) break ;;
        *) ;;  # FAILED or STOPPED: the next attempt gets the next id
    esac
done

child=""
stop_job() {
    say "stopping Ray job ${id} (submitter got a signal)"
    ray job stop --address "${address}" "${id}" || say "could not stop ${id}"
    if [[ -n ${child} ]]; then kill "${child}" 2>/dev/null || true; fi
    exit "$1"
}
trap 'stop_job 143' TERM HUP
trap 'stop_job 130' INT

# In the background, so a trap runs as soon as a signal arrives.
wait_for() {
    child=$!
    wait "${child}" || true
    child=""
}

submit_opts=()
[[ -n ${working_dir} ]] && submit_opts=(--working-dir "${working_dir}")
while true; do
    if [[ ${state} == NONE ]]; then
        say "submitting ${id} to ${address}: ${input} -> ${output} (${model})"
        ray job submit --address "${address}" --submission-id "${id}" "${submit_opts[@]}" -- \
            python jobs/denoise.py "${input}" "${output}" --model "${model}" --date today "$@" &
    else
        say "Ray job ${id} is ${state}; following it instead of submitting another"
        ray job logs --address "${address}" --follow "${id}" &
    fi
    wait_for
    query_job "${id}"
    say "Ray job ${id} ended ${state}${code:+ (exit code ${code})}"
    case "${state}" in
        SUCCEEDED) exit 0 ;;
        UNREACHABLE) unreachable ;;
        PENDING | RUNNING) sleep 5 & wait_for; continue ;;  # the client lost the job: follow it again
        FAILED) ;;
        *) exit 1 ;;  # STOPPED by someone else
    esac
    case "${code}" in
        2) exit 2 ;;
        75) ;;
        *) exit 1 ;;
    esac
    if ((retries <= 0 || n >= max_attempts)); then
        say "no retries left after a transient failure"
        exit 75
    fi
    retries=$((retries - 1))
    n=$((n + 1))
    id=$(attempt_id "${tonight}" "${n}")
    say "transient failure; submitting ${id} in ${retry_delay} s (${retries} more retries after it)"
    sleep "${retry_delay}" &
    wait_for
    state=NONE
done
