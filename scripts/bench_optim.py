"""Side-by-side reference for `benches/benchmarks/optim.rs`: one optimizer step over the full
SD 1.5 kohya LoRA adapter set at rank 32 (192 U-Net + 72 CLIP-L modules, 528 f32 tensors,
18,874,368 elements) with fixed random gradients, CPU, in the Python reference
implementations on the same libtorch (torch 2.13.0):

- torch.optim.AdamW: foreach=False (single-tensor, what lora-optim's AdamW replicates),
  foreach=True (PyTorch's default on CPU is foreach=False; foreach is the multi-tensor path),
  fused=True (the CPU fused kernel);
- transformers' Adafactor (defaults: relative_step, scale_parameter, as lora-optim's);
- bitsandbytes AdEMAMix (32-bit), AdamW8bit, AdEMAMix8bit: all three run on CPU in
  bitsandbytes 0.50 (`backends/cpu/ops.py`): the 32-bit update is a torch-op sequence, the
  8-bit one dequantizes both states to f32, updates with torch ops and requantizes them
  (native block-wise quantize); numerically that is not the CUDA kernel lora-optim replicates,
  but it is the same amount of work per element. A reference that fails to run prints its
  error instead of a time.

The adapter shapes come from the real modules (diffusers' UNet2DConditionModel and
transformers' CLIPTextModel built on the meta device, kohya's targeting rule as in
lora-core/tests/fixtures/names/gen.py); the script checks that they add up to the element count
the Rust benchmark used. Our numbers (medians) are read from criterion's
`<criterion dir>/cpu_f32_optim_step/<name>/kohya_r32/new/estimates.json`, the criterion dir
being --criterion-dir, else $CRITERION_HOME, else target/criterion. Run the Rust side first,
then this, back to back (a private CRITERION_HOME keeps other people's bench runs from
overwriting the numbers in between):

    export CRITERION_HOME=/tmp/optim_criterion
    cargo bench --profile dev --bench bench_main -p lora-benches -- optim
    ~/.cache/lora-rs/torch-2.13.0/bin/python scripts/bench_optim.py [--steps 20] [--threads N]

Each reference runs --warmup steps, then --steps timed steps or --budget seconds of them
(at least 3), and reports the median.

Values (not shapes) of parameters and gradients differ from the Rust side's (same
distributions: N(0, 0.01^2) weights, N(0, 1e-3^2) gradients); step cost does not depend on them.
"""

import argparse
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RANK = 32
NUMEL = 18_874_368
LR = 1e-4
GROUP = "cpu_f32_optim_step"

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")


def kohya_targets(model, classes_targeted):
    """Weights of every Linear / Conv2d below a module of a targeted class (kohya's rule)."""
    classes = {n: type(m).__name__ for n, m in model.named_modules()}
    out = []
    for name, m in model.named_modules():
        if type(m).__name__ not in ("Linear", "Conv2d"):
            continue
        parts = name.split(".")
        if any(classes[".".join(parts[:k])] in classes_targeted for k in range(1, len(parts))):
            out.append((name, tuple(m.weight.shape)))
    return out


def adapter_shapes(rank):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    unet_t = kohya_targets(unet, {"Transformer2DModel"})
    te_t = kohya_targets(te, {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
    assert (len(unet_t), len(te_t)) == (192, 72), (len(unet_t), len(te_t))
    shapes = []
    for _, w in unet_t + te_t:
        out_f, in_f, *k = w  # Linear [out, in]; Conv2d [out, in, kh, kw]
        shapes.append((rank, in_f, *k))
        shapes.append((out_f, rank, *[1] * len(k)))
    numel = sum(torch.Size(s).numel() for s in shapes)
    assert numel == NUMEL, f"{numel} elements, the Rust benchmark has {NUMEL}"
    return shapes


def ours(criterion_dir, name):
    """Median ms/step of our criterion run, or None."""
    path = os.path.join(criterion_dir, GROUP, name, f"kohya_r{RANK}", "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] / 1e6
    except OSError:
        return None


def time_steps(make, shapes, warmup, steps, budget_s):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    opt = make(params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and sum(times) > budget_s:
            break
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds of timed steps per reference: stop early (after >= 3 steps) past it")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="libtorch intra-op threads (default: libtorch's default, as the Rust side)")
    ap.add_argument("--criterion-dir",
                    default=os.environ.get("CRITERION_HOME", os.path.join(ROOT, "target", "criterion")))
    ap.add_argument("--only", default="",
                    help="comma-separated names of ours: only their rows (e.g. lora_adamw,tch_adamw)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    shapes = adapter_shapes(RANK)
    print(f"SD 1.5 kohya r{RANK}: {len(shapes)} tensors, {NUMEL} elements, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, bnb {bnb.__version__}")

    adamw = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    # (reference label, constructor, our criterion name)
    rows = [
        ("torch AdamW foreach=False", lambda p: torch.optim.AdamW(p, foreach=False, **adamw), "lora_adamw"),
        ("torch AdamW foreach=True", lambda p: torch.optim.AdamW(p, foreach=True, **adamw), "lora_adamw"),
        ("torch AdamW fused=True", lambda p: torch.optim.AdamW(p, fused=True, **adamw), "lora_adamw"),
        ("torch AdamW foreach=False", lambda p: torch.optim.AdamW(p, foreach=False, **adamw), "tch_adamw"),
        ("transformers Adafactor", lambda p: Adafactor(p, lr=None), "lora_adafactor"),
        ("bnb AdEMAMix (32-bit)", lambda p: bnb.optim.AdEMAMix(p, lr=LR, optim_bits=32), "lora_ademamix"),
        ("bnb AdamW8bit", lambda p: bnb.optim.AdamW8bit(p, **adamw), "lora_adamw8bit"),
        ("bnb AdEMAMix8bit", lambda p: bnb.optim.AdEMAMix8bit(p, lr=LR), "lora_ademamix8bit"),
    ]
    if args.only:
        rows = [r for r in rows if r[2] in args.only.split(",")]
    # Read once, before the Python runs: a later bench run must not change the rows.
    mine_all = {name: ours(args.criterion_dir, name) for _, _, name in rows}
    cache = {}
    print("\n| reference | ref ms/step | ours | ours ms/step | ours / ref |")
    print("|---|---:|---|---:|---:|")
    for label, make, name in rows:
        if label not in cache:
            try:
                cache[label] = f"{time_steps(make, shapes, args.warmup, args.steps, args.budget):.1f}"
            except Exception as e:  # noqa: BLE001 - report why a reference does not run on CPU
                cache[label] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        ref = cache[label]
        mine = mine_all[name]
        mine_s = "not run" if mine is None else f"{mine:.1f}"
        ratio = f"{mine / float(ref):.2f}" if mine is not None and not ref.startswith("n/a") else "-"
        print(f"| {label} | {ref} | {name} | {mine_s} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
