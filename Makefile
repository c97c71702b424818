# lora-rs: every target provisions libtorch (PyTorch 2.13.0 from the package registry, once,
# into ~/.cache/lora-rs) through scripts/env.sh, which `source scripts/env.sh` gives plain
# cargo commands too.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV := source scripts/env.sh

.PHONY: test demo demo-sdxl demo-flux provision fmt clippy bench

provision:
	@$(ENV) && echo "libtorch: $$(readlink .libtorch)"

test:
	@$(ENV) && set -x && \
	cargo fmt --all --check && \
	cargo clippy --workspace --all-targets -- -D warnings && \
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace && \
	cargo test --workspace

# Trains a LoRA on a tiny SD-shaped model (random base weights, created on first use) and the
# six bundled photographs, on the CPU in a few minutes; writes output/demo_lora.safetensors,
# output/loss.png, output/sample/*.png, output/metrics.jsonl and output/checkpoints/.
# Same build profile as `make test`, so one build serves both.
demo:
	@$(ENV) && cargo run --profile test -p lora-examples --example train_network -- \
		--config examples/demo/train.toml --output_dir output $(DEMO_ARGS)

# The same with a tiny SDXL-shaped model (two text encoders, size conditioning, kohya's SGM
# LoRA names): output/sdxl/.
demo-sdxl:
	@$(ENV) && cargo run --profile test -p lora-examples --example train_network -- \
		--config examples/demo/train_sdxl.toml --output_dir output/sdxl $(DEMO_ARGS)

# The same with a tiny FLUX.1-dev-shaped model (flow matching, T5 + CLIP-L, 16-channel
# latents, kohya's BFL LoRA names): output/flux/.
demo-flux:
	@$(ENV) && cargo run --profile test -p lora-examples --example train_network -- \
		--config examples/demo/train_flux.toml --output_dir output/flux $(DEMO_ARGS)

fmt:
	@$(ENV) && cargo fmt --all

bench:
	@$(ENV) && cargo bench -p lora-benches
