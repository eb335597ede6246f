//! LoRA adapters applied at request time.
//!
//! An adapter changes some weights of the UNet and text encoders by a low-rank product:
//! `W' = W + weight · scale · (B · A)`, with `A` (`lora_A` / `lora_down`) `[rank, in]`, `B`
//! (`lora_B` / `lora_up`) `[out, rank]` and `scale = alpha / rank` (`alpha / √rank` for rsLoRA).
//! Conv weights use the same product on their flattened `[out, in·kh·kw]` form.
//!
//! Two file layouts are read, both safetensors:
//! - diffusers / peft: `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, …;
//!   alpha from a per-module `.alpha` tensor, else from the peft config diffusers stores in the
//!   metadata (`lora_adapter_metadata`), else alpha = rank.
//! - kohya: `lora_unet_<module with _>.lora_down.weight`, `lora_te_…` / `lora_te1_…` /
//!   `lora_te2_…`, with a scalar `.alpha` per module.
//!
//! The exporter renames and transposes weights, so the merge goes through
//! `<part>/weights_map.json` (written by `onnx/export_sd.sh`): PyTorch name → ONNX initializer and
//! whether it is stored transposed. Merged weights replace the initializers of a new session
//! (ONNX Runtime's `AddInitializer`); the base sessions are never touched, and a request without
//! adapters uses them directly. Merged sessions are kept in a small LRU keyed by the set of
//! (adapter, weight) pairs.

mod cache;
mod keys;
mod onnx_weights;
mod request;
mod safetensors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};
use ort::value::{DynValue, Tensor};
use serde::Deserialize;

pub(crate) use self::cache::{MergedCache, MergedModels};
use self::keys::{KeyPair, PeftConfig, adapter_family, family_name, module_kind, peft_pairs};
use self::onnx_weights::FloatKind;
pub use self::request::{PromptLoras, check_name, extract_prompt_loras};
use self::safetensors::Header;
use super::config::ModelFamily;
use crate::inference::InitializerOverrides;

/// The sub-models an adapter can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelPart {
    /// The denoising UNet.
    Unet,
    /// The (first) CLIP text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl ModelPart {
    /// The sub-model's folder in the export layout, also the key prefix in diffusers' format.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelPart::Unet => "unet",
            ModelPart::TextEncoder => "text_encoder",
            ModelPart::TextEncoder2 => "text_encoder_2",
        }
    }

    const ALL: [ModelPart; 3] = [ModelPart::Unet, ModelPart::TextEncoder, ModelPart::TextEncoder2];
}

/// Everything that can go wrong reading, checking or applying an adapter.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The adapter file could not be read.
    #[error("LoRA file {}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's or parser's message.
        reason: String,
    },
    /// The file is not a valid safetensors file (bad header, truncated, NaN values, …).
    #[error("LoRA file {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is valid safetensors but not a LoRA layout this service applies.
    #[error("LoRA '{name}' is not in a supported format: {reason}")]
    Format {
        /// The adapter's name.
        name: String,
        /// What was found instead.
        reason: String,
    },
    /// The adapter was made for another model family.
    #[error("LoRA '{name}' is for {adapter}, but the loaded model is {model}")]
    WrongFamily {
        /// The adapter's name.
        name: String,
        /// The family the adapter was trained on.
        adapter: &'static str,
        /// The family of the loaded model.
        model: &'static str,
    },
    /// The adapter changes a weight the model's weights map does not list.
    #[error(
        "LoRA '{name}' targets {part} weight '{module}', which the model's {part}/weights_map.json does not list \
         (the adapter is for another architecture, or the export could not map that weight)"
    )]
    UnknownTarget {
        /// The adapter's name.
        name: String,
        /// The sub-model.
        part: &'static str,
        /// The module as the adapter names it.
        module: String,
    },
    /// Ranks or shapes of the adapter do not fit the weight it targets.
    #[error("LoRA '{name}' does not fit {part} weight '{module}': {reason}")]
    Shape {
        /// The adapter's name.
        name: String,
        /// The sub-model.
        part: &'static str,
        /// The PyTorch weight name.
        module: String,
        /// The mismatch.
        reason: String,
    },
    /// The model was exported without the weights map adapters need, or the map is stale.
    #[error("cannot apply LoRA adapters to {}: {reason}", path.display())]
    WeightsMap {
        /// The map (or the model file it describes).
        path: PathBuf,
        /// What is missing or wrong; how to fix it.
        reason: String,
    },
    /// A request named an adapter that is not loaded.
    #[error("unknown LoRA '{name}'; known: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    Unknown {
        /// The name asked for.
        name: String,
        /// The adapters that are available.
        known: Vec<String>,
    },
    /// A request gave a weight outside the configured bound.
    #[error("LoRA '{name}' weight {weight} is outside -{max}..={max}")]
    Weight {
        /// The adapter's name.
        name: String,
        /// The weight asked for.
        weight: f32,
        /// The configured bound (`--max-lora-weight`).
        max: f32,
    },
    /// Reading base weights from the ONNX file or building the merged session failed.
    #[error("merging LoRA into {part}: {reason}")]
    Merge {
        /// The sub-model.
        part: &'static str,
        /// What failed.
        reason: String,
    },
}

