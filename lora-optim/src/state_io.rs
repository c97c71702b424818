//! Saving and loading optimizer state as safetensors.
//!
//! Layout: for every parameter `name`, one tensor per state slot (`{name}.exp_avg`, ...,
//! 8-bit codes as u8) and `{name}.step` (i64, shape `[1]`); plus `__lora_optim__.kind` (the
//! optimizer kind as UTF-8 bytes, u8) and `__lora_optim__.seed` (the stochastic-rounding seed,
//! i64 bit pattern). Everything that influences later steps is in the file, so a resumed run
//! continues bit-identically.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::group::ParamGroup;
use crate::optimizer::ParamState;
use crate::{Error, Result};

const KIND_KEY: &str = "__lora_optim__.kind";
const SEED_KEY: &str = "__lora_optim__.seed";

fn file_err(path: &Path, reason: String) -> Error {
    Error::File { path: path.to_path_buf(), reason }
}

pub(crate) fn save(
    kind: &str,
    seed: u64,
    groups: &[ParamGroup],
    states: &[Vec<ParamState>],
    path: &Path,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![
        (KIND_KEY.to_string(), Tensor::from_slice(kind.as_bytes())),
        (SEED_KEY.to_string(), Tensor::from_slice(&[seed as i64])),
    ];
    for (group, group_states) in groups.iter().zip(states) {
        for ((name, _), state) in group.params.iter().zip(group_states) {
            tensors.push((format!("{name}.step"), Tensor::from_slice(&[state.step as i64])));
            for (slot, t) in &state.slots {
                tensors.push((format!("{name}.{slot}"), t.to_device(Device::Cpu).contiguous()));
            }
        }
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| file_err(path, "not a file path".to_string()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io { path: path.to_path_buf(), source }
    })
}

fn scalar_i64(path: &Path, key: &str, t: &Tensor) -> Result<i64> {
    if t.kind() != Kind::Int64 || t.numel() != 1 {
        return Err(file_err(
            path,
            format!("`{key}` must be one i64, got {:?} {:?}", t.kind(), t.size()),
        ));
    }
    Ok(t.int64_value(&[0]))
}

/// Loads the state into `states` (only after the whole file is validated) and returns the seed.
pub(crate) fn load(
    kind: &str,
    groups: &[ParamGroup],
    states: &mut [Vec<ParamState>],
    path: &Path,
) -> Result<u64> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let mut map: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| file_err(path, e.to_string()))?
        .into_iter()
        .collect();
    let stored_kind = map
        .remove(KIND_KEY)
        .ok_or_else(|| file_err(path, format!("missing `{KIND_KEY}`: not a lora-optim state")))?;
    let stored_kind =
        String::from_utf8_lossy(&Vec::<u8>::try_from(&stored_kind).map_err(Error::Tch)?)
            .into_owned();
    if stored_kind != kind {
        return Err(file_err(
            path,
            format!("state of a `{stored_kind}` optimizer, expected `{kind}`"),
        ));
    }
    let seed_t =
        map.remove(SEED_KEY).ok_or_else(|| file_err(path, format!("missing `{SEED_KEY}`")))?;
    let seed = scalar_i64(path, SEED_KEY, &seed_t)? as u64;

    // Validate everything before touching the live state.
    let mut staged: Vec<(usize, usize, u64, Vec<Tensor>)> = Vec::new();
    for (gi, (group, group_states)) in groups.iter().zip(states.iter()).enumerate() {
        for (pi, ((name, _), state)) in group.params.iter().zip(group_states).enumerate() {
            let step_key = format!("{name}.step");
            let step_t = map
                .remove(&step_key)
                .ok_or_else(|| file_err(path, format!("missing `{step_key}`")))?;
            let step = scalar_i64(path, &step_key, &step_t)?;
            if step < 0 {
                return Err(file_err(path, format!("`{step_key}` is negative ({step})")));
            }
            let mut slots = Vec::with_capacity(state.slots.len());
            for (slot, live) in &state.slots {
                let key = format!("{name}.{slot}");
                let t =
                    map.remove(&key).ok_or_else(|| file_err(path, format!("missing `{key}`")))?;
                if t.size() != live.size() || t.kind() != live.kind() {
                    return Err(file_err(
                        path,
                        format!(
                            "`{key}`: expected {:?} {:?}, found {:?} {:?}",
                            live.kind(),
                            live.size(),
                            t.kind(),
                            t.size()
                        ),
                    ));
                }
                slots.push(t);
            }
            staged.push((gi, pi, step as u64, slots));
        }
    }
    if let Some(extra) = map.keys().min() {
        return Err(file_err(
            path,
            format!("unexpected `{extra}` ({} unknown keys): parameter names differ", map.len()),
        ));
    }
    for (gi, pi, step, slots) in staged {
        let state = &mut states[gi][pi];
        state.step = step;
        for ((_, live), t) in state.slots.iter_mut().zip(slots) {
            tch::no_grad(|| live.copy_(&t));
        }
    }
    Ok(seed)
}
