"""Side-by-side reference for `benches/benchmarks/sd15.rs`: one LoRA training step (forward +
backward, rank 16) of the real-size SD 1.5 U-Net (random weights) on 256x256 images (32x32
latents), batch 1, CPU f32, with diffusers + PEFT on the same libtorch (torch 2.13.0), with and
without gradient checkpointing. Prints seconds per step and the process's peak RSS.

The adapted modules are kohya's 192 (every Linear / 1x1 conv of the Transformer2DModels), the
same regex the Rust benchmark uses.

Run: source scripts/fixtures-env.sh && python scripts/bench_sd15.py [--steps 3] [--checkpointing]
"""

import argparse
import resource
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

KOHYA_SD15 = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.0\."
              r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))")

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=3)
p.add_argument("--checkpointing", action="store_true")
args = p.parse_args()

torch.manual_seed(0)
unet = UNet2DConditionModel(**SD15)
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=KOHYA_SD15, init_lora_weights="gaussian"))
n = sum(1 for name, _ in unet.named_modules() if name.endswith("lora_A"))
assert n == 192, n
if args.checkpointing:
    unet.enable_gradient_checkpointing()
unet.train()
params = [p for p in unet.parameters() if p.requires_grad]
latents = torch.randn(1, 4, 32, 32)
noise = torch.randn(1, 4, 32, 32)
ctx = torch.randn(1, 77, 768)
t = torch.tensor([500])


def step():
    out = unet(latents, t, encoder_hidden_states=ctx).sample
    torch.nn.functional.mse_loss(out, noise).backward()
    for q in params:
        q.grad = None


step()  # warm-up
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
mode = "checkpointing" if args.checkpointing else "plain"
print(f"diffusers+peft sd15 r16 256px {mode}: {sum(times) / len(times):.3f} s/step "
      f"(min {min(times):.3f}, {args.steps} steps), peak RSS {peak:.2f} GiB, threads {torch.get_num_threads()}")