/// Where adapters come from and how many merged sessions are kept.
#[derive(Debug, Clone)]
pub struct LoraOptions {
    /// Folder of `*.safetensors` adapters (with optional `<name>.json` / `<name>.txt` sidecars).
    pub dir: PathBuf,
    /// Merged session sets kept for reuse; 0 builds one per request.
    pub cache_size: usize,
    /// Largest |weight| a request may give one adapter.
    pub max_weight: f32,
}

/// File layouts adapters come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers / peft: `lora_A` / `lora_B`.
    Peft,
    /// kohya-ss: `lora_unet_…` / `lora_te_…`, `lora_down` / `lora_up`, `.alpha`.
    Kohya,
}

/// One low-rank update of one weight.
#[derive(Debug, Clone)]
struct LoraModule {
    part: ModelPart,
    /// PyTorch parameter name, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`.
    weight: String,
    down: String,
    up: String,
    rank: usize,
    scale: f32,
}

/// An adapter found in the LoRA folder and checked against the model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The name requests use: the file name without `.safetensors`.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its layout.
    pub format: LoraFormat,
    /// The largest rank of its modules.
    pub rank: usize,
    /// Module kinds it changes, e.g. `unet.to_q`, `text_encoder.q_proj`.
    pub target_modules: Vec<String>,
    /// Words that invoke what it was trained on (from a sidecar or the file's metadata).
    pub trigger_words: Vec<String>,
    header: Header,
    modules: Vec<LoraModule>,
}

