# shellcheck shell=bash
# Source this file to run the fixture generators (`*/tests/fixtures/*/gen.py`) and the Python
# side of the side-by-side benchmarks: scripts/env.sh, plus the pinned reference libraries of
# scripts/requirements-fixtures.txt installed into the same venv (once per requirements hash).
# Tests and CI do not need this: the fixtures are committed.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" || return 1
_lora_rs_req="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/requirements-fixtures.txt"
_lora_rs_stamp="$LORA_RS_VENV/.fixtures-$(sha256sum "$_lora_rs_req" | cut -c1-16)"
if [ ! -f "$_lora_rs_stamp" ]; then
    echo "lora-rs: installing the fixture reference libraries into $LORA_RS_VENV" >&2
    "$LORA_RS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$_lora_rs_req" >&2 && touch "$_lora_rs_stamp"
fi
unset _lora_rs_req _lora_rs_stamp
