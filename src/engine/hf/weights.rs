//! Safetensors loading and scoped weight look-up (`w.pp("layers").pp(i).linear("q_proj", true)`).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{load_err, EngineError};

/// The tensors of `*.safetensors` (single file or sharded with an index), on `device` in `kind`.
pub(super) fn load_weights(dir: &Path, device: Device, kind: Kind) -> Result<HashMap<String, Tensor>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(load_err)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(load_err)?;
        let mut shards: Vec<String> = v["weight_map"].as_object().ok_or_else(|| load_err("index without weight_map"))?.values().filter_map(|f| f.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut weights = HashMap::new();
    for file in files {
        for (name, t) in Tensor::read_safetensors(&file).map_err(|e| load_err(format!("{}: {e}", file.display())))? {
            let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
            weights.insert(name, t.to_device(device));
        }
    }
    Ok(weights)
}

/// A checkpoint's tensors, looked up under each of its architecture's prefixes (checkpoints
/// differ: `model.`, `bert.`, none).
pub(super) struct Weights {
    pub map: HashMap<String, Tensor>,
    pub prefixes: &'static [&'static str],
    pub device: Device,
}

impl Weights {
    pub fn root(&self) -> Scope<'_> {
        Scope { w: self, path: String::new() }
    }
}

/// A path into [`Weights`].
pub(crate) struct Scope<'a> {
    w: &'a Weights,
    path: String,
}

impl<'a> Scope<'a> {
    /// The scope `name` below this one.
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        Scope { w: self.w, path: format!("{}{name}.", self.path) }
    }

    pub fn device(&self) -> Device {
        self.w.device
    }

    pub fn get(&self, name: &str) -> Result<Tensor, EngineError> {
        self.try_get(name).ok_or_else(|| EngineError::Load(format!("weight '{}{name}' is missing from the safetensors", self.path)))
    }

    pub fn try_get(&self, name: &str) -> Option<Tensor> {
        self.w.prefixes.iter().find_map(|p| self.w.map.get(&format!("{p}{}{name}", self.path))).map(|t| t.shallow_clone())
    }
}
