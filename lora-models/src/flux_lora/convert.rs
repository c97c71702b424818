//! FLUX.1 LoRA files between kohya's layout (BFL module names, fused qkv, `lora_down` /
//! `lora_up` / `alpha`) and diffusers' PEFT layout (`transformer.<module>.lora_A` / `lora_B`,
//! separate `to_q` / `to_k` / `to_v`, no alpha), in one place, both ways, nothing dropped.
//!
//! # The module map
//!
//! | kohya (`lora_unet_` + BFL path) | diffusers (`transformer.` + path) |
//! |---|---|
//! | `double_blocks.N.img_attn.qkv` | `transformer_blocks.N.attn.{to_q,to_k,to_v}` (3 equal chunks) |
//! | `double_blocks.N.txt_attn.qkv` | `transformer_blocks.N.attn.{add_q_proj,add_k_proj,add_v_proj}` |
//! | `double_blocks.N.img_attn.proj` / `txt_attn.proj` | `...attn.to_out.0` / `...attn.to_add_out` |
//! | `double_blocks.N.img_mlp.{0,2}` / `txt_mlp.{0,2}` | `...ff.net.{0.proj,2}` / `...ff_context.net.{0.proj,2}` |
//! | `double_blocks.N.img_mod.lin` / `txt_mod.lin` | `...norm1.linear` / `...norm1_context.linear` |
//! | `single_blocks.N.linear1` | `single_transformer_blocks.N.attn.{to_q,to_k,to_v}`, `proj_mlp` (chunks `h, h, h, rest`) |
//! | `single_blocks.N.linear2` / `modulation.lin` | `...proj_out` / `...norm.linear` |
//! | `img_in`, `txt_in` | `x_embedder`, `context_embedder` |
//! | `time_in` / `vector_in` / `guidance_in` `.{in,out}_layer` | `time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}` |
//! | `final_layer.linear` | `proj_out` |
//! | `final_layer.adaLN_modulation.1` | `norm_out.linear` (up rows: BFL's (shift, scale) halves swapped to (scale, shift)) |
//!
//! Text encoders: `lora_te1_<path>` ↔ `text_encoder.<path>` (CLIP-L) and `lora_te3_<path>` ↔
//! `text_encoder_2.<path>` (T5; diffusers' `FluxPipeline` loads no T5 LoRA and its kohya
//! converter drops `lora_te3_` keys, so such a file is for ComfyUI / kohya / us).
//!
//! # The math
//!
//! A module with down `A: [r, in]`, up `B: [out, r]` and alpha `a` adds
//! `ΔW = (a / r) · B · A`. PEFT files carry no alpha (diffusers loads them with alpha = r), so
//! kohya → diffusers folds `s = a / r` into the weights, exactly as diffusers'
//! `_convert_kohya_flux_lora_to_diffusers` does: `A · s·2^k` and `B · 2^-k`, with `k` the
//! smallest power keeping `s·2^k >= 2^-k / 2` (powers of two are exact in floating point).
//! A fused module is split by chunking `B`'s rows; the shared `A` is copied to every chunk —
//! unless `B` is block-diagonal (a `split_qkv` file: rank `c·r`, block `(i, j)` zero for
//! `i != j`), in which case chunk `i` gets `A`'s rows `[i·r, (i+1)·r)` and its diagonal block,
//! rank `r` each.
//!
//! diffusers → kohya concatenates the chunks' `A_i: [r_i, in]` into `A: [R, in]`,
//! `R = Σ r_i`, and places `B_i` on the block diagonal of `B: [out, R]`; a chunk the file
//! lacks (an adapter on `to_q` / `to_v` only) is a zero block of rank 0. If every chunk has the
//! same scale `s` (files without `adapter_config.json`: `s = 1`), alpha is `s·R` and the
//! weights are copied; otherwise each `B_i` is multiplied by its `s_i` and alpha is `R`.
//! Either way `(alpha / R) · B · A` stacks the chunks' `s_i · B_i · A_i`: the delta is
//! unchanged (kohya's `convert_flux_lora.py` sets alpha = R too).
//!
//! A key that fits no module of the map is an error listing every such key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lora_core::io::{AdapterFile, Format, ModuleWeights, SavePrecision};
use lora_core::ModelPart;
use regex::Regex;
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// How a BFL module maps onto diffusers modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// One module, same weights.
    One,
    /// One module, up rows' two halves swapped (BFL (shift, scale) vs diffusers (scale, shift)).
    SwapHalves,
    /// `n` equal row chunks (fused qkv).
    Equal(usize),
    /// q / k / v of width `in` and the MLP rest (a single block's `linear1`).
    QkvMlp,
}

