//! How adapter files name their tensors: diffusers / peft keys (and diffusers' older
//! attention-processor names), the family an adapter was trained for, and what each weight is.

use std::collections::BTreeMap;
use std::path::Path;

use super::safetensors::Header;
use super::{LoraError, ModelPart, PartMap, WeightsMapFile};
use crate::inference::diffusion::config::ModelFamily;

/// The tensors of one module in an adapter file.
pub(super) struct KeyPair {
    pub(super) part: ModelPart,
    pub(super) weight: String,
    pub(super) down: String,
    pub(super) up: String,
    pub(super) alpha: Option<String>,
}

/// diffusers / peft keys → module pairs.
pub(super) fn peft_pairs(name: &str, header: &Header) -> Result<Vec<KeyPair>, LoraError> {
    const DOWN: [(&str, &str); 3] = [
        (".lora_A.weight", ".lora_B.weight"),
        (".lora.down.weight", ".lora.up.weight"),
        (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ];
    let mut pairs = Vec::new();
    for key in header.tensors.keys() {
        let Some((base, up_suffix)) = DOWN.iter().find_map(|(d, u)| key.strip_suffix(d).map(|b| (b, *u)))
        else {
            let known_other = [".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight", ".alpha"];
            if !known_other.iter().any(|s| key.ends_with(s)) {
                return Err(LoraError::Format {
                    name: name.into(),
                    reason: format!("unexpected tensor {key:?}"),
                });
            }
            continue;
        };
        let (part, module) = if let Some(rest) = base.strip_prefix("unet.") {
            (ModelPart::Unet, rest)
        } else if let Some(rest) = base.strip_prefix("text_encoder_2.") {
            (ModelPart::TextEncoder2, rest)
        } else if let Some(rest) = base.strip_prefix("text_encoder.") {
            (ModelPart::TextEncoder, rest)
        } else if let Some(rest) = base.strip_prefix("base_model.model.") {
            (ModelPart::Unet, rest)
        } else {
            return Err(LoraError::Format {
                name: name.into(),
                reason: format!("tensor {key:?} names no sub-model (unet., text_encoder., text_encoder_2.)"),
            });
        };
        pairs.push(KeyPair {
            part,
            weight: format!("{}.weight", legacy_module_name(module)),
            down: key.clone(),
            up: format!("{base}{up_suffix}"),
            alpha: Some(format!("{base}.alpha")),
        });
    }
    Ok(pairs)
}

/// diffusers' old attention-processor names (`attn1.processor.to_q_lora`) → module names (`attn1.to_q`).
pub(super) fn legacy_module_name(module: &str) -> String {
    let module = module.replace(".processor.", ".");
    for (old, new) in
        [("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")]
    {
        if let Some(prefix) = module.strip_suffix(old) {
            return format!("{prefix}{new}");
        }
    }
    module
}

/// The peft `LoraConfig`s diffusers stores in `lora_adapter_metadata`, flattened with a part prefix.
#[derive(Debug, Default)]
pub(super) struct PeftConfig(serde_json::Map<String, serde_json::Value>);

impl PeftConfig {
    pub(super) fn from_metadata(metadata: &BTreeMap<String, String>) -> Result<PeftConfig, String> {
        let Some(text) = metadata.get("lora_adapter_metadata") else { return Ok(PeftConfig::default()) };
        let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| format!("lora_adapter_metadata is not a JSON object: {e}"))?;
        if config.iter().any(|(k, v)| k.ends_with("use_dora") && v.as_bool() == Some(true)) {
            return Err("DoRA adapters are not supported".into());
        }
        Ok(PeftConfig(config))
    }

    pub(super) fn get(&self, part: ModelPart, key: &str) -> Option<&serde_json::Value> {
        self.0.get(&format!("{}.{key}", part.as_str()))
    }

    /// `alpha_pattern` (matched as a module-name suffix, as peft does for plain names), else `lora_alpha`.
    pub(super) fn alpha(&self, part: ModelPart, module: &str) -> Option<f32> {
        let from_pattern = self.get(part, "alpha_pattern").and_then(|p| p.as_object()).and_then(|patterns| {
            patterns
                .iter()
                .find(|(pattern, _)| module == pattern.as_str() || module.ends_with(&format!(".{pattern}")))
                .and_then(|(_, v)| v.as_f64())
        });
        from_pattern.or_else(|| self.get(part, "lora_alpha").and_then(|v| v.as_f64())).map(|a| a as f32)
    }

    pub(super) fn rslora(&self, part: ModelPart) -> bool {
        self.get(part, "use_rslora").and_then(|v| v.as_bool()).unwrap_or(false)
    }
}

