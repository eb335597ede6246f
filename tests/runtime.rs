//! ONNX Runtime loads from the fetched library; execution-provider choices behave as documented.

use deskgen::inference::{ExecutionProvider, Runtime, RuntimeConfig, RuntimeError};

fn config(execution_provider: ExecutionProvider) -> RuntimeConfig {
    RuntimeConfig { execution_provider, ..RuntimeConfig::default() }
}

#[test]
fn cpu_runtime_builds_sessions_and_names_missing_models() {
    let runtime = Runtime::init(&config(ExecutionProvider::Cpu)).expect("make ort fetched the library");
    assert_eq!(runtime.provider(), ExecutionProvider::Cpu);
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx/fixtures/tiny-sd15/vae_decoder/model.onnx");
    let session = runtime.session(&model).expect("a real model loads");
    assert_eq!(session.inputs()[0].name(), "latent_sample");
    let missing = runtime.session(std::path::Path::new("/nonexistent/model.onnx")).unwrap_err();
    assert!(matches!(missing, RuntimeError::Model { .. }));
    assert!(missing.to_string().contains("/nonexistent/model.onnx"), "{missing}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_fails_loudly_and_auto_falls_back_to_cpu() {
    let error = Runtime::init(&config(ExecutionProvider::Cuda)).err().expect("no CUDA in a CPU build");
    assert!(matches!(error, RuntimeError::Provider { provider: "cuda", .. }), "{error}");
    assert!(error.to_string().contains("--features cuda"), "{error}");
    let auto = Runtime::init(&config(ExecutionProvider::Auto)).expect("auto falls back");
    assert_eq!(auto.provider(), ExecutionProvider::Cpu);
}
