//! Target selection, rule precedence, block-wise maps and LoRA+ groups, over the real SD 1.5 /
//! SDXL U-Net and CLIP module lists (`fixtures/names/gen.py`, kohya's selection by class name
//! and block index computed there).

use std::path::PathBuf;

use lora_core::{
    kohya_targets, BlockArch, BlockWiseConfig, Error, Injector, LayerFactory, LoraConfig,
    ModelPart, Pattern, Role, Rule,
};
use tch::nn::{self, VarStore};
use tch::Device;

struct Row {
    path: String,
    linear: bool,
    ksize: i64,
    kohya: bool,
    kohya_conv: bool,
    block: i64,
}

fn table(name: &str) -> Vec<Row> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/names")
        .join(format!("{name}.tsv"));
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Row {
                path: f[0].into(),
                linear: f[1] == "linear",
                ksize: f[2].parse().unwrap(),
                kohya: f[3] == "1",
                kohya_conv: f[4] == "1",
                block: f[5].parse().unwrap(),
            }
        })
        .collect()
}

/// Builds every layer of the table with tiny dims (selection depends on path and kernel).
fn build_all(rows: &[Row], inj: &Injector<'_>, base: &VarStore) {
    for r in rows {
        let vs = r.path.split('.').fold(base.root(), |p, s| p / s);
        if r.linear {
            inj.linear(vs, 2, 2, Default::default()).unwrap();
        } else {
            let c = nn::ConvConfig { padding: r.ksize / 2, ..Default::default() };
            inj.conv2d(vs, 2, 2, r.ksize, c).unwrap();
        }
    }
}

fn run(rows: &[Row], part: ModelPart, cfg: &LoraConfig) -> lora_core::SelectionReport {
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), part, cfg).unwrap();
    build_all(rows, &inj, &base);
    inj.finish().unwrap()
}

fn selected(report: &lora_core::SelectionReport) -> Vec<String> {
    report.adapters.iter().map(|a| a.path.clone()).collect()
}

fn want(rows: &[Row], f: impl Fn(&Row) -> bool) -> Vec<String> {
    rows.iter().filter(|r| f(r)).map(|r| r.path.clone()).collect()
}

/// kohya's default targets: SD 1.5 U-Net 192, TE 72; SDXL U-Net 722, TE1 72, TE2 192, and
/// exactly kohya's modules (class-name selection), not just the counts.
#[test]
fn kohya_default_targets() {
    for (name, part, targets, count) in [
        ("sd15_unet", ModelPart::Unet, kohya_targets::unet(), 192),
        ("sdxl_unet", ModelPart::Unet, kohya_targets::unet(), 722),
        ("clip_l", ModelPart::Te, kohya_targets::text_encoder(), 72),
        ("clip_l", ModelPart::Te1, kohya_targets::text_encoder(), 72),
        ("clip_g", ModelPart::Te2, kohya_targets::text_encoder(), 192),
    ] {
        let rows = table(name);
        let report = run(&rows, part, &LoraConfig::new(4, targets));
        assert_eq!(report.adapters.len(), count, "{name}");
        assert_eq!(selected(&report), want(&rows, |r| r.kohya), "{name}");
        assert_eq!(report.plain, rows.len() - count);
    }
}

/// With conv LoRA: kohya's conv set, 3x3 convs with conv_dim/alpha, Linear and 1x1 with the
/// linear rank.
#[test]
fn kohya_conv_targets_and_ranks() {
    for name in ["sd15_unet", "sdxl_unet"] {
        let rows = table(name);
        let mut cfg = LoraConfig::new(8, kohya_targets::unet_conv());
        cfg.alpha = Some(4.0);
        cfg.conv_rank = Some(2);
        cfg.conv_alpha = Some(1.0);
        let report = run(&rows, ModelPart::Unet, &cfg);
        assert_eq!(selected(&report), want(&rows, |r| r.kohya_conv), "{name}");
        for (a, r) in report.adapters.iter().zip(rows.iter().filter(|r| r.kohya_conv)) {
            let wide = !r.linear && r.ksize > 1;
            assert_eq!((a.rank, a.alpha), if wide { (2, 1.0) } else { (8, 4.0) }, "{}", a.path);
        }
    }
}

