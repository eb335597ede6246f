//! A missing ONNX Runtime library is a clear error naming the fix, not a panic.

use deskgen::inference::{Runtime, RuntimeConfig, RuntimeError};

#[test]
fn a_missing_library_says_how_to_fetch_it() {
    // SAFETY: this test binary has a single test and sets the variable before any thread reads it.
    unsafe { std::env::set_var("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so") };
    let error = Runtime::init(&RuntimeConfig::default()).err().expect("init must fail");
    assert!(matches!(error, RuntimeError::Library { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("/nonexistent/libonnxruntime.so"), "{message}");
    assert!(message.contains("make ort"), "{message}");
}
