#!/usr/bin/env bash
# The demo pipeline on the local stack: ingest -> train -> nightly denoise (twice) -> evaluate.
# Run through `make demo`, which installs the project and starts the stack first.
set -euo pipefail
cd "$(dirname "$0")/../.."
set -a; . .local/stack.env; set +a
PY=.venv/bin/python
B="s3://${DENOISE_BUCKET}"
DATE=$(date +%F)
RUN="demo-$(date +%Y%m%d-%H%M%S)"
# Fractional CPUs let the model actor and the read/write tasks share a 2-CPU local cluster.
DENOISE_FLAGS="--steps 4 --cpus-per-worker 0.5 --cpus-per-task 0.25 --task-memory-mb 512"
step() { printf '\n=== %s\n' "$*"; }
# The model's samplers against the classic denoisers on every 6th validation block (57 blocks, every
# photo and noise level; BM3D is left out: ~10 s a block here). `make evaluate` runs just this.
evaluate() {
    $PY jobs/evaluate.py "$B/datasets/demo" --model models:/denoiser@candidate --report reports/demo \
        --methods noisy,nl_means,wavelet,tv,direct,origin,improved --steps 1,2,5 --every 6 --limit none
}
if [ "${1:-}" = evaluate ]; then evaluate; exit; fi

step "1/5 ingest the demo pairs (scikit-image photos + synthetic camera noise) -> $B/datasets/demo"
$PY jobs/ingest.py demo: "$B/datasets/demo" --noise camera --variants 8 --overwrite

step "2/5 train configs/demo.yaml on Ray Train (run $RUN); registers models:/denoiser, --promote moves @champion"
$PY jobs/train.py --config configs/demo.yaml --name "$RUN" --promote

step "3/5 nightly denoise of a demo drop (a tar + loose images, with references) -> $B/denoised/demo/$DATE"
$PY -c "import sys; from pipeline.archives import build_demo_inputs; from pipeline.settings import load_settings; \
build_demo_inputs(sys.argv[1], load_settings())" "$B/incoming/demo"
$PY jobs/denoise.py "$B/incoming/demo/noisy" "$B/denoised/demo" --model models:/denoiser@champion \
    --reference "$B/incoming/demo/clean" --date "$DATE" $DENOISE_FLAGS

step "4/5 the same night again: everything is skipped"
$PY jobs/denoise.py "$B/incoming/demo/noisy" "$B/denoised/demo" --model models:/denoiser@champion \
    --reference "$B/incoming/demo/clean" --date "$DATE" $DENOISE_FLAGS

step "5/5 evaluate the model against classic denoisers -> reports/demo"
evaluate

step "done"
echo "MLflow UI:      ${MLFLOW_TRACKING_URI}  (experiments denoise-demo, batch-denoise, evaluation)"
echo "dataset:        $B/datasets/demo"
echo "denoised:       $B/denoised/demo/$DATE"
echo "report:         reports/demo/summary.md"