/// Our block index equals kohya's (SD: on diffusers names; SDXL: on SGM names).
#[test]
fn block_index_matches_kohya() {
    for (name, arch) in [("sd15_unet", BlockArch::Sd), ("sdxl_unet", BlockArch::Sdxl)] {
        for r in table(name) {
            let ours = arch.block_index(&r.path).map_or(-1, |b| b as i64);
            // kohya gives SDXL conv_in (input_blocks_0) block 1; it is never a target.
            let theirs = if r.path == "conv_in" { -1 } else { r.block };
            assert_eq!(ours, theirs, "{name} {}", r.path);
        }
    }
}

/// kohya's block_dims / block_alphas / conv_block_dims and block LR weights become rules:
/// each module's rank / alpha / LR multiplier is its block's entry, and blocks with LR weight
/// 0 get no adapter (kohya removes them).
#[test]
fn block_wise_maps() {
    for (name, arch) in [("sd15_unet", BlockArch::Sd), ("sdxl_unet", BlockArch::Sdxl)] {
        let rows = table(name);
        let n = arch.num_blocks();
        let dims: Vec<i64> = (0..n as i64).map(|b| 1 + b % 5).collect();
        let alphas: Vec<f64> = (0..n).map(|b| 0.5 * (b % 3) as f64 + 0.5).collect();
        let cdims: Vec<i64> = (0..n as i64).map(|b| 1 + b % 3).collect();
        let join = |v: Vec<String>| v.join(",");
        let nd = if arch == BlockArch::Sd { 12 } else { 9 };
        let mut down: Vec<String> = vec!["1".into(); nd];
        down[3] = "0".into();
        down[4] = "0.5".into();
        let bw = BlockWiseConfig {
            block_dims: Some(join(dims.iter().map(|d| d.to_string()).collect())),
            block_alphas: Some(join(alphas.iter().map(|a| a.to_string()).collect())),
            conv_block_dims: Some(join(cdims.iter().map(|d| d.to_string()).collect())),
            down_lr_weight: Some(down.join(",")),
            up_lr_weight: Some("cosine+0.5".into()),
            ..Default::default()
        };
        let lr = bw.lr_weight_list(arch).unwrap().unwrap();
        let mut cfg = LoraConfig::new(4, kohya_targets::unet_conv());
        cfg.conv_rank = Some(4);
        cfg.conv_alpha = Some(1.0);
        cfg.block_wise = Some(bw);
        cfg.block_arch = Some(arch);
        cfg.lora_plus.unet_lr_ratio = Some(16.0);
        let report = run(&rows, ModelPart::Unet, &cfg);
        let expect: Vec<&Row> =
            rows.iter().filter(|r| r.kohya_conv && lr[r.block as usize] > 0.0).collect();
        assert_eq!(report.adapters.len(), expect.len(), "{name}");
        assert!(
            expect.len() < rows.iter().filter(|r| r.kohya_conv).count(),
            "some block was dropped"
        );
        for (a, r) in report.adapters.iter().zip(expect) {
            let b = r.block as usize;
            assert_eq!(a.path, r.path);
            assert_eq!(a.block, Some(b));
            let wide = !r.linear && r.ksize > 1;
            // conv_block_alphas absent: the config's conv_alpha, as kohya.
            let (rank, alpha) = if wide { (cdims[b], 1.0) } else { (dims[b], alphas[b]) };
            assert_eq!((a.rank, a.alpha, a.lr_weight), (rank, alpha, lr[b]), "{}", a.path);
            let g = |id: usize| report.groups.iter().find(|g| g.id == id).unwrap();
            assert_eq!((g(a.down_group).role, g(a.down_group).lr_multiplier), (Role::Down, lr[b]));
            assert_eq!((g(a.up_group).role, g(a.up_group).lr_multiplier), (Role::Up, lr[b] * 16.0));
        }
    }
}

