#!/usr/bin/env bash
# The GPU benchmark in one script, for a machine with an NVIDIA GPU that reaches no registry:
#
#   bench/gpu.sh stash     move the parts carried in this run (.whl/parts/) to $PAYLOAD; exit
#   bench/gpu.sh verify    stash, then join the parts and check their SHA-256 (no install)
#   bench/gpu.sh OUTDIR    stash, join, check, install onnxruntime-gpu into $SITE, point
#                          LD_LIBRARY_PATH at the pip CUDA libraries, then bench/gpu.py: prepare
#                          the default model at fp16, write synthetic 1B and 8B Llama GGUFs, and
#                          measure decode at batch 1, 8, 32, 64, prefill and the TTFT of a
#                          1000-token prompt, against the HBM bound and transformers; JSON in OUTDIR
#   DEVICE=cpu bench/gpu.sh OUTDIR
#                          the same benchmark on the CPU provider with small settings (the tiny
#                          shape, batches 1 and 4): how this script is checked without a GPU
#
# The parts come from bench/gpu_wheel.sh (README "GPU" says how they travel). GPU_ARGS adds
# options to bench/gpu.py (e.g. GPU_ARGS="--shapes llama-3.2-1b --no-hf" for a shorter run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${DEVICE:-cuda}
PAYLOAD=${PAYLOAD:-/tmp/localchat-payload}
SITE=${SITE:-/tmp/localchat-site}
DATA=${DATA:-/tmp/localchat-data}
MODE=${1:?usage: bench/gpu.sh stash|verify|OUTDIR}

if [ "$DEVICE" = cpu ] && [ "$MODE" != stash ] && [ "$MODE" != verify ]; then
  OUT=$(realpath -m "$MODE")
  mkdir -p "$OUT"
  # shellcheck disable=SC2086  # GPU_ARGS is a list of options
  exec "${PYTHON:-$ROOT/.venv/bin/python}" bench/gpu.py --out "$OUT" --device cpu --shapes llama-tiny \
    --batches 1,4 --tokens 8 --prompt 200 --chunk 64 --rounds 1 ${GPU_ARGS:-}
fi

PY=${PYTHON:-python3}
mkdir -p "$PAYLOAD"
if compgen -G ".whl/parts/part-*" >/dev/null; then mv .whl/parts/part-* "$PAYLOAD/"; fi
if [ -f .whl/parts/SHA256 ]; then cp .whl/parts/SHA256 "$PAYLOAD/SHA256"; fi
echo "payload parts in $PAYLOAD: $(cd "$PAYLOAD" && ls part-* 2>/dev/null | tr '\n' ' ')"
[ "$MODE" = stash ] && exit 0

if [ ! -f "$SITE/.installed" ]; then
  [ -f "$PAYLOAD/SHA256" ] || { echo "no SHA256 in $PAYLOAD: carry .whl/parts/SHA256 too" >&2; exit 2; }
  cat "$PAYLOAD"/part-* > "$PAYLOAD/payload.tar"
  if ! (cd "$PAYLOAD" && sha256sum --quiet -c SHA256); then
    echo "the joined parts do not match SHA256: a part is missing or stale ($(ls "$PAYLOAD"/part-* | wc -l) here)" >&2
    rm -f "$PAYLOAD/payload.tar"
    exit 2
  fi
  echo "payload complete: $(du -h "$PAYLOAD/payload.tar" | cut -f1)"
  if [ "$MODE" = verify ]; then rm -f "$PAYLOAD/payload.tar"; exit 0; fi
  mkdir -p "$PAYLOAD/x" "$DATA/gguf"
  tar -xf "$PAYLOAD/payload.tar" -C "$PAYLOAD/x"
  rm -f "$PAYLOAD/payload.tar"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$PAYLOAD"/x/wheels/*.whl
  cp "$PAYLOAD"/x/gguf/*.gguf "$DATA/gguf/"
  touch "$SITE/.installed"
fi
[ "$MODE" = verify ] && exit 0

OUT=$(realpath -m "$MODE")
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# onnxruntime-gpu loads libcudart, libcublas, libcudnn... by name: the pip nvidia packages' folders.
NV_LIBS=$("$PY" - <<'PYEOF'
import glob, os, site
found = {os.path.dirname(f) for base in site.getsitepackages()
         for f in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(found)))
PYEOF
)
export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())' \
  | tee "$OUT/onnxruntime.txt"
set -o pipefail
# shellcheck disable=SC2086  # GPU_ARGS is a list of options
"$PY" bench/gpu.py --out "$OUT" --data-dir "$DATA" --device cuda ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
