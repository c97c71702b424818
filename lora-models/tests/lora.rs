//! A kohya LoRA on the tiny SD 1.5 model, against diffusers' `load_lora_weights`
//! (`fixtures/lora/gen.py`): our injected model reproduces diffusers' LoRA output, merging
//! gives the same output, the modules are exactly kohya's selection, and the file we write
//! for the model holds the same keys and tensors as the one diffusers loaded.
//!
//! Tolerance: 1e-4 of the output's largest magnitude (f32 both sides).

use std::collections::BTreeSet;

use lora_core::io::{save_kohya, AdapterFile, BaseModel, KohyaMetadata};
use lora_core::{Injector, ModelPart};
use lora_models::targets::{kohya_name, kohya_sd_target, LayerShape, SdPart};
use lora_models::{ClipTextModel, DiffusersFolder, UNet2DConditionModel};
use tch::{nn::VarStore, Device};

use crate::common::{assert_close, fixture, get, io};

const REL: f64 = 1e-4;

#[test]
fn kohya_lora_matches_diffusers_load_lora_weights() {
    let file = AdapterFile::read(fixture("lora/lora.safetensors")).unwrap();
    let folder = DiffusersFolder::new(fixture("sd15/sd15"));
    let adapters = VarStore::new(Device::Cpu);

    let (ucfg, usd) = folder.unet().unwrap();
    let unet_vs = VarStore::new(Device::Cpu);
    let unet_inj = Injector::from_modules(
        adapters.root(),
        ModelPart::Unet,
        file.module_ranks(ModelPart::Unet),
    );
    let unet = UNet2DConditionModel::new(unet_vs.root(), &ucfg, &unet_inj).unwrap();
    usd.load_into(&unet_vs).unwrap();

    let (tcfg, tsd) = folder.text_encoder().unwrap();
    let te_vs = VarStore::new(Device::Cpu);
    let te_inj =
        Injector::from_modules(adapters.root(), ModelPart::Te, file.module_ranks(ModelPart::Te))
            .with_first_group(unet_inj.group_end());
    let te = ClipTextModel::new(te_vs.root(), &tcfg, &te_inj).unwrap();
    tsd.load_into(&te_vs).unwrap();

    unet_inj.finish().unwrap();
    te_inj.finish().unwrap();
    file.apply(&[&unet_inj, &te_inj]).unwrap();

    // The file's modules are exactly what our kohya preset selects.
    let base_paths = |vs: &VarStore| -> BTreeSet<String> {
        vs.variables().keys().filter_map(|k| k.strip_suffix(".weight").map(str::to_owned)).collect()
    };
    let mut selected = BTreeSet::new();
    for (part, vs) in [(SdPart::Unet, &unet_vs), (SdPart::TextEncoder, &te_vs)] {
        let vars = vs.variables();
        for path in base_paths(vs) {
            let shape = match vars[&format!("{path}.weight")].size().len() {
                2 => LayerShape::Linear,
                4 => LayerShape::Conv2d { ksize: vars[&format!("{path}.weight")].size()[3] },
                _ => continue,
            };
            if kohya_sd_target(part, &path, shape, false).is_some() {
                selected.insert(kohya_name(part, &path));
            }
        }
    }
    let in_file: BTreeSet<String> = file.modules.keys().cloned().collect();
    assert_eq!(selected, in_file);
    assert_eq!(in_file.len(), 7 * 12 + 3 * 6);

    // Unmerged and merged outputs equal diffusers' LoRA outputs.
    let io = io();
    let lio = lora_models::StateDict::read(fixture("lora/io.safetensors")).unwrap();
    let unet_out = || {
        tch::no_grad(|| {
            unet.forward(
                &get(&io, "sd15.unet.sample"),
                &get(&io, "sd15.unet.timestep"),
                &get(&io, "sd15.unet.encoder_hidden_states"),
                false,
            )
        })
    };
    let te_out =
        || tch::no_grad(|| te.forward(&get(&io, "sd15.te.input_ids"), 1, false)).unwrap().hidden;
    assert_close("lora unet", &unet_out(), &get(&lio, "unet.out"), REL);
    assert_close("lora te", &te_out(), &get(&lio, "te.last_hidden_state"), REL);
    unet_inj.merge().unwrap();
    te_inj.merge().unwrap();
    assert_close("merged lora unet", &unet_out(), &get(&lio, "unet.out"), REL);
    assert_close("merged lora te", &te_out(), &get(&lio, "te.last_hidden_state"), REL);
    unet_inj.unmerge().unwrap();
    te_inj.unmerge().unwrap();

    // The file we write for this model has diffusers' file's keys and tensors.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ours.safetensors");
    save_kohya(
        &out,
        &[&unet_inj, &te_inj],
        None,
        None,
        &KohyaMetadata::new(BaseModel::Sd1, "tiny"),
    )
    .unwrap();
    let ours = AdapterFile::read(&out).unwrap();
    assert_eq!(ours.modules.keys().collect::<Vec<_>>(), file.modules.keys().collect::<Vec<_>>());
    for (name, m) in &file.modules {
        let o = &ours.modules[name];
        assert!(o.down.equal(&m.down) && o.up.equal(&m.up), "{name}");
        assert_eq!(o.alpha, m.alpha, "{name}");
    }
}
