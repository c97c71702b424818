//! Gradient checkpointing of the U-Net: the same gradients as the plain path, and a lower
//! peak memory (measured in child processes, so concurrent tests do not disturb the numbers).

use lora_core::PlainLayers;
use lora_models::{Checkpointing, DiffusersFolder, UNet2DConditionModel, UNetConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::common::{fixture, get, io};

/// All gradients of the fixture U-Net for one loss, in `mode`.
fn unet_grads(mode: Checkpointing) -> Vec<(String, Tensor)> {
    let (cfg, sd) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    unet.set_gradient_checkpointing(mode);
    let io = io();
    let sample = get(&io, "sd15.unet.sample").set_requires_grad(true);
    let out = unet.forward(
        &sample,
        &get(&io, "sd15.unet.timestep"),
        &get(&io, "sd15.unet.encoder_hidden_states"),
        true,
    );
    let w =
        Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu)).view_as(&out);
    (out * w).sum(Kind::Float).backward();
    let mut grads: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, v)| (k, v.grad())).collect();
    grads.push(("<sample>".into(), sample.grad()));
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

#[test]
fn checkpointed_unet_gradients_equal_plain_ones() {
    let plain = unet_grads(Checkpointing::Off);
    let ckpt = unet_grads(Checkpointing::On);
    assert_eq!(plain.len(), ckpt.len());
    let mut nonzero = 0;
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        assert!(a.defined() && b.defined(), "{name}: no gradient");
        // Tolerance: 1e-5 of the gradient's scale (the recomputation runs the same kernels).
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        let err = (a - b).abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "{name}: {err:e} vs scale {scale:e}");
        nonzero += usize::from(scale > 1e-12);
    }
    assert!(nonzero > plain.len() / 2, "most gradients should be nonzero");
}

/// A U-Net whose activations dwarf its weights: 32x32 latents, attention at every level.
fn probe_config() -> UNetConfig {
    UNetConfig {
        block_out_channels: vec![32, 64],
        down_block_types: vec![lora_models::DownBlockType::CrossAttnDownBlock2D; 2],
        up_block_types: vec![lora_models::UpBlockType::CrossAttnUpBlock2D; 2],
        layers_per_block: 1,
        num_attention_heads: vec![4, 4],
        cross_attention_dim: 32,
        ..UNetConfig::sd15()
    }
}

/// Child-process body: one training step, then prints its peak RSS above the process's
/// resident size before the step.
#[test]
#[ignore = "run by `checkpointing_lowers_peak_memory` in a child process"]
fn memory_probe() {
    let Ok(mode) = std::env::var("LORA_MODELS_PROBE") else { return };
    let mode = if mode == "on" { Checkpointing::On } else { Checkpointing::Off };
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vs.root(), &probe_config(), &PlainLayers).unwrap();
    unet.set_gradient_checkpointing(mode);
    let sample = Tensor::randn([2, 4, 32, 32], (Kind::Float, Device::Cpu));
    let ctx = Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu));
    let before = status_kb("VmRSS:");
    let out = unet.forward(&sample, &Tensor::from_slice(&[10i64, 500]), &ctx, true);
    out.square().mean(Kind::Float).backward();
    // The step's own peak: the high-water mark above the resident size before it.
    println!("PEAK_KB={}", status_kb("VmHWM:").saturating_sub(before));
}

/// A `/proc/self/status` field in KiB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn probe(mode: &str) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "checkpointing::memory_probe",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LORA_MODELS_PROBE", mode)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.split("PEAK_KB=").nth(1)).unwrap_or_else(|| {
        panic!("probe {mode} printed no peak: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    line.trim().parse().unwrap()
}

#[test]
#[cfg(target_os = "linux")]
fn checkpointing_lowers_peak_memory() {
    let plain = probe("off");
    let ckpt = probe("on");
    eprintln!("training-step peak RSS above the model: plain {plain} KiB, checkpointed {ckpt} KiB");
    // The plain step keeps every block's activations; the checkpointed one only the block
    // inputs (and one block's activations at a time during backward). Require >= 25% less.
    assert!(ckpt * 4 <= plain * 3, "checkpointed {ckpt} KiB vs plain {plain} KiB");
}
