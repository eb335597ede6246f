//! Stable Diffusion on ONNX Runtime.

pub mod schedulers;
