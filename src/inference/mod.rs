//! Model execution on ONNX Runtime: the runtime itself, the vision models and Stable Diffusion.

pub mod diffusion;
pub mod owner;
pub mod runtime;
pub mod vision;

pub use owner::{ModelOwner, NoAnswer, release_freed_memory};
pub use runtime::{
    ArenaExtend, ConvAlgoSearch, ExecutionProvider, InitializerOverrides, Runtime, RuntimeConfig,
    RuntimeError,
};

/// Hex sha256 of a model file, read in chunks (model files are large).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