/// User rules come after block rules; the last matching rule wins, field by field.
#[test]
fn user_rules_override_blocks() {
    let rows = table("sd15_unet");
    let mut cfg = LoraConfig::new(4, kohya_targets::unet());
    cfg.block_wise =
        Some(BlockWiseConfig { block_dims: Some(vec!["8"; 25].join(",")), ..Default::default() });
    cfg.block_arch = Some(BlockArch::Sd);
    let mut a = Rule::new(Pattern::Glob("**.attn2.**".into()));
    a.rank = Some(16);
    let mut b = Rule::new(Pattern::Regex(r".*attn2\.to_[kv]".into()));
    b.rank = Some(32);
    b.alpha = Some(2.0);
    cfg.rules = vec![a, b];
    let report = run(&rows, ModelPart::Unet, &cfg);
    for x in &report.adapters {
        let want = if x.path.ends_with("attn2.to_k") || x.path.ends_with("attn2.to_v") {
            (32, 2.0)
        } else if x.path.contains(".attn2.") {
            (16, 16.0)
        } else {
            (8, 8.0)
        };
        assert_eq!((x.rank, x.alpha), want, "{}", x.path);
    }
    assert!(report.to_string().contains("attn2.to_k rank 32 alpha 2 lr x1"), "{report}");
}

/// A pattern or required rule that matches nothing is an error listing all of them.
#[test]
fn unmatched_patterns_are_errors() {
    let rows = table("clip_l");
    let mut cfg =
        LoraConfig::new(4, vec![Pattern::Suffix("q_proj".into()), Pattern::Suffix("nope".into())]);
    cfg.exclude = vec![Pattern::Glob("text_model.encoder.layers.99.**".into())];
    cfg.rules = vec![Rule::new(Pattern::Exact("text_model.encoder.layers.0.mlp.fc1".into()))];
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), ModelPart::Te, &cfg).unwrap();
    build_all(&rows, &inj, &base);
    match inj.finish() {
        Err(Error::Unmatched { items, .. }) => assert_eq!(
            items,
            vec![
                "include suffix:nope".to_string(),
                "exclude glob:text_model.encoder.layers.99.**".to_string(),
                "rule exact:text_model.encoder.layers.0.mlp.fc1".to_string(),
            ]
        ),
        other => panic!("expected Unmatched, got {other:?}"),
    }
    assert_eq!(inj.report().adapters.len(), 12);
}

/// Building the same module path twice is an error (tch would rename it `weight__N`), for
/// plain and adapted layers; so is a layer outside the part root.
#[test]
fn duplicate_paths_are_errors() {
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let cfg = LoraConfig::new(4, vec![Pattern::Suffix("to_q".into())]);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap().with_base_prefix("unet");
    let root = base.root() / "unet";
    inj.linear(&root / "a" / "to_q", 2, 2, Default::default()).unwrap();
    inj.linear(&root / "a" / "to_k", 2, 2, Default::default()).unwrap();
    assert!(matches!(
        inj.linear(&root / "a" / "to_q", 2, 2, Default::default()),
        Err(Error::DuplicatePath { .. })
    ));
    assert!(matches!(
        inj.linear(&root / "a" / "to_k", 2, 2, Default::default()),
        Err(Error::DuplicatePath { .. })
    ));
    assert!(matches!(
        inj.linear(base.root() / "te" / "x", 2, 2, Default::default()),
        Err(Error::Config { .. })
    ));
    assert_eq!(inj.adapters()[0].path, "a.to_q");
    assert_eq!(inj.adapters()[0].kohya_name, "lora_unet_a_to_q");
    // The adapter store's names are kohya's keys.
    let mut names: Vec<String> = ad.variables().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "lora_unet_a_to_q.alpha",
            "lora_unet_a_to_q.lora_down.weight",
            "lora_unet_a_to_q.lora_up.weight"
        ]
    );
}

