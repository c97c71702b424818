# lora-rs: every target provisions libtorch (PyTorch 2.13.0 from the package registry, once,
# into ~/.cache/lora-rs) through scripts/env.sh, which `source scripts/env.sh` gives plain
# cargo commands too.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV := source scripts/env.sh

.PHONY: test demo provision fmt clippy bench

provision:
	@$(ENV) && echo "libtorch: $$(readlink .libtorch)"

test:
	@$(ENV) && set -x && \
	cargo fmt --all --check && \
	cargo clippy --workspace --all-targets -- -D warnings && \
	cargo test --workspace

# Placeholder until the trainer (issue 8) lands: says so and fails, rather than pretend.
demo:
	@echo "make demo: not available yet: the kohya-style trainer (issue 8) has not landed." >&2
	@echo "What works today is listed under Status in README.md; run 'make test'." >&2
	@exit 1

fmt:
	@$(ENV) && cargo fmt --all

bench:
	@$(ENV) && cargo bench -p lora-benches
