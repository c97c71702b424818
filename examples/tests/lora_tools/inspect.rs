//! `inspect_lora`'s summary of the fixture LoRA, checked against the facts of its generator
//! (`lora-models/tests/fixtures/lora/gen.py`: kohya's module selection on the tiny SD 1.5
//! model, rank 4, alpha 2.0, three `ss_*` keys) and against the file's raw safetensors
//! header, parsed here without lora-core's reader.

use std::collections::BTreeMap;

use lora_examples::inspect::Summary;
use serde_json::Value;

use crate::common::fixture;

/// The raw header: module name -> (down shape, alpha) from `.lora_down.weight` / `.alpha`.
fn raw_modules(path: &std::path::Path) -> BTreeMap<String, (Vec<i64>, f64)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (key, info) in &header {
        let Some(name) = key.strip_suffix(".lora_down.weight") else { continue };
        let shape: Vec<i64> =
            info["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        let alpha = &header[&format!("{name}.alpha")];
        assert_eq!(alpha["dtype"], "F32", "{name}");
        let start = alpha["data_offsets"][0].as_u64().unwrap() as usize;
        let a = f32::from_le_bytes(data[start..start + 4].try_into().unwrap()) as f64;
        out.insert(name.to_owned(), (shape, a));
    }
    out
}

#[test]
fn json_summary_matches_the_generator_and_the_raw_header() {
    let path = fixture("lora/lora.safetensors");
    let j = Summary::read(&path).unwrap().to_json();
    assert_eq!(j["format"], "kohya");
    // gen.py: 7 Transformer2DModels x 12 layers (proj_in / proj_out as 1x1 convs, attn1 and
    // attn2 q/k/v/out, ff.net.0.proj, ff.net.2) in the U-Net; 3 CLIP layers x 6 Linears.
    assert_eq!(j["module_count"], 102);
    assert_eq!(j["parts"], serde_json::json!({"unet": 84, "te": 18}));
    let modules = j["modules"].as_array().unwrap();
    let raw = raw_modules(&path);
    assert_eq!(raw.len(), 102);
    let names: Vec<&str> = modules.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, raw.keys().map(String::as_str).collect::<Vec<_>>());
    let mut convs = 0;
    for m in modules {
        let name = m["name"].as_str().unwrap();
        let (down, alpha) = &raw[name];
        assert_eq!(m["rank"], 4, "{name}");
        assert_eq!(m["rank"].as_i64().unwrap(), down[0], "{name}");
        assert_eq!(m["alpha"].as_f64().unwrap(), 2.0, "{name}");
        assert_eq!(m["alpha"].as_f64().unwrap(), *alpha, "{name}");
        assert_eq!(m["scale"].as_f64().unwrap(), 0.5, "{name}");
        assert_eq!(m["in"].as_i64().unwrap(), down[1], "{name}");
        let want_part = if name.starts_with("lora_unet_") { "unet" } else { "te" };
        assert_eq!(m["part"], want_part, "{name}");
        let is_proj = name.ends_with("_proj_in") || name.ends_with("_proj_out");
        assert_eq!(down.len() == 4, is_proj, "{name}: only proj_in / proj_out are convs");
        if is_proj {
            assert_eq!(m["shape"], "conv 1x1", "{name}");
            convs += 1;
        } else {
            assert_eq!(m["shape"], "linear", "{name}");
        }
    }
    assert_eq!(convs, 14);
    assert_eq!(
        j["metadata"],
        serde_json::json!({"ss_network_alpha": "2.0", "ss_network_dim": "4", "ss_network_module": "networks.lora"})
    );
}

#[test]
fn text_summary_lists_parts_modules_and_sorted_metadata() {
    let s = Summary::read(fixture("lora/lora.safetensors")).unwrap();
    let text = s.to_text(5);
    let first = text.lines().next().unwrap();
    assert!(first.ends_with("kohya LoRA, 102 modules (unet 84, te 18)"), "{first}");
    // 102 module rows, each with its rank and alpha.
    assert_eq!(text.lines().filter(|l| l.starts_with("lora_")).count(), 102);
    let row = text
        .lines()
        .find(|l| l.starts_with("lora_unet_down_blocks_0_attentions_0_proj_in"))
        .unwrap();
    assert!(row.contains("unet") && row.contains(" 4 ") && row.contains("conv 1x1 8->8"), "{row}");
    // Sorted keys, long values cut (max 5 characters here).
    let meta: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("metadata")).collect();
    assert_eq!(
        meta,
        [
            "metadata (3 keys):",
            "  ss_network_alpha = 2.0",
            "  ss_network_dim = 4",
            "  ss_network_module = netwo... (13 chars)"
        ]
    );
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let checkpoint = fixture("sd15/sd15/unet/diffusion_pytorch_model.safetensors");
    for path in [missing, garbage, checkpoint] {
        let err = Summary::read(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
