#!/usr/bin/env bash
# Provision the libtorch that tch 0.26 links against: PyTorch 2.13.0 from the package
# registry, installed once into a virtual environment in a per-user cache directory
# (outside the repository, so every clean clone and CI run reuses it).
#
# Idempotent: a complete install is recognised by a stamp file and costs nothing.
# Prints the venv path on stdout (and nothing else), so callers can do
#   venv=$(scripts/provision.sh)
#
# Environment:
#   LORA_RS_CACHE       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/lora-rs)
#   LORA_RS_PYTHON      python used to create the venv (default: python3)
#   LORA_RS_TORCH_INDEX extra pip args, e.g. "--index-url <mirror>" (default: none)
set -euo pipefail

TORCH_VERSION=2.13.0
cache=${LORA_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-rs}
venv="$cache/torch-$TORCH_VERSION"
stamp="$venv/.lora-rs-complete"
python=${LORA_RS_PYTHON:-python3}

if [ -f "$stamp" ]; then
    echo "$venv"
    exit 0
fi

mkdir -p "$cache"
# One provisioner at a time (parallel `make` invocations, helpers, CI).
exec 9>"$cache/.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [ -f "$stamp" ]; then
    echo "$venv"
    exit 0
fi

echo "lora-rs: installing torch==$TORCH_VERSION into $venv (one time, ~5 GB)" >&2
rm -rf "$venv"
"$python" -m venv "$venv" >&2
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    ${LORA_RS_TORCH_INDEX:-} "torch==$TORCH_VERSION" >&2
"$venv/bin/python" -W ignore - >&2 <<'PY'
import torch, os
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
assert os.path.exists(os.path.join(lib, "libtorch_cpu.so")), lib
print("lora-rs: torch", torch.__version__, "at", os.path.dirname(torch.__file__))
PY
touch "$stamp"
echo "$venv"
