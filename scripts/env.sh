# shellcheck shell=bash
# Source this file (`source scripts/env.sh`) to give plain `cargo build/test/run/bench` the
# environment the Makefile uses: provisions PyTorch 2.13.0 if needed (scripts/provision.sh),
# points the repository's `.libtorch` link at it (read by .cargo/config.toml), and puts the
# venv's python (with torch, for the fixture scripts) first on PATH.
_lora_rs_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if _lora_rs_venv=$("$_lora_rs_root/scripts/provision.sh"); then
    _lora_rs_torch=$(echo "$_lora_rs_venv"/lib/python3*/site-packages/torch)
    if [ "$(readlink "$_lora_rs_root/.libtorch" 2>/dev/null)" != "$_lora_rs_torch" ]; then
        ln -sfn "$_lora_rs_torch" "$_lora_rs_root/.libtorch"
    fi
    # .cargo/config.toml's LIBTORCH only applies when the variable is unset; tch's other
    # discovery switches would pick a different libtorch.
    unset LIBTORCH LIBTORCH_USE_PYTORCH LIBTORCH_LIB LIBTORCH_INCLUDE
    case ":$PATH:" in *":$_lora_rs_venv/bin:"*) ;; *) export PATH="$_lora_rs_venv/bin:$PATH" ;; esac
    export LORA_RS_VENV="$_lora_rs_venv"
else
    echo "lora-rs: provisioning libtorch failed (see above)" >&2
    false
fi
unset _lora_rs_root _lora_rs_venv _lora_rs_torch