/// Double-block module tails: BFL, diffusers chunks, split.
const DOUBLE: &[(&str, &[&str], Split)] = &[
    ("img_mod.lin", &["norm1.linear"], Split::One),
    ("img_attn.qkv", &["attn.to_q", "attn.to_k", "attn.to_v"], Split::Equal(3)),
    ("img_attn.proj", &["attn.to_out.0"], Split::One),
    ("img_mlp.0", &["ff.net.0.proj"], Split::One),
    ("img_mlp.2", &["ff.net.2"], Split::One),
    ("txt_mod.lin", &["norm1_context.linear"], Split::One),
    ("txt_attn.qkv", &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], Split::Equal(3)),
    ("txt_attn.proj", &["attn.to_add_out"], Split::One),
    ("txt_mlp.0", &["ff_context.net.0.proj"], Split::One),
    ("txt_mlp.2", &["ff_context.net.2"], Split::One),
];

/// Single-block module tails.
const SINGLE: &[(&str, &[&str], Split)] = &[
    ("linear1", &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], Split::QkvMlp),
    ("linear2", &["proj_out"], Split::One),
    ("modulation.lin", &["norm.linear"], Split::One),
];

/// Modules outside the blocks.
const OUTER: &[(&str, &str, Split)] = &[
    ("img_in", "x_embedder", Split::One),
    ("txt_in", "context_embedder", Split::One),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", Split::One),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", Split::One),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", Split::One),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", Split::One),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", Split::One),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", Split::One),
    ("final_layer.linear", "proj_out", Split::One),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", Split::SwapHalves),
];

/// The diffusers modules and split of the transformer module at BFL `path`.
fn diffusers_of(path: &str) -> Option<(Vec<String>, Split)> {
    if let Some(&(_, d, s)) = OUTER.iter().find(|(b, _, _)| *b == path) {
        return Some((vec![d.to_owned()], s));
    }
    let (kind, rest) = path.split_once('.')?;
    let (n, tail) = rest.split_once('.')?;
    if !is_index(n) {
        return None;
    }
    let (table, prefix) = match kind {
        "double_blocks" => (DOUBLE, "transformer_blocks"),
        "single_blocks" => (SINGLE, "single_transformer_blocks"),
        _ => return None,
    };
    let &(_, ds, s) = table.iter().find(|(b, _, _)| *b == tail)?;
    Some((ds.iter().map(|d| format!("{prefix}.{n}.{d}")).collect(), s))
}

/// The BFL module, chunk index and split of the diffusers transformer module at `path`.
fn bfl_of(path: &str) -> Option<(String, usize, Split)> {
    if let Some(&(b, _, s)) = OUTER.iter().find(|(_, d, _)| *d == path) {
        return Some((b.to_owned(), 0, s));
    }
    let (kind, rest) = path.split_once('.')?;
    let (n, tail) = rest.split_once('.')?;
    if !is_index(n) {
        return None;
    }
    let (table, prefix) = match kind {
        "transformer_blocks" => (DOUBLE, "double_blocks"),
        "single_transformer_blocks" => (SINGLE, "single_blocks"),
        _ => return None,
    };
    table.iter().find_map(|&(b, ds, s)| {
        ds.iter().position(|d| *d == tail).map(|i| (format!("{prefix}.{n}.{b}"), i, s))
    })
}

/// Whether `n` is a block index written canonically (`0`, `17`; not `+1` or `01`).
fn is_index(n: &str) -> bool {
    n.parse::<usize>().is_ok_and(|i| i.to_string() == n)
}

