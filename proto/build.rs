//! Compiles `proto/` with protox (pure Rust, no system protoc) and generates prost messages and tonic
//! clients/servers into OUT_DIR, plus the encoded file descriptor set that reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "kosmos/tensor/v1/tensor.proto",
    "kosmos/encoder/v1/encoder.proto",
    "kosmos/decoder/v1/decoder.proto",
    "kosmos/v1/kosmos.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files: Vec<PathBuf> = PROTOS.iter().map(|proto| root.join(proto)).collect();
    let descriptors = protox::compile(&files, [&root])?;
    std::fs::write(
        out_dir.join("kosmos_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=kosmos");
    Ok(())
}
