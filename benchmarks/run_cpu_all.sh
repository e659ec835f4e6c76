#!/usr/bin/env bash
# Every CPU benchmark of docs/performance.md, one after the other, into benchmarks/results/cpu_<date>.txt.
#
#   benchmarks/run_cpu_all.sh            # about 25 minutes on 2 cores; THREADS=1 for one thread
#
# Each command is also runnable alone (see benchmarks/README.md). The optimised minisd sides are
# minisd.speed's fuse_projections and channels_last, measured against the plain model in the same run.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
OUT=${OUT:-benchmarks/results/cpu_$(date -u +%Y-%m-%d).txt}
export OMP_NUM_THREADS=$THREADS PYTHONPATH=src
OPTS="fused;channels_last;fused,channels_last"
run() {
    echo -e "\n### $*\n" | tee -a "$OUT"
    "$PY" "$@" 2>/dev/null | tee -a "$OUT"
}
{
    echo "# CPU benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $THREADS threads"
    uptime
    "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT"
B=benchmarks
run $B/bench_components.py --threads "$THREADS" --components unet --unet-size 32 --batch 2 --minisd-opts "$OPTS"
run $B/bench_components.py --threads "$THREADS" --components unet --unet-size 64 --batch 2 --repeats 4 \
    --minisd-opts "fused,channels_last"
run $B/bench_components.py --threads "$THREADS" --components vae --vae-size 64 --batch 1 --repeats 4 \
    --minisd-opts "$OPTS"
run $B/bench_components.py --threads "$THREADS" --components clip --text sd1 --batch 2
run $B/bench_components.py --threads "$THREADS" --components clip --text sdxl --batch 2 --no-memory
run $B/bench_components.py --threads "$THREADS" --components unet --unet-config sdxl --unet-size 64 --batch 2 \
    --repeats 3 --no-memory --minisd-opts "fused,channels_last"
run $B/bench_load.py --sides minisd,diffusers,minisd-fp16vae --rounds 3
run $B/bench_tiny.py --threads "$THREADS" --minisd-opts "fused;fused,channels_last"
uptime | tee -a "$OUT"