/// The BFL path of a kohya transformer name without `lora_unet_`
/// (`double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv`).
fn bfl_of_kohya(rest: &str) -> Option<String> {
    if let Some(&(b, _, _)) = OUTER.iter().find(|(b, _, _)| b.replace('.', "_") == rest) {
        return Some(b.to_owned());
    }
    for (kind, table) in [("double_blocks", DOUBLE), ("single_blocks", SINGLE)] {
        if let Some(r) = rest.strip_prefix(kind).and_then(|r| r.strip_prefix('_')) {
            let (n, tail) = r.split_once('_')?;
            let &(b, _, _) = table.iter().find(|(b, _, _)| b.replace('.', "_") == tail)?;
            return is_index(n).then(|| format!("{kind}.{n}.{b}"));
        }
    }
    None
}

/// The module path of a kohya text-encoder name without its prefix.
fn te_path_of_kohya(part: ModelPart, rest: &str) -> Option<String> {
    static PATTERNS: std::sync::OnceLock<[Regex; 3]> = std::sync::OnceLock::new();
    let [clip, t5a, t5m] = PATTERNS.get_or_init(|| {
        [
            Regex::new(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"),
            Regex::new(r"^encoder_block_(\d+)_layer_0_SelfAttention_(q|k|v|o)$"),
            Regex::new(r"^encoder_block_(\d+)_layer_1_DenseReluDense_(wi_0|wi_1|wo)$"),
        ]
        .map(|r| r.expect("static regex"))
    });
    match part {
        ModelPart::Te1 => clip.captures(rest).and_then(|c| {
            let ok = matches!(
                (&c[2], &c[3]),
                ("self_attn", "q_proj" | "k_proj" | "v_proj" | "out_proj") | ("mlp", "fc1" | "fc2")
            );
            ok.then(|| format!("text_model.encoder.layers.{}.{}.{}", &c[1], &c[2], &c[3]))
        }),
        ModelPart::Te3 => t5a
            .captures(rest)
            .map(|c| format!("encoder.block.{}.layer.0.SelfAttention.{}", &c[1], &c[2]))
            .or_else(|| {
                t5m.captures(rest)
                    .map(|c| format!("encoder.block.{}.layer.1.DenseReluDense.{}", &c[1], &c[2]))
            }),
        _ => None,
    }
}

/// A module in kohya's layout: part, module path (BFL names for the transformer), weights.
struct Fused {
    part: ModelPart,
    path: String,
    down: Tensor,
    up: Tensor,
    alpha: f64,
}

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_kind(Kind::Float)?)
}

fn unconvertible(what: &str, items: Vec<String>) -> Error {
    Error::Unmatched { what: format!("FLUX LoRA keys with no {what} equivalent"), items }
}

/// kohya modules (keys `lora_unet_…` / `lora_te1_…` / `lora_te3_…`, as
/// [`AdapterFile::modules`] of a kohya file) in our canonical form.
fn from_kohya(modules: &BTreeMap<String, ModuleWeights>) -> Result<Vec<Fused>> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (name, m) in modules {
        let parsed = if let Some(rest) = name.strip_prefix("lora_unet_") {
            bfl_of_kohya(rest).map(|p| (ModelPart::Unet, p))
        } else if let Some(rest) = name.strip_prefix("lora_te1_") {
            te_path_of_kohya(ModelPart::Te1, rest).map(|p| (ModelPart::Te1, p))
        } else if let Some(rest) = name.strip_prefix("lora_te3_") {
            te_path_of_kohya(ModelPart::Te3, rest).map(|p| (ModelPart::Te3, p))
        } else {
            None
        };
        match parsed {
            Some((part, path)) => out.push(Fused {
                part,
                path,
                down: f32(&m.down)?,
                up: f32(&m.up)?,
                alpha: m.alpha.unwrap_or(m.rank() as f64),
            }),
            None => bad.push(name.clone()),
        }
    }
    if !bad.is_empty() {
        return Err(unconvertible("FLUX module (kohya name)", bad));
    }
    Ok(out)
}

