#!/usr/bin/env bash
# Fetch, here (where pip reaches the registry), the wheels that the GPU machine lacks, for its Python 3.12:
# pydantic and its parts (the engine's config), and transformers at the version this repository is tested
# with (the machine's image holds an older one). They land in .gpu_payload/wheels (git-ignored); the device
# call carries that folder and hands it to the check:
#
#   benchmarks/gpu_payload.sh                        # here, once; about 15 MB
#   EMLLM_WHEELS=.gpu_payload/wheels benchmarks/gpu_check.sh "$OUT"     # there, carry: [".gpu_payload"]
#
# Versions are read from the Python given as $PYTHON (default .venv/bin/python): the ones the tests passed on.
# PAYLOAD_PYTHON=3.11 fetches for this machine's Python instead (a CPU dry run of the wheels stage).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST=.gpu_payload/wheels
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions transformers)

rm -rf "$DEST" && mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PAYLOAD_PYTHON:-3.12}" \
        --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$name==$version"
done
ls -l "$DEST"
du -sh "$DEST"
