#!/usr/bin/env bash
# The one prepared script for a lent GPU: the correctness check, then every benchmark on the
# device, each step bounded in time so that one slow step cannot eat the others' budget.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine (OUT names a log folder)
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_session.sh   # tiny sizes, to test the script here
#
# Missing Python packages travel as wheels in .whl/ (see the device notes); the package runs
# from src/ without installing. Every step's output goes to $OUT/gpu_session.log.
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-build/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
PY=${PY:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== rc=${PIPESTATUS[0]} $title" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  nproc; } 2>&1 | tee -a "$LOG"

if [ "${SMOKE:-0}" = 1 ]; then
    step 300 gpu_check $PY benchmarks/gpu_check.py --device "$DEVICE"
    step 300 bench_gradcam $PY benchmarks/bench_gradcam.py --device "$DEVICE" --slices 2 \
        --size 32 --volume 16 --methods-batch 2 --methods-size 32 --repeats 1
    step 300 bench_windows $PY benchmarks/bench_windows.py --device "$DEVICE" --size 48 \
        --window 16 --repeats 1
    step 300 bench_widget_volume $PY benchmarks/bench_widget_volume.py --device "$DEVICE" \
        --size 64 --batch 8 --workdir "$OUT/widget"
    step 300 profile_explain $PY benchmarks/profile_explain.py --device "$DEVICE" --window 16 \
        --batch 2 --rows 5
else
    STEPS=${STEPS:-check gradcam windows profile widget}  # a subset reruns only those
    for name in $STEPS; do
        case $name in
        check) step 120 gpu_check $PY benchmarks/gpu_check.py --device "$DEVICE" ;;
        gradcam) step 150 bench_gradcam $PY benchmarks/bench_gradcam.py --device "$DEVICE" ;;
        windows)
            step 60 bench_windows_96 $PY benchmarks/bench_windows.py --device "$DEVICE" \
                --size 96 --repeats 5
            step 60 bench_windows_256 $PY benchmarks/bench_windows.py --device "$DEVICE" \
                --size 256 --window 64 --batch 16 --repeats 3 ;;
        profile) step 60 profile_explain $PY benchmarks/profile_explain.py --device "$DEVICE" ;;
        widget) step 150 bench_widget_volume $PY benchmarks/bench_widget_volume.py \
            --device "$DEVICE" --size 512 --batch 16 --threads 8 --workdir /tmp/widget ;;
        *) echo "unknown step $name" | tee -a "$LOG" ;;
        esac
    done
fi
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$LOG"