/// One chunk of a diffusers module waiting to be fused.
struct Chunk {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

/// PEFT modules (keys `transformer.<path>` with diffusers or BFL paths, `base_model.model.` /
/// `diffusion_model.` prefixes too, `text_encoder.` / `text_encoder_2.`) in canonical form.
fn from_diffusers(modules: &BTreeMap<String, ModuleWeights>) -> Result<Vec<Fused>> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    // BFL path -> (split, chunks by index)
    let mut groups: BTreeMap<String, (Split, BTreeMap<usize, Chunk>)> = BTreeMap::new();
    for (name, m) in modules {
        let rank = m.rank();
        let alpha = m.alpha.unwrap_or(rank as f64);
        let (down, up) = (f32(&m.down)?, f32(&m.up)?);
        let te = [("text_encoder.", ModelPart::Te1), ("text_encoder_2.", ModelPart::Te3)]
            .into_iter()
            .find_map(|(p, part)| name.strip_prefix(p).map(|r| (part, r)));
        if let Some((part, path)) = te {
            // transformers 5's CLIPTextModel has no `text_model` level; kohya names keep it.
            let path = match path.strip_prefix("encoder.layers.") {
                Some(rest) if part == ModelPart::Te1 => format!("text_model.encoder.layers.{rest}"),
                _ => path.to_owned(),
            };
            if super::targets::kohya_flux_te_target(part, &path) {
                out.push(Fused { part, path, down, up, alpha });
            } else {
                bad.push(name.clone());
            }
            continue;
        }
        let path = ["transformer.", "base_model.model.", "diffusion_model."]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        if diffusers_of(path).is_some() {
            // Already fused (BFL names with lora_A / lora_B, e.g. ComfyUI-style files).
            out.push(Fused { part: ModelPart::Unet, path: path.to_owned(), down, up, alpha });
        } else if let Some((bfl, i, split)) = bfl_of(path) {
            let g = groups.entry(bfl).or_insert_with(|| (split, BTreeMap::new()));
            g.1.insert(i, Chunk { down, up, scale: alpha / rank as f64 });
        } else {
            bad.push(name.clone());
        }
    }
    if !bad.is_empty() {
        return Err(unconvertible("FLUX module (diffusers / PEFT name)", bad));
    }
    for (path, (split, chunks)) in groups {
        out.push(fuse(path, split, chunks)?);
    }
    Ok(out)
}

/// Stacks diffusers chunks into one kohya module (see the module docs for the math).
fn fuse(path: String, split: Split, chunks: BTreeMap<usize, Chunk>) -> Result<Fused> {
    let first = chunks
        .values()
        .next()
        .ok_or_else(|| Error::Config { key: path.clone(), reason: "no chunks".into() })?;
    let in_dim = first.down.size()[1];
    let n = match split {
        Split::Equal(n) => n,
        Split::QkvMlp => 4,
        Split::One | Split::SwapHalves => 1,
    };
    // Rows of every chunk, known or implied (q/k/v share a width; the MLP chunk of linear1
    // is FLUX.1's 4 x width when absent).
    let qkv_rows = chunks
        .iter()
        .find(|(&i, _)| split != Split::QkvMlp || i < 3)
        .map(|(_, c)| c.up.size()[0])
        .unwrap_or(in_dim);
    let rows: Vec<i64> = (0..n)
        .map(|i| match chunks.get(&i) {
            Some(c) => c.up.size()[0],
            None if split == Split::QkvMlp && i == 3 => 4 * in_dim,
            None => qkv_rows,
        })
        .collect();
    if split == Split::SwapHalves || split == Split::One {
        let c = &chunks[&0];
        let r = c.down.size()[0];
        let up =
            if split == Split::SwapHalves { swap_halves(&c.up)? } else { c.up.shallow_clone() };
        return Ok(Fused {
            part: ModelPart::Unet,
            path,
            down: c.down.shallow_clone(),
            up,
            alpha: c.scale * r as f64,
        });
    }
    let total_rank: i64 = chunks.values().map(|c| c.down.size()[0]).sum();
    let same = chunks.values().all(|c| c.scale == first.scale);
    let common = if same { first.scale } else { 1.0 };
    let out_dim: i64 = rows.iter().sum();
    let up = Tensor::f_zeros([out_dim, total_rank], (Kind::Float, first.up.device()))?;
    let mut downs = Vec::new();
    let (mut row, mut col) = (0, 0);
    for (i, &rows_i) in rows.iter().enumerate() {
        if let Some(c) = chunks.get(&i) {
            let r = c.down.size()[0];
            if c.down.size()[1] != in_dim || c.up.size()[0] != rows_i {
                return Err(Error::Shape {
                    name: format!("{path} chunk {i}"),
                    expected: vec![rows_i, in_dim],
                    actual: vec![c.up.size()[0], c.down.size()[1]],
                });
            }
            let b = if same { c.up.shallow_clone() } else { &c.up * c.scale };
            up.f_narrow(0, row, rows_i)?.f_narrow(1, col, r)?.f_copy_(&b)?;
            downs.push(c.down.shallow_clone());
            col += r;
        }
        row += rows_i;
    }
    Ok(Fused {
        part: ModelPart::Unet,
        path,
        down: Tensor::f_cat(&downs, 0)?,
        up,
        alpha: common * total_rank as f64,
    })
}

