//! Which export of a pipeline to load, and whether each sub-model can run where it is placed.
//!
//! `onnx/export_sd.sh --target cuda` writes a graph fused for CUDA (operators such as GroupNorm,
//! NhwcConv and BiasSplitGelu that only have CUDA kernels); `--target cpu` the plain graph. Either
//! way the export folder holds `deskgen-export.json`, which records per sub-model the execution
//! provider its graph needs. A model folder may hold both exports as `cpu/` and `cuda/`; deskgen
//! then loads the one that matches the execution provider.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::DiffusionError;
use super::config::{config_error, read_json};
use crate::inference::ExecutionProvider;

/// The manifest's file name inside an export folder.
pub const MANIFEST: &str = "deskgen-export.json";

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ExportManifest {
    #[serde(default)]
    models: BTreeMap<String, ManifestModel>,
}

#[derive(Debug, serde::Deserialize)]
struct ManifestModel {
    /// "cuda" when the graph holds CUDA-only operators, "any" otherwise.
    execution_provider: String,
}

/// The export folder to load from `dir`: `dir` itself when it holds a pipeline, else its `cuda/`
/// or `cpu/` variant for `provider`.
pub fn resolve_variant(dir: &Path, provider: ExecutionProvider) -> PathBuf {
    if dir.join("model_index.json").is_file() {
        return dir.to_path_buf();
    }
    let variant = dir.join(provider.as_str());
    if variant.join("model_index.json").is_file() { variant } else { dir.to_path_buf() }
}

impl ExportManifest {
    /// The manifest in `dir`; an export without one (optimum's own) is taken as plain.
    pub(crate) fn load(dir: &Path) -> Result<ExportManifest, DiffusionError> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Ok(ExportManifest::default());
        }
        read_json(&path)
    }

    /// Refuses to place a CUDA-only graph of `model` on `provider`.
    pub(crate) fn check(
        &self,
        dir: &Path,
        model: &str,
        provider: ExecutionProvider,
    ) -> Result<(), DiffusionError> {
        let needs_cuda = self.models.get(model).is_some_and(|m| m.execution_provider == "cuda");
        if needs_cuda && provider != ExecutionProvider::Cuda {
            return Err(config_error(
                &dir.join(model).join("model.onnx"),
                format!(
                    "this graph was optimised for CUDA (fused operators without CPU kernels, see {MANIFEST}) \
                     and cannot run on the {}: run with --execution-provider cuda, leave {model} out of \
                     --cpu-models, or load the plain export (onnx/export_sd.sh --target cpu)",
                    provider.as_str()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn picks_the_variant_of_the_execution_provider() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("cpu/model_index.json"), "{}");
        write(&root.path().join("cuda/model_index.json"), "{}");
        assert_eq!(resolve_variant(root.path(), ExecutionProvider::Cuda), root.path().join("cuda"));
        assert_eq!(resolve_variant(root.path(), ExecutionProvider::Cpu), root.path().join("cpu"));
        let single = root.path().join("cpu");
        assert_eq!(resolve_variant(&single, ExecutionProvider::Cuda), single);
    }

    #[test]
    fn refuses_a_cuda_only_graph_on_the_cpu() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join(MANIFEST),
            r#"{"target": "cuda", "models": {"unet": {"execution_provider": "cuda"},
                "text_encoder": {"execution_provider": "any"}}}"#,
        );
        let manifest = ExportManifest::load(root.path()).unwrap();
        let error = manifest.check(root.path(), "unet", ExecutionProvider::Cpu).unwrap_err().to_string();
        assert!(error.contains("optimised for CUDA"), "{error}");
        assert!(error.contains("--execution-provider cuda"), "{error}");
        manifest.check(root.path(), "unet", ExecutionProvider::Cuda).unwrap();
        manifest.check(root.path(), "text_encoder", ExecutionProvider::Cpu).unwrap();
        ExportManifest::load(&root.path().join("none"))
            .unwrap()
            .check(root.path(), "unet", ExecutionProvider::Cpu)
            .unwrap();
    }
}
