#!/usr/bin/env bash
# GPU check of lora-core's NCCL backend (lora-core/native/README.md, "NCCL"). Run on a machine
# with a CUDA GPU; on this project's CPU machines the NCCL tests are #[ignore]d and only the
# "NCCL unavailable" error path runs.
#
#   scripts/gpu_check_nccl.sh            # builds with cargo, then runs the checks
#   LORA_RS_DIST_TEST_BIN=path/to/dist-<hash> scripts/gpu_check_nccl.sh
#                                        # runs an already built `--test dist` binary
#
# Checks, in order (stops at the first failure):
#   1. nccl_unavailable_is_a_config_error: a CUDA device index that does not exist is
#      Error::Config before any rendezvous (on a GPU machine: "CUDA device 4096 does not exist").
#   2. nccl_single_rank_group: an NCCL group of one on cuda:0; all_reduce / start+wait /
#      broadcast / barrier on a CUDA tensor leave it unchanged (also exercises the
#      ProcessGroupNCCL layout check of dist_nccl.cpp).
#   3. nccl_two_ranks_equal_one_process (needs >= 2 GPUs: NCCL refuses two ranks on one
#      device): 2 processes on cuda:0 / cuda:1 with LORA_RS_DIST_DEVICE=cuda train the toy
#      model to the same adapters as 1 process on cuda:0, to 1e-5, plain and fused backward.
#      Skipped (and said so) with a single GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
echo "gpu_check_nccl: ${gpus} GPU(s) visible"
if [ "${gpus}" -lt 1 ]; then
    echo "gpu_check_nccl: FAIL: no CUDA GPU (nvidia-smi -L lists none)" >&2
    exit 2
fi

if [ -n "${LORA_RS_DIST_TEST_BIN:-}" ]; then
    run() { "${LORA_RS_DIST_TEST_BIN}" "$@"; }
else
    # shellcheck source=scripts/env.sh
    source scripts/env.sh
    cargo test -p lora-core --test dist --no-run
    run() { cargo test -p lora-core --test dist -- "$@"; }
fi

run --exact nccl_unavailable_is_a_config_error --nocapture
run --ignored --exact nccl_single_rank_group --nocapture
if [ "${gpus}" -ge 2 ]; then
    run --ignored --exact nccl_two_ranks_equal_one_process --nocapture --test-threads 1
else
    echo "gpu_check_nccl: SKIPPED nccl_two_ranks_equal_one_process (needs 2 GPUs, found ${gpus})"
fi
echo "gpu_check_nccl: OK"