impl PartMap {
    pub(super) fn load(onnx: &Path) -> PartMap {
        let map_path = onnx.with_file_name("weights_map.json");
        let map = (|| {
            let text = std::fs::read_to_string(&map_path).map_err(|_| {
                format!("{} is missing; re-export the model with onnx/export_sd.sh", map_path.display())
            })?;
            let file: WeightsMapFile =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", map_path.display()))?;
            if file.format != "deskgen.weights_map.v1" {
                return Err(format!("{}: unknown format {:?}", map_path.display(), file.format));
            }
            let actual =
                crate::inference::sha256_file(onnx).map_err(|e| format!("{}: {e}", onnx.display()))?;
            if actual != file.onnx_sha256 {
                return Err(format!(
                    "{} describes another export of {} (sha256 differs); re-export with onnx/export_sd.sh",
                    map_path.display(),
                    onnx.display()
                ));
            }
            Ok(file.weights)
        })();
        let kohya = map
            .as_ref()
            .map(|weights| {
                weights
                    .keys()
                    .filter_map(|w| w.strip_suffix(".weight").map(|m| (m.replace('.', "_"), w.clone())))
                    .collect()
            })
            .unwrap_or_default();
        PartMap { onnx: onnx.to_path_buf(), map, kohya }
    }
}

/// A family the adapter declares or its keys reveal; `None` when nothing says.
pub(super) fn adapter_family(header: &Header) -> Option<ModelFamily> {
    let meta = |k: &str| header.metadata.get(k).map(|v| v.to_ascii_lowercase());
    if let Some(version) = meta("ss_base_model_version") {
        if version.starts_with("sdxl") {
            return Some(ModelFamily::StableDiffusionXl);
        }
        if version.starts_with("sd_v1") || version.starts_with("sd_v2") {
            return Some(ModelFamily::StableDiffusion);
        }
    }
    if let Some(arch) = meta("modelspec.architecture") {
        if arch.contains("xl") {
            return Some(ModelFamily::StableDiffusionXl);
        }
        if arch.starts_with("stable-diffusion-v") {
            return Some(ModelFamily::StableDiffusion);
        }
    }
    let keys = || header.tensors.keys();
    let xl_keys = keys().any(|k| k.starts_with("lora_te2_") || k.starts_with("text_encoder_2."))
        // kohya trains SDXL on the original (sgm) UNet, whose blocks have these names
        || keys().any(|k| {
            k.starts_with("lora_unet_input_blocks_") || k.starts_with("lora_unet_output_blocks_") || k.starts_with("lora_unet_middle_block_")
        });
    xl_keys.then_some(ModelFamily::StableDiffusionXl)
}

pub(super) fn family_name(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::StableDiffusion => "Stable Diffusion 1.x/2.x",
        ModelFamily::StableDiffusionXl => "SDXL",
    }
}

/// A short name for what a weight is: `to_q`, `to_out.0`, `q_proj`, `proj_in`, `conv1`.
pub(super) fn module_kind(weight: &str) -> String {
    let parts: Vec<&str> = weight.trim_end_matches(".weight").split('.').collect();
    match parts.as_slice() {
        [.., kind, index] if index.parse::<usize>().is_ok() => format!("{kind}.{index}"),
        [.., kind] => (*kind).to_string(),
        [] => String::new(),
    }
}
