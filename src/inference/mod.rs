//! Model execution on ONNX Runtime: the runtime itself, the vision models and Stable Diffusion.

pub mod diffusion;
pub mod runtime;
pub mod vision;

pub use runtime::{ExecutionProvider, Runtime, RuntimeConfig, RuntimeError};