fn swap_halves(up: &Tensor) -> Result<Tensor> {
    let rows = up.size()[0];
    if rows % 2 != 0 {
        return Err(Error::Config {
            key: "final_layer.adaLN_modulation.1".into(),
            reason: format!("{rows} rows cannot be split into (shift, scale) halves"),
        });
    }
    let h = rows / 2;
    Ok(Tensor::f_cat(&[up.f_narrow(0, h, h)?, up.f_narrow(0, 0, h)?], 0)?)
}

/// diffusers' split of `s` into a down and an up factor (`_convert_to_ai_toolkit`): the up
/// factor is a power of two, so only the down side is rounded.
fn scale_split(s: f64) -> (f64, f64) {
    // diffusers' loop never ends for s <= 0; nothing to balance there.
    if s.is_nan() || s.is_infinite() || s <= 0.0 {
        return (s, 1.0);
    }
    let (mut down, mut up) = (s, 1.0);
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    (down, up)
}

/// The row chunks of a fused module of `split` with `out` rows and input width `in_dim`.
fn chunk_rows(split: Split, out: i64, in_dim: i64) -> Vec<i64> {
    match split {
        Split::Equal(n) => vec![out / n as i64; n],
        Split::QkvMlp => vec![in_dim, in_dim, in_dim, out - 3 * in_dim],
        Split::One | Split::SwapHalves => vec![out],
    }
}

/// Whether `up: [Σ rows, n·r]` is zero outside its diagonal blocks.
fn block_sparse(up: &Tensor, rows: &[i64]) -> Result<bool> {
    let n = rows.len() as i64;
    let rank = up.size()[1];
    if n < 2 || rank % n != 0 {
        return Ok(false);
    }
    let r = rank / n;
    let mut row = 0;
    for (i, &rows_i) in rows.iter().enumerate() {
        for j in 0..n {
            if j != i as i64 {
                let block = up.f_narrow(0, row, rows_i)?.f_narrow(1, j * r, r)?;
                if bool::try_from(block.f_ne(0.0)?.f_any()?)? {
                    return Ok(false);
                }
            }
        }
        row += rows_i;
    }
    Ok(true)
}

/// Converts kohya FLUX modules to diffusers' PEFT layout.
///
/// `modules` are keyed by kohya name (`lora_unet_double_blocks_0_img_attn_qkv`,
/// `lora_te1_…`, `lora_te3_…`), as in [`AdapterFile::modules`] of a kohya file. The result is
/// keyed `transformer.<diffusers path>` / `text_encoder.<path>` / `text_encoder_2.<path>`,
/// alpha folded into the weights (`alpha: None`, i.e. alpha = rank). Every kohya module maps
/// to one or more diffusers modules whose delta equals its rows of the kohya delta.
///
/// # Errors
/// [`Error::Unmatched`] listing every key that is no FLUX module; [`Error::Shape`] /
/// [`Error::Config`] when a fused module's rows do not split.
///
/// # Shapes
/// qkv `down [r, h]`, `up [3h, r]` → three `lora_A [r, h]` (or `[r/3, h]` when block-sparse),
/// `lora_B [h, r]`.
pub fn flux_kohya_to_diffusers(
    modules: &BTreeMap<String, ModuleWeights>,
) -> Result<BTreeMap<String, ModuleWeights>> {
    to_diffusers(from_kohya(modules)?)
}