/// LoRA+: A and B in distinct groups, B's multiplier = ratio (kohya's fallbacks per part);
/// the groups are the ones tch's optimizer sees; `with_first_group` keeps parts disjoint.
#[test]
fn lora_plus_groups() {
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let mut cfg = LoraConfig::new(4, vec![Pattern::Suffix("q_proj".into())]);
    cfg.lora_plus.lr_ratio = Some(4.0);
    cfg.lora_plus.text_encoder_lr_ratio = Some(8.0);
    let unet = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    unet.linear(base.root() / "u" / "q_proj", 2, 2, Default::default()).unwrap();
    let te =
        Injector::new(ad.root(), ModelPart::Te, &cfg).unwrap().with_first_group(unet.group_end());
    te.linear(base.root() / "t" / "q_proj", 2, 2, Default::default()).unwrap();
    let groups: Vec<(usize, Role, f64)> = unet
        .groups()
        .into_iter()
        .chain(te.groups())
        .map(|g| (g.id, g.role, g.lr_multiplier))
        .collect();
    assert_eq!(
        groups,
        vec![(0, Role::Down, 1.0), (1, Role::Up, 4.0), (2, Role::Down, 1.0), (3, Role::Up, 8.0)]
    );
    // tch's trainable variables carry the same group ids.
    let vars = ad.variables_.lock().unwrap();
    let mut by_group: Vec<(usize, Vec<i64>)> =
        vars.trainable_variables.iter().map(|v| (v.group, v.tensor.size())).collect();
    by_group.sort();
    assert_eq!(by_group, vec![(0, vec![4, 2]), (1, vec![2, 4]), (2, vec![4, 2]), (3, vec![2, 4])]);
}

/// `with_kohya_rename`: kohya names (and adapter-store names) come from the renamed path (SDXL:
/// the SGM names of the table), while targets and block indices still use the module path;
/// `from_modules` selects by the renamed name and, as a fallback, by the plain one.
#[test]
fn kohya_rename_names_adapters_after_the_renamed_path() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/names/sdxl_unet.tsv");
    let sgm: std::collections::HashMap<String, String> = std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), f[6].to_owned())
        })
        .collect();
    let rows = table("sdxl_unet");
    let mut cfg = LoraConfig::new(2, kohya_targets::unet());
    cfg.block_arch = Some(BlockArch::Sdxl);
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let map = sgm.clone();
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg)
        .unwrap()
        .with_kohya_rename(move |path| map[path].clone());
    build_all(&rows, &inj, &base);
    let adapters = inj.adapters();
    assert_eq!(adapters.len(), 722);
    for a in &adapters {
        assert_eq!(a.kohya_name, format!("lora_unet_{}", sgm[&a.path].replace('.', "_")));
        assert_eq!(inj.kohya_name(&a.path), a.kohya_name);
        let row = rows.iter().find(|r| r.path == a.path).unwrap();
        assert_eq!(a.block.map(|b| b as i64), Some(row.block), "{}", a.path);
        assert!(ad.variables().contains_key(&format!("{}.lora_down.weight", a.kohya_name)));
    }
    // Selecting from a file: by SGM name, and by the plain (diffusers-style) name.
    let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    for name in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        &ModelPart::Unet.kohya_name(q),
    ] {
        let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let map = sgm.clone();
        let inj = Injector::from_modules(
            ad.root(),
            ModelPart::Unet,
            [(name.to_owned(), (4, 1.0))].into(),
        )
        .with_kohya_rename(move |path| map[path].clone());
        build_all(&rows, &inj, &base);
        let a = inj.adapters();
        assert_eq!(a.len(), 1, "{name}");
        assert_eq!(a[0].path, q);
        assert_eq!(a[0].kohya_name, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q");
    }
}
