#!/usr/bin/env bash
# The prepared GPU check of the training at scale (bench/gpu_check.py lists what it measures):
# ViT-g/14 (1 GPU, no communication: FSDP in one process; with and without activation
# checkpointing, the student kept gathered or resharded, real tiles + ColorAugment in the step)
# and ViT-B/14 train steps with MFU (model and with recompute), allocated and reserved peak
# memory, the SDPA kernel and host syncs per step; ColorAugment on the GPU, the full data
# pipeline feeding the GPU, and preemption / resume / export through `accelerate launch
# --use_fsdp`. Each check is time-boxed (gpu_check.py's TIMEOUTS: under 480 s together on the
# GPU), so the whole run fits the device's 540 s on one H100/H200.
#
# A session with a GPU machine runs exactly these two commands:
#   1. here, on the CPU machine (shards from the sample tissue + wheels missing there, ~25 MB):
#        bench/gpu_check.sh --prepare
#   2. the device tool's `run` with
#        command:   bench/gpu_check.sh
#        carry:     [".gpu-check"]
#        timeout_s: 540
# The results come back as files: gpu_check.json, gpu_check.md (the table for BENCHMARKS.md,
# section "Training step") and gpu_check.log. The first two are rewritten after every check: a
# run stopped at the limit still returns every check done so far (and the one it was in).
#
#   bench/gpu_check.sh --cpu          # dry run here: the same checks with tiny models on the
#                                     # CPU (after --prepare), results in .gpu-check/out-cpu/
#   bench/gpu_check.sh --cpu --bare   # the same with every package the GPU image lacks made
#                                     # unimportable (bench/bare_image.py): what the GPU meets
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
prep=.gpu-check  # ignored by git; carried to the GPU machine
# Pure-Python packages midnight_train imports that the GPU machine's image lacks (its image has
# torch, timm, accelerate, safetensors, pillow, numpy, fsspec, click, tqdm, pyyaml, sklearn).
mapfile -t wheels < <(grep -v '^#' bench/gpu_check_wheels.txt | grep .)

prepare() {
    local py=.venv/bin/python slides
    slides=$(mktemp -d)
    trap 'rm -rf "$slides"' RETURN
    rm -rf "$prep/data" "$prep/whl"
    mkdir -p "$prep"
    echo "== sample tissue: the CMU slide + synthetic 40x/20x pyramids of it"
    $py -c "import sys; from midnight_prep.samples import write_demo_slides; write_demo_slides(sys.argv[1])" "$slides"
    cp "$($py -c 'from midnight_prep.samples import cmu_small_region; print(cmu_small_region())')" "$slides/"
    echo "== 800 tiles of 256 px at 1 and 0.5 µm/px, 16 shards"
    set +e
    .venv/bin/midnight-prep build "$slides" --output "$prep/data" --mpp 1,0.5 --tile-size 256 \
        --tiles-per-slide 200 --shard-size 50 --workers 2
    local status=$?
    set -e
    [ $status -le 1 ] || exit $status  # 1: some magnification was short; the shards are there
    echo "== wheels for Python 3.12 (the GPU machine's): ${wheels[*]}"
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$prep/whl" "${wheels[@]}"
    du -sh "$prep"
    echo "ready: now the device tool's run with command bench/gpu_check.sh, carry [\"$prep\"]," \
         "timeout_s 540"
}

case "${1:-}" in
    --prepare)
        prepare
        exit 0 ;;
    --cpu)
        [ -d "$prep/data" ] || { echo "run bench/gpu_check.sh --prepare first" >&2; exit 2; }
        out="$prep/out-cpu"
        mkdir -p "$out"
        export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        if [ "${2:-}" = --bare ]; then
            .venv/bin/python bench/bare_image.py "$prep/bare"
            export PYTHONPATH="$root/$prep/bare${PYTHONPATH:+:$PYTHONPATH}"
        fi
        .venv/bin/python bench/gpu_check.py --cpu --out "$out" --data "$prep/data" \
            2>&1 | tee "$out/gpu_check.log"
        exit "${PIPESTATUS[0]}" ;;
    "") ;;
    *)
        echo "usage: bench/gpu_check.sh [--prepare | --cpu [--bare]]" >&2
        exit 2 ;;
esac

# On the GPU machine: midnight is not installed there; it runs from this tree.
[ -d "$prep/data" ] && [ -d "$prep/whl" ] || {
    echo "no $prep/data or $prep/whl: run bench/gpu_check.sh --prepare on the CPU machine and" \
         "carry $prep" >&2
    exit 2
}
out=${OUT:-$prep/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$prep"/whl/*.whl
export PYTHONPATH="$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi || true; python3 -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"; } 2>&1 | tee "$out/gpu_check.log"
python3 bench/gpu_check.py --out "$out" --data "$prep/data" 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