impl LoraAdapter {
    /// The sub-models it changes.
    pub fn parts(&self) -> BTreeSet<ModelPart> {
        self.modules.iter().map(|m| m.part).collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
struct MappedWeight {
    initializer: String,
    transposed: bool,
    shape: Vec<usize>,
}

#[derive(Debug, Deserialize)]
struct WeightsMapFile {
    format: String,
    onnx_sha256: String,
    weights: BTreeMap<String, MappedWeight>,
}

/// One sub-model's weights map, or why it cannot be used.
#[derive(Debug)]
struct PartMap {
    onnx: PathBuf,
    map: Result<BTreeMap<String, MappedWeight>, String>,
    /// Kohya's flattened module name (`down_blocks_1_…_to_q`) → PyTorch weight name.
    kohya: BTreeMap<String, String>,
}

/// The adapters usable with one model, and the means to merge them.
#[derive(Debug)]
pub struct LoraLibrary {
    adapters: BTreeMap<String, LoraAdapter>,
    maps: BTreeMap<ModelPart, PartMap>,
    /// The weights map of the UNet with ControlNet residual inputs (`unet_controlnet/`), whose
    /// initializers take the same UNet merges under other names.
    residual_unet: Option<PartMap>,
    max_weight: f32,
}

/// An adapter that was found but cannot be used, and why.
#[derive(Debug)]
pub struct RejectedLora {
    /// The file.
    pub path: PathBuf,
    /// Why it was left out.
    pub error: LoraError,
}

impl LoraLibrary {
    /// Lists the adapters in `options.dir` that fit the model in `model_dir` (`family`); files that
    /// cannot be used are returned beside it with the reason. A missing folder holds no adapters.
    pub fn scan(
        options: &LoraOptions,
        model_dir: &Path,
        family: ModelFamily,
    ) -> Result<(LoraLibrary, Vec<RejectedLora>), LoraError> {
        let mut library = LoraLibrary {
            adapters: BTreeMap::new(),
            maps: BTreeMap::new(),
            residual_unet: None,
            max_weight: options.max_weight,
        };
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&options.dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(LoraError::Io { path: options.dir.clone(), reason: e.to_string() }),
        };
        files.sort();
        if files.is_empty() {
            return Ok((library, Vec::new()));
        }
        for part in ModelPart::ALL {
            let onnx = model_dir.join(part.as_str()).join("model.onnx");
            if onnx.is_file() {
                library.maps.insert(part, PartMap::load(&onnx));
            }
        }
        let residual = model_dir.join("unet_controlnet/model.onnx");
        library.residual_unet = residual.is_file().then(|| PartMap::load(&residual));
        let mut rejected = Vec::new();
        for path in files {
            match library.load_adapter(&path, family) {
                Ok(adapter) => {
                    library.adapters.insert(adapter.name.clone(), adapter);
                }
                Err(error) => rejected.push(RejectedLora { path, error }),
            }
        }
        Ok((library, rejected))
    }

    /// The usable adapters, by name.
    pub fn adapters(&self) -> impl Iterator<Item = &LoraAdapter> {
        self.adapters.values()
    }

    /// The configured bound on |weight|.
    pub fn max_weight(&self) -> f32 {
        self.max_weight
    }

    /// Checks a request's adapters and weights: names must be known, weights within the bound.
    /// Weight 0 drops an adapter; a name given twice keeps the last weight. Sorted by name.
    pub fn resolve(&self, requested: &[(String, f32)]) -> Result<Vec<(&LoraAdapter, f32)>, LoraError> {
        let mut chosen = BTreeMap::new();
        for (name, weight) in requested {
            let adapter = self.adapters.get(name).ok_or_else(|| LoraError::Unknown {
                name: name.clone(),
                known: self.adapters.keys().cloned().collect(),
            })?;
            if !(weight.is_finite() && weight.abs() <= self.max_weight) {
                return Err(LoraError::Weight { name: name.clone(), weight: *weight, max: self.max_weight });
            }
            chosen.insert(name.as_str(), (adapter, *weight));
        }
        Ok(chosen.into_values().filter(|(_, w)| *w != 0.0).collect())
    }

    fn load_adapter(&self, path: &Path, family: ModelFamily) -> Result<LoraAdapter, LoraError> {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        check_name(&name).map_err(|reason| LoraError::Format { name: name.clone(), reason })?;
        let header = safetensors::read_header(path)
            .map_err(|reason| LoraError::Corrupt { path: path.to_path_buf(), reason })?;
        let format_error = |reason: String| LoraError::Format { name: name.clone(), reason };
        let keys: Vec<&str> = header.tensors.keys().map(String::as_str).collect();
        if keys.iter().any(|k| k.contains("dora_scale") || k.contains("lora_magnitude_vector")) {
            return Err(format_error("DoRA adapters are not supported".into()));
        }
        if let Some(family_of_adapter) = adapter_family(&header)
            && family_of_adapter != family
        {
            return Err(LoraError::WrongFamily {
                name,
                adapter: family_name(family_of_adapter),
                model: family_name(family),
            });
        }
        let kohya = keys.iter().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"));
        let (format, pairs) = if kohya {
            (LoraFormat::Kohya, self.kohya_pairs(&name, &header)?)
        } else {
            (LoraFormat::Peft, peft_pairs(&name, &header)?)
        };
        if pairs.is_empty() {
            return Err(format_error(
                "no lora_A/lora_B or lora_down/lora_up tensors for the UNet or text encoders".into(),
            ));
        }
        let peft_config = PeftConfig::from_metadata(&header.metadata).map_err(&format_error)?;
        let mut modules = Vec::new();
        for pair in pairs {
            modules.push(self.check_module(&name, path, &header, pair, &peft_config)?);
        }
        let rank = modules.iter().map(|m| m.rank).max().unwrap_or(0);
        let target_modules: BTreeSet<String> =
            modules.iter().map(|m| format!("{}.{}", m.part.as_str(), module_kind(&m.weight))).collect();
        Ok(LoraAdapter {
            trigger_words: trigger_words(path, &header.metadata),
            name,
            path: path.to_path_buf(),
            format,
            rank,
            target_modules: target_modules.into_iter().collect(),
            header,
            modules,
        })
    }

    /// Kohya keys → (part, PyTorch weight, down key, up key, alpha key), through the weights maps.
    fn kohya_pairs(&self, name: &str, header: &Header) -> Result<Vec<KeyPair>, LoraError> {
        let mut pairs = Vec::new();
        for key in header.tensors.keys() {
            let Some(base) = key.strip_suffix(".lora_down.weight") else {
                if !(key.ends_with(".lora_up.weight") || key.ends_with(".alpha")) {
                    return Err(LoraError::Format {
                        name: name.into(),
                        reason: format!(
                            "unexpected tensor {key:?} (LyCORIS and other networks are not supported)"
                        ),
                    });
                }
                continue;
            };
            let (part, flat) = if let Some(rest) = base.strip_prefix("lora_unet_") {
                (ModelPart::Unet, rest)
            } else if let Some(rest) = base.strip_prefix("lora_te2_") {
                (ModelPart::TextEncoder2, rest)
            } else if let Some(rest) =
                base.strip_prefix("lora_te1_").or_else(|| base.strip_prefix("lora_te_"))
            {
                (ModelPart::TextEncoder, rest)
            } else {
                return Err(LoraError::Format {
                    name: name.into(),
                    reason: format!("unexpected tensor {key:?}"),
                });
            };
            let map = self.part_map(name, part, flat)?;
            if let Err(reason) = &map.map {
                return Err(LoraError::WeightsMap { path: map.onnx.clone(), reason: reason.clone() });
            }
            let weight = map.kohya.get(flat).cloned().ok_or_else(|| LoraError::UnknownTarget {
                name: name.into(),
                part: part.as_str(),
                module: flat.into(),
            })?;
            pairs.push(KeyPair {
                part,
                weight,
                down: key.clone(),
                up: format!("{base}.lora_up.weight"),
                alpha: Some(format!("{base}.alpha")),
            });
        }
        Ok(pairs)
    }

    fn part_map(&self, name: &str, part: ModelPart, module: &str) -> Result<&PartMap, LoraError> {
        self.maps.get(&part).ok_or_else(|| LoraError::UnknownTarget {
            name: name.into(),
            part: part.as_str(),
            module: format!("{module} (the model has no {})", part.as_str()),
        })
    }

    fn check_module(
        &self,
        name: &str,
        path: &Path,
        header: &Header,
        pair: KeyPair,
        peft: &PeftConfig,
    ) -> Result<LoraModule, LoraError> {
        let part_map = self.part_map(name, pair.part, &pair.weight)?;
        let map = part_map.map.as_ref().map_err(|reason| LoraError::WeightsMap {
            path: part_map.onnx.clone(),
            reason: reason.clone(),
        })?;
        let module = pair.weight.trim_end_matches(".weight").to_string();
        let target = map.get(&pair.weight).ok_or_else(|| LoraError::UnknownTarget {
            name: name.into(),
            part: pair.part.as_str(),
            module: module.clone(),
        })?;
        let shape_error = |reason: String| LoraError::Shape {
            name: name.into(),
            part: pair.part.as_str(),
            module: pair.weight.clone(),
            reason,
        };
        let down = &header.tensors[&pair.down];
        let up = header
            .tensors
            .get(&pair.up)
            .ok_or_else(|| shape_error(format!("{} has no matching {}", pair.down, pair.up)))?;
        let rank = lora_rank(&down.shape, &up.shape, &target.shape).map_err(shape_error)?;
        let alpha = match pair.alpha.as_ref().and_then(|k| header.tensors.get(k).map(|e| (k, e))) {
            Some((key, entry)) => {
                if entry.len() != 1 {
                    return Err(shape_error(format!(
                        "{key} must hold one number, not shape {:?}",
                        entry.shape
                    )));
                }
                safetensors::read_tensor(path, header, key).map_err(|reason| LoraError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("{key}: {reason}"),
                })?[0]
            }
            None => peft.alpha(pair.part, &module).unwrap_or(rank as f32),
        };
        let scale = if peft.rslora(pair.part) { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
        Ok(LoraModule { part: pair.part, weight: pair.weight, down: pair.down, up: pair.up, rank, scale })
    }

    /// The initializers to override per part for `set` (parts the set leaves alone are absent).
    pub(crate) fn overrides(
        &self,
        set: &[(&LoraAdapter, f32)],
    ) -> Result<BTreeMap<ModelPart, InitializerOverrides>, LoraError> {
        let parts: BTreeSet<ModelPart> = set.iter().flat_map(|(a, _)| a.parts()).collect();
        parts.into_iter().map(|part| Ok((part, self.merged_initializers(set, part)?))).collect()
    }

    /// The initializers of the residual-input UNet for `set`, or `None` when the set leaves the
    /// UNet alone.
    pub(crate) fn residual_unet_overrides(
        &self,
        set: &[(&LoraAdapter, f32)],
    ) -> Result<Option<InitializerOverrides>, LoraError> {
        if !set.iter().any(|(a, _)| a.parts().contains(&ModelPart::Unet)) {
            return Ok(None);
        }
        let map = self.residual_unet.as_ref().ok_or_else(|| LoraError::Merge {
            part: "unet_controlnet",
            reason: "the model has no residual-input UNet".into(),
        })?;
        self.merged_into(set, ModelPart::Unet, map).map(Some)
    }

    /// The merged initializers of `part` for `set`, ready to replace those of the base model.
    fn merged_initializers(
        &self,
        set: &[(&LoraAdapter, f32)],
        part: ModelPart,
    ) -> Result<InitializerOverrides, LoraError> {
        let part_map = self.maps.get(&part).ok_or_else(|| LoraError::Merge {
            part: part.as_str(),
            reason: "the model has no such part".into(),
        })?;
        self.merged_into(set, part, part_map)
    }

    /// The merged initializers of the `part` modules of `set` in the graph `part_map` describes.
    fn merged_into(
        &self,
        set: &[(&LoraAdapter, f32)],
        part: ModelPart,
        part_map: &PartMap,
    ) -> Result<InitializerOverrides, LoraError> {
        let merge_error = |reason: String| LoraError::Merge { part: part.as_str(), reason };
        let map = part_map.map.as_ref().map_err(|r| merge_error(r.clone()))?;
        let mut targets: BTreeMap<&str, &MappedWeight> = BTreeMap::new();
        for (adapter, _) in set {
            for module in adapter.modules.iter().filter(|m| m.part == part) {
                let mapped = map
                    .get(&module.weight)
                    .ok_or_else(|| merge_error(format!("{} is not mapped", module.weight)))?;
                targets.insert(module.weight.as_str(), mapped);
            }
        }
        let names: BTreeSet<&str> = targets.values().map(|t| t.initializer.as_str()).collect();
        let mut base = onnx_weights::read_initializers(&part_map.onnx, &names).map_err(merge_error)?;
        // Accumulate in PyTorch's [out, in·k·k] layout, as diffusers fuses.
        let mut merged: BTreeMap<&str, MergeTarget> = BTreeMap::new();
        for (weight, mapped) in &targets {
            let init = base
                .remove(&mapped.initializer)
                .ok_or_else(|| merge_error(format!("{} missing", mapped.initializer)))?;
            merged.insert(weight, MergeTarget::of(mapped, init).map_err(merge_error)?);
        }
        for (adapter, weight) in set {
            let data = safetensors::read_data(&adapter.path, &adapter.header)
                .map_err(|reason| LoraError::Corrupt { path: adapter.path.clone(), reason })?;
            for module in adapter.modules.iter().filter(|m| m.part == part) {
                let tensor = |key: &str| {
                    let entry = &adapter.header.tensors[key];
                    safetensors::to_f32(&data, entry).map_err(|reason| LoraError::Corrupt {
                        path: adapter.path.clone(),
                        reason: format!("{key}: {reason}"),
                    })
                };
                let (down, up) = (tensor(&module.down)?, tensor(&module.up)?);
                let MergeTarget { matrix, .. } = merged
                    .get_mut(module.weight.as_str())
                    .ok_or_else(|| merge_error(module.weight.clone()))?;
                let (out, cols) = matrix.dim();
                let down = Array2::from_shape_vec((module.rank, cols), down)
                    .map_err(|e| merge_error(e.to_string()))?;
                let up =
                    Array2::from_shape_vec((out, module.rank), up).map_err(|e| merge_error(e.to_string()))?;
                let factor = weight * module.scale;
                matrix.scaled_add(factor, &up.dot(&down));
            }
        }
        into_overrides(merged, &targets).map_err(merge_error)
    }
}

/// A weight being merged, in PyTorch's `[out, in·k·k]` layout, and how the model stores it.
struct MergeTarget {
    matrix: Array2<f32>,
    kind: FloatKind,
    dims: Vec<usize>,
    /// Where the values sit in the model file (`None`: in an external data file).
    offset: Option<u64>,
}

/// The rank of the pair `up · down`, checked to be matrices that give a weight of `weight` shape.
fn lora_rank(down: &[usize], up: &[usize], weight: &[usize]) -> Result<usize, String> {
    let rank = down.first().copied().unwrap_or(0);
    let down_rest: usize = down.iter().skip(1).product();
    let up_rest: usize = up.iter().skip(1).product();
    let out = weight.first().copied().unwrap_or(0);
    let weight_rest: usize = weight.iter().skip(1).product();
    if rank == 0 || down.len() < 2 || up.len() < 2 {
        return Err(format!("down {down:?} and up {up:?} are not matrices"));
    }
    if up_rest != rank {
        return Err(format!("rank mismatch: down {down:?} has rank {rank}, up {up:?} expects {up_rest}"));
    }
    if up[0] != out || down_rest != weight_rest {
        return Err(format!("up {up:?} · down {down:?} does not give the weight's shape {weight:?}"));
    }
    Ok(rank)
}

/// The merged matrices back in each initializer's layout and encoding: patches at their offsets in
/// the model file, or whole values for initializers in external data.
fn into_overrides(
    merged: BTreeMap<&str, MergeTarget>,
    targets: &BTreeMap<&str, &MappedWeight>,
) -> Result<InitializerOverrides, String> {
    let mut overrides = InitializerOverrides::default();
    for (weight, MergeTarget { matrix, kind, dims, offset }) in merged {
        let mapped = targets[weight];
        let matrix = if mapped.transposed { matrix.reversed_axes() } else { matrix };
        let values: Vec<f32> = matrix.as_standard_layout().iter().copied().collect();
        match offset {
            Some(offset) => overrides.patches.push((offset, kind.encode(&values))),
            None => overrides.external.push((mapped.initializer.clone(), to_value(values, kind, &dims)?)),
        }
    }
    Ok(overrides)
}

impl MergeTarget {
    /// The base weight `init`, which `mapped` locates, as an `[out, in·k·k]` matrix.
    fn of(mapped: &MappedWeight, init: onnx_weights::Initializer) -> Result<MergeTarget, String> {
        let expected: usize = mapped.shape.iter().product();
        if init.values.len() != expected {
            return Err(format!(
                "initializer {} has shape {:?}, the map says {:?} (re-export the model)",
                mapped.initializer, init.dims, mapped.shape
            ));
        }
        let out = mapped.shape[0];
        let matrix = if mapped.transposed {
            Array2::from_shape_vec((expected / out, out), init.values)
                .map(|m| m.reversed_axes().as_standard_layout().into_owned())
        } else {
            Array2::from_shape_vec((out, expected / out), init.values)
        }
        .map_err(|e| e.to_string())?;
        Ok(MergeTarget { matrix, kind: init.kind, dims: init.dims, offset: init.offset_in_model })
    }
}

/// Trigger words: `<name>.json` (`{"trigger_words": [...]}`), else `<name>.txt` (comma or line
/// separated), else the file's metadata (`modelspec.trigger_phrase`, `trigger_words`).
fn trigger_words(path: &Path, metadata: &BTreeMap<String, String>) -> Vec<String> {
    #[derive(Deserialize)]
    struct Sidecar {
        trigger_words: Vec<String>,
    }
    let split = |text: &str| -> Vec<String> {
        text.split([',', '\n']).map(str::trim).filter(|w| !w.is_empty()).map(String::from).collect()
    };
    if let Ok(text) = std::fs::read_to_string(path.with_extension("json")) {
        match serde_json::from_str::<Sidecar>(&text) {
            Ok(sidecar) => return sidecar.trigger_words,
            Err(e) => {
                tracing::warn!(path = %path.with_extension("json").display(), error = %e, "ignoring LoRA sidecar")
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(path.with_extension("txt")) {
        return split(&text);
    }
    for key in ["modelspec.trigger_phrase", "trigger_words"] {
        if let Some(value) = metadata.get(key) {
            return serde_json::from_str::<Vec<String>>(value).unwrap_or_else(|_| split(value));
        }
    }
    Vec::new()
}

fn to_value(values: Vec<f32>, kind: FloatKind, dims: &[usize]) -> Result<DynValue, String> {
    let shape = IxDyn(dims);
    let value = match kind {
        FloatKind::F32 => {
            Tensor::from_array(ArrayD::from_shape_vec(shape, values).map_err(|e| e.to_string())?)
                .map(Tensor::into_dyn)
        }
        FloatKind::F16 => {
            let halves = values.into_iter().map(half::f16::from_f32).collect();
            Tensor::from_array(ArrayD::from_shape_vec(shape, halves).map_err(|e| e.to_string())?)
                .map(Tensor::into_dyn)
        }
        FloatKind::Bf16 => {
            let halves = values.into_iter().map(half::bf16::from_f32).collect();
            Tensor::from_array(ArrayD::from_shape_vec(shape, halves).map_err(|e| e.to_string())?)
                .map(Tensor::into_dyn)
        }
    };
    value.map_err(|e| e.to_string())
}
