//! Which files of a repo the ONNX layout needs: `model_index.json` at the folder's root, and in
//! each component folder its configs, tokenizer files, `.onnx` graphs and their external data —
//! never PyTorch, Flax or TensorFlow weights, images or docs.

use std::collections::BTreeSet;

use crate::inference::diffusion::MANIFEST;

/// Files a tokenizer folder may hold besides its JSON.
const TOKENIZER_FILES: [&str; 2] = ["merges.txt", "vocab.txt"];
/// Weights of other frameworks, and other files no ONNX pipeline reads.
const SKIPPED_EXTENSIONS: [&str; 22] = [
    "safetensors",
    "bin",
    "ckpt",
    "pt",
    "pth",
    "msgpack",
    "h5",
    "ot",
    "pkl",
    "npz",
    "tflite",
    "png",
    "jpg",
    "jpeg",
    "gif",
    "webp",
    "bmp",
    "svg",
    "md",
    "txt",
    "pdf",
    "py",
];
/// Prefixes of Flax and TensorFlow weight files.
const SKIPPED_PREFIXES: [&str; 2] = ["flax_model", "tf_model"];

/// Folders of an export holding one pipeline per execution provider (see `resolve_variant`).
const VARIANTS: [&str; 2] = ["cpu", "cuda"];

/// Why a folder cannot give an ONNX pipeline.
#[derive(Debug, PartialEq)]
pub(super) enum Missing {
    /// A pipeline without a `.onnx` file (a PyTorch-only repo); `elsewhere`: folders of the repo
    /// that hold an ONNX pipeline.
    Onnx {
        /// Folders with a `model_index.json` and `.onnx` files under them.
        elsewhere: Vec<String>,
    },
    /// No `model_index.json` at the folder's root.
    ModelIndex {
        /// Folders with a `model_index.json` and `.onnx` files under them.
        elsewhere: Vec<String>,
    },
}

/// The paths (from the repo root) under `folder` (empty: the whole repo) that the ONNX layout
/// needs. Pipelines nested in the folder's pipeline (an `onnx/` export beside PyTorch weights) are
/// other models and left out; a folder of `cpu/` and `cuda/` exports is pulled whole.
pub(super) fn onnx_files<'a>(files: &'a [String], folder: &str) -> Result<Vec<&'a str>, Missing> {
    let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
    let inside: Vec<(&str, &str)> = files
        .iter()
        .filter_map(|path| path.strip_prefix(prefix.as_str()).map(|relative| (path.as_str(), relative)))
        .collect();
    let roots: BTreeSet<&str> = inside.iter().filter_map(|(_, relative)| pipeline_root(relative)).collect();
    let elsewhere = || onnx_pipelines(files).into_iter().filter(|root| root != folder).collect();
    let pipeline: Vec<(&str, &str)> = if roots.contains("") {
        let nested = |relative: &str| roots.iter().any(|root| !root.is_empty() && under(relative, root));
        inside.into_iter().filter(|(_, relative)| !nested(relative)).collect()
    } else if !roots.is_empty() && roots.iter().all(|root| VARIANTS.contains(root)) {
        inside
    } else {
        return Err(Missing::ModelIndex { elsewhere: elsewhere() });
    };
    let onnx_dirs: BTreeSet<&str> =
        pipeline.iter().filter(|(_, relative)| relative.ends_with(".onnx")).map(|(_, r)| parent(r)).collect();
    if onnx_dirs.is_empty() {
        return Err(Missing::Onnx { elsewhere: elsewhere() });
    }
    Ok(pipeline
        .into_iter()
        .filter(|(_, relative)| needed(relative, &onnx_dirs))
        .map(|(path, _)| path)
        .collect())
}

/// The folder a `model_index.json` makes a pipeline of (empty at the root).
fn pipeline_root(path: &str) -> Option<&str> {
    if path == "model_index.json" { Some("") } else { path.strip_suffix("/model_index.json") }
}

