//! A model's own generation defaults, from `deskgen-defaults.json` beside its configs: few-step
//! models (SD-Turbo, SDXL-Turbo) are made for 1 to 4 steps without guidance, which neither
//! `model_index.json` nor `scheduler_config.json` records. `onnx/export_sd.sh` and
//! `deskgen models pull` write the file for the repos in `config/model-defaults.json`; a user may
//! write or edit it for any model.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::DiffusionError;
use super::config::{config_error, read_json};
use super::pipeline::MAX_STEPS;
use super::schedulers::SchedulerKind;

/// The file's name inside a model directory.
pub const DEFAULTS_FILE: &str = "deskgen-defaults.json";

/// The defaults of known hub repos, by repo id.
const KNOWN: &str = include_str!("../../../config/model-defaults.json");

/// What a request that sets none of these gets on this model; absent keys keep the service's
/// defaults (50 steps, guidance 7.5, the scheduler of `scheduler_config.json`, the UNet's size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// Denoising steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_inference_steps: Option<u32>,
    /// Classifier-free guidance scale; 1 or less runs the conditional pass alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f32>,
    /// Scheduler id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
    /// Image side in pixels, for both width and height.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
}

impl ModelDefaults {
    /// `dir/deskgen-defaults.json`, or no defaults when there is none; sides must be multiples of
    /// `size_multiple`.
    pub fn load(dir: &Path, size_multiple: usize) -> Result<ModelDefaults, DiffusionError> {
        let path = dir.join(DEFAULTS_FILE);
        if !path.is_file() {
            return Ok(ModelDefaults::default());
        }
        let defaults: ModelDefaults = read_json(&path)?;
        defaults.check(size_multiple).map_err(|reason| config_error(&path, reason))?;
        Ok(defaults)
    }

    /// The defaults `config/model-defaults.json` gives the hub repo `repo` (e.g.
    /// `stabilityai/sd-turbo`), if it is one of those listed there.
    pub fn known(repo: &str) -> Option<ModelDefaults> {
        let known: BTreeMap<String, ModelDefaults> = serde_json::from_str(KNOWN).ok()?;
        known.get(repo).copied()
    }

    /// Writes these defaults as `dir/deskgen-defaults.json`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(DEFAULTS_FILE), text + "\n")
    }

    fn check(&self, size_multiple: usize) -> Result<(), String> {
        if let Some(steps) = self.num_inference_steps
            && !(1..=MAX_STEPS).contains(&steps)
        {
            return Err(format!("num_inference_steps must be between 1 and {MAX_STEPS}"));
        }
        if let Some(guidance) = self.guidance_scale
            && !(guidance.is_finite() && guidance >= 0.0)
        {
            return Err("guidance_scale must be a finite number, 0 or more".into());
        }
        if let Some(size) = self.size
            && (size == 0 || !(size as usize).is_multiple_of(size_multiple.max(8)))
        {
            return Err(format!("size {size} is not a positive multiple of {}", size_multiple.max(8)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_repos_parse_and_pass_their_own_checks() {
        let known: BTreeMap<String, ModelDefaults> = serde_json::from_str(KNOWN).unwrap();
        assert!(known.len() >= 4);
        for (repo, defaults) in &known {
            assert_eq!(defaults.check(64), Ok(()), "{repo}");
        }
        let turbo = ModelDefaults::known("stabilityai/sd-turbo").unwrap();
        assert_eq!(turbo.num_inference_steps, Some(1));
        assert_eq!(turbo.scheduler, Some(SchedulerKind::EulerAncestral));
        assert_eq!(ModelDefaults::known("runwayml/stable-diffusion-v1-5"), None);
    }

    #[test]
    fn a_written_file_loads_back_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ModelDefaults::load(dir.path(), 8).unwrap(), ModelDefaults::default());
        let defaults =
            ModelDefaults { num_inference_steps: Some(4), guidance_scale: Some(1.0), ..Default::default() };
        defaults.write(dir.path()).unwrap();
        assert_eq!(ModelDefaults::load(dir.path(), 8).unwrap(), defaults);
        for bad in [
            r#"{"num_inference_steps": 0}"#,
            r#"{"size": 500}"#,
            r#"{"steps": 4}"#,
            r#"{"scheduler": "pndm"}"#,
        ] {
            std::fs::write(dir.path().join(DEFAULTS_FILE), bad).unwrap();
            let error = ModelDefaults::load(dir.path(), 8).unwrap_err().to_string();
            assert!(error.contains(DEFAULTS_FILE), "{bad}: {error}");
        }
    }
}