/// Converts diffusers / PEFT FLUX modules to kohya's layout.
///
/// `modules` are keyed as [`AdapterFile::modules`] of a PEFT file: `transformer.<path>` (or
/// `base_model.model.` / `diffusion_model.`), with diffusers paths or BFL paths,
/// `text_encoder.<path>`, `text_encoder_2.<path>`; alpha `None` means alpha = rank. The result
/// is keyed by kohya name with an explicit alpha; q / k / v (/ MLP) chunks are fused as the
/// module docs describe.
///
/// # Errors
/// [`Error::Unmatched`] listing every key that is no FLUX module; [`Error::Shape`] when
/// chunks of one module disagree on the input width or row count.
pub fn flux_diffusers_to_kohya(
    modules: &BTreeMap<String, ModuleWeights>,
) -> Result<BTreeMap<String, ModuleWeights>> {
    to_kohya(from_diffusers(modules)?)
}

fn to_kohya(fused: Vec<Fused>) -> Result<BTreeMap<String, ModuleWeights>> {
    let mut out = BTreeMap::new();
    for f in fused {
        let name = f.part.kohya_name(&f.path);
        let m = ModuleWeights { down: f.down, up: f.up, alpha: Some(f.alpha) };
        if out.insert(name.clone(), m).is_some() {
            return Err(Error::DuplicatePath { path: name });
        }
    }
    Ok(out)
}

fn to_diffusers(fused: Vec<Fused>) -> Result<BTreeMap<String, ModuleWeights>> {
    let mut out = BTreeMap::new();
    let mut put = |key: String, down: Tensor, up: Tensor| -> Result<()> {
        match out.insert(key.clone(), ModuleWeights { down, up, alpha: None }) {
            Some(_) => Err(Error::DuplicatePath { path: key }),
            None => Ok(()),
        }
    };
    let mut bad = Vec::new();
    for f in fused {
        let rank = f.down.size()[0];
        let (sd, su) = scale_split(f.alpha / rank as f64);
        let (down, up) = (&f.down * sd, &f.up * su);
        if f.part != ModelPart::Unet {
            put(format!("{}.{}", f.part.peft_prefix(), f.path), down, up)?;
            continue;
        }
        let Some((names, split)) = diffusers_of(&f.path) else {
            bad.push(f.part.kohya_name(&f.path));
            continue;
        };
        let in_dim = down.size()[1];
        let rows = chunk_rows(split, up.size()[0], in_dim);
        if rows.iter().any(|&r| r <= 0) || rows.iter().sum::<i64>() != up.size()[0] {
            return Err(Error::Config {
                key: f.path.clone(),
                reason: format!("up rows {} do not split as {split:?}", up.size()[0]),
            });
        }
        let sparse = block_sparse(&up, &rows)?;
        let r = rank / rows.len() as i64;
        let mut row = 0;
        for (i, (name, &rows_i)) in names.iter().zip(&rows).enumerate() {
            let key = format!("transformer.{name}");
            let up_i = up.f_narrow(0, row, rows_i)?;
            let (a, b) = if sparse {
                (down.f_narrow(0, i as i64 * r, r)?, up_i.f_narrow(1, i as i64 * r, r)?)
            } else {
                (down.shallow_clone(), up_i)
            };
            let b = if split == Split::SwapHalves { swap_halves(&b)? } else { b };
            put(key, a.f_contiguous()?, b.f_contiguous()?)?;
            row += rows_i;
        }
    }
    if !bad.is_empty() {
        return Err(unconvertible("diffusers module", bad));
    }
    Ok(out)
}

/// Reads a FLUX LoRA file of either layout as a kohya-layout [`AdapterFile`] (modules keyed
/// by kohya name, BFL paths, explicit alphas): a diffusers / PEFT file is converted with
/// [`flux_diffusers_to_kohya`]. The result's [`AdapterFile::module_ranks`] builds injectors
/// for our model ([`lora_core::Injector::from_modules`]) and [`AdapterFile::apply`] loads it.
///
/// # Errors
/// As [`AdapterFile::read`]; [`Error::Unmatched`] listing every key that is no FLUX module.
pub fn read_flux_lora(path: impl AsRef<Path>) -> Result<AdapterFile> {
    let mut file = AdapterFile::read(path)?;
    file.modules = match file.format {
        Format::Kohya => to_kohya(from_kohya(&file.modules)?)?,
        Format::Peft => flux_diffusers_to_kohya(&file.modules)?,
    };
    file.format = Format::Kohya;
    Ok(file)
}