/// Folders of the repo (other than its root) that hold an ONNX pipeline.
fn onnx_pipelines(files: &[String]) -> Vec<String> {
    let has_onnx = |root: &str| files.iter().any(|path| path.ends_with(".onnx") && under(path, root));
    files
        .iter()
        .filter_map(|path| pipeline_root(path))
        .filter(|root| !root.is_empty() && has_onnx(root))
        .map(str::to_string)
        .collect()
}

/// Whether `path` lies inside the folder `root`.
fn under(path: &str, root: &str) -> bool {
    path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// Whether the file at `relative` (from the pipeline's root) is part of the ONNX pipeline.
fn needed(relative: &str, onnx_dirs: &BTreeSet<&str>) -> bool {
    let (dir, name) = (parent(relative), relative.rsplit('/').next().unwrap_or(relative));
    if dir.is_empty() {
        return name == "model_index.json" || name == MANIFEST;
    }
    if TOKENIZER_FILES.contains(&name) || name.ends_with(".onnx") {
        return true;
    }
    if skipped(name) {
        return false;
    }
    // Configs anywhere; anything else only beside a graph, as its external data.
    name.ends_with(".json") || onnx_dirs.contains(dir)
}

/// Weights of other frameworks (and their shard indexes), images and docs.
fn skipped(name: &str) -> bool {
    let extension = name.rsplit_once('.').map_or("", |(_, extension)| extension).to_ascii_lowercase();
    name.starts_with('.')
        || SKIPPED_EXTENSIONS.contains(&extension.as_str())
        || SKIPPED_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin.index.json")
}

/// The folder part of a relative path; empty at the root.
fn parent(relative: &str) -> &str {
    relative.rsplit_once('/').map_or("", |(dir, _)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keeps_the_onnx_layout_and_skips_other_frameworks() {
        let files = names(&[
            ".gitattributes",
            "README.md",
            "model_index.json",
            "sample.png",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.onnx",
            "text_encoder/model.safetensors",
            "text_encoder/flax_model.msgpack",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/special_tokens_map.json",
            "unet/model.onnx",
            "unet/model.onnx_data",
            "unet/weights.pb",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/README.md",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/config.json",
        ]);
        let kept = onnx_files(&files, "").unwrap();
        assert_eq!(
            kept,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.onnx",
                "tokenizer/merges.txt",
                "tokenizer/vocab.json",
                "tokenizer/special_tokens_map.json",
                "unet/model.onnx",
                "unet/model.onnx_data",
                "unet/weights.pb",
                "vae/config.json",
            ]
        );
    }

    #[test]
    fn a_subfolder_is_a_pipeline_of_its_own() {
        let files = names(&[
            "model_index.json",
            "unet/x.safetensors",
            "onnx/model_index.json",
            "onnx/unet/model.onnx",
        ]);
        assert_eq!(onnx_files(&files, "onnx").unwrap(), ["onnx/model_index.json", "onnx/unet/model.onnx"]);
        let elsewhere = vec!["onnx".to_string()];
        assert_eq!(onnx_files(&files, ""), Err(Missing::Onnx { elsewhere: elsewhere.clone() }));
        assert_eq!(
            onnx_files(&names(&["onnx/model_index.json", "onnx/unet/model.onnx"]), ""),
            Err(Missing::ModelIndex { elsewhere })
        );
    }

    #[test]
    fn cpu_and_cuda_exports_are_pulled_together() {
        let files = names(&[
            "README.md",
            "cpu/model_index.json",
            "cpu/unet/model.onnx",
            "cuda/model_index.json",
            "cuda/unet/model.onnx",
        ]);
        assert_eq!(onnx_files(&files, "").unwrap().len(), 4);
    }

    #[test]
    fn a_pytorch_only_repo_has_nothing_to_pull() {
        let files =
            names(&["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]);
        assert_eq!(onnx_files(&files, ""), Err(Missing::Onnx { elsewhere: vec![] }));
    }
}
