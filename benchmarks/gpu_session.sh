#!/usr/bin/env bash
# The GPU measurements (benchmarks/gpu.py, benchmarks/gpu_train.py and the CUDA tests) on a lent GPU machine whose
# python3 holds a CUDA PyTorch but no registry: what emalign needs beyond that image travels as wheels.
#
#   bash benchmarks/gpu_session.sh wheels      # here, in the project's venv: .whl/ at this venv's versions, .shared -> ../shared
#   bash benchmarks/gpu_session.sh measure     # there, carrying .whl: the CUDA tests, then benchmarks/gpu.py
#   bash benchmarks/gpu_session.sh train       # there, carrying .whl and .shared/data/flyem_medulla_training_sample{1,2}.tif
#
# Options after measure / train go to gpu.py / gpu_train.py (a later option wins: `train --minutes 3`). Results (logs,
# gpu.md, gpu_train.md, the new weights) go to $OUT, the folder that comes back from the device, or to ./gpu-session.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime needs of emalign that the device image lacks, or holds at another version than the one tested here.
NEEDED="zarr numcodecs donfig google-crc32c dask distributed partd locket tblib zict tornado cloudpickle toolz fsspec
pydantic pydantic_core pydantic-zarr annotated-types typing-inspection ome-zarr-models typing_extensions"
PLATFORMS="manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64"
FLYEM_SAMPLES=".shared/data/flyem_medulla_training_sample1.tif .shared/data/flyem_medulla_training_sample2.tif"
OUT="${OUT:-$PWD/gpu-session}"

fetch_wheels() {
    local exclude=.git/info/exclude pins platform_flags=()
    mkdir -p "$(dirname "$exclude")" && touch "$exclude"
    for path in /.whl/ /.shared /gpu-session/; do grep -qxF "$path" "$exclude" || echo "$path" >> "$exclude"; done
    [ -e .shared ] || [ ! -d ../shared ] || ln -s ../shared .shared
    # shellcheck disable=SC2086  # NEEDED and pins: one name a word
    pins=$(python - $NEEDED <<'PY'
import importlib.metadata as metadata, sys
try:
    print(*(f"{name}=={metadata.version(name)}" for name in sys.argv[1:]))
except metadata.PackageNotFoundError as error:
    sys.exit(f"gpu_session.sh wheels: {error.name} is not installed here; run it in the project's venv")
PY
)
    for platform in $PLATFORMS; do platform_flags+=(--platform "$platform"); done
    rm -rf .whl
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_flags[@]}" -d .whl $pins
    echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl; FlyEM samples for 'train': $FLYEM_SAMPLES"
}

install_wheels() {
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
      python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
    } | tee "$OUT/device.txt"
}

case "${1:-}" in
    wheels)
        fetch_wheels ;;
    measure)
        install_wheels
        python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_spectral_device.py tests/test_device.py \
            2>&1 | tee "$OUT/tests.log" || true
        python3 benchmarks/gpu.py --out "$OUT/gpu.md" "${@:2}" 2>&1 | tee "$OUT/gpu.log" ;;
    train)
        install_wheels
        python3 benchmarks/gpu_train.py --minutes 4 --data-dir .shared/data --out "$OUT/gpu_train.md" \
            --weights "$OUT/faemreg-wide.pt" "${@:2}" 2>&1 | tee "$OUT/gpu_train.log" ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh wheels | measure [GPU.PY OPTIONS] | train [GPU_TRAIN.PY OPTIONS]" >&2
        exit 2 ;;
esac
