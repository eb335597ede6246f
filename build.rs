//! Compiles proto/ into Rust (tonic + prost) and a descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/deskgen/v1/common.proto",
        "proto/deskgen/v1/generate.proto",
        "proto/deskgen/v1/result.proto",
        "proto/deskgen/v1/info.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("deskgen_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