/// The layout of a FLUX LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxLoraFormat {
    /// kohya / ComfyUI / BFL: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers / PEFT / ai-toolkit: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
    /// `.lora_B.weight`, alpha folded.
    Diffusers,
}

/// What [`convert_flux_lora_file`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxConvertReport {
    /// The source layout.
    pub from: FluxLoraFormat,
    /// Modules read.
    pub modules_in: usize,
    /// Modules written.
    pub modules_out: usize,
}

/// Converts the LoRA file at `src` (either layout, detected from its keys) to `to` at `dst`,
/// keeping its metadata (diffusers files get `format = pt`). Tensors are written in
/// `precision`, or in the source file's kind when `None`. Atomic write.
///
/// # Errors
/// As [`AdapterFile::read`], [`flux_kohya_to_diffusers`] and [`flux_diffusers_to_kohya`];
/// [`Error::Io`] / [`Error::File`] when writing fails.
pub fn convert_flux_lora_file(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    to: FluxLoraFormat,
    precision: Option<SavePrecision>,
) -> Result<FluxConvertReport> {
    let file = AdapterFile::read(src)?;
    let kind = precision.map(SavePrecision::kind).unwrap_or_else(|| {
        file.modules.values().next().map(|m| m.down.kind()).unwrap_or(Kind::Float)
    });
    let (from, fused) = match file.format {
        Format::Kohya => (FluxLoraFormat::Kohya, from_kohya(&file.modules)?),
        Format::Peft => (FluxLoraFormat::Diffusers, from_diffusers(&file.modules)?),
    };
    let out = match to {
        FluxLoraFormat::Kohya => to_kohya(fused)?,
        FluxLoraFormat::Diffusers => to_diffusers(fused)?,
    };
    let mut meta: HashMap<String, String> = file.metadata.clone();
    if to == FluxLoraFormat::Diffusers {
        meta.insert("format".into(), "pt".into());
    }
    save_flux_lora(dst, &out, to, kind, &meta)?;
    Ok(FluxConvertReport { from, modules_in: file.modules.len(), modules_out: out.len() })
}

/// Writes `modules` (keyed as the converters return them) as a safetensors LoRA file in
/// `format`: kohya writes `<name>.lora_down.weight`, `.lora_up.weight` and `.alpha` (alpha
/// `None` written as the rank); diffusers writes `<name>.lora_A.weight` / `.lora_B.weight`
/// (a module with an alpha other than its rank has it folded into `lora_B`). Every tensor is
/// cast to `kind`. Atomic write.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] when writing fails; [`Error::Tensor`] for a kind
/// safetensors cannot hold.
pub fn save_flux_lora(
    path: impl AsRef<Path>,
    modules: &BTreeMap<String, ModuleWeights>,
    format: FluxLoraFormat,
    kind: Kind,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, m) in modules {
        let rank = m.rank() as f64;
        match format {
            FluxLoraFormat::Kohya => {
                tensors.push((format!("{name}.lora_down.weight"), m.down.shallow_clone()));
                tensors.push((format!("{name}.lora_up.weight"), m.up.shallow_clone()));
                let alpha = Tensor::from(m.alpha.unwrap_or(rank) as f32);
                tensors.push((format!("{name}.alpha"), alpha));
            }
            FluxLoraFormat::Diffusers => {
                let s = m.alpha.map_or(1.0, |a| a / rank);
                let up = if s == 1.0 { m.up.shallow_clone() } else { f32(&m.up)? * s };
                tensors.push((format!("{name}.lora_A.weight"), m.down.shallow_clone()));
                tensors.push((format!("{name}.lora_B.weight"), up));
            }
        }
    }
    lora_core::io::write_safetensors(path.as_ref(), &tensors, kind, metadata)
}
