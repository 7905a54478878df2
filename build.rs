//! Compiles the vendored protos with the pure-Rust `protox` compiler, so a
//! fresh machine builds without a system `protoc`.

use std::io;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=proto");

    // The CRI API: messages, a client for the runtime side, and a server whose
    // every method defaults to Unimplemented (podckptd overrides only the ones
    // it serves; everything else is forwarded by path before it gets here).
    let cri = protox::compile(["cri/api.proto"], ["proto"]).map_err(io::Error::other)?;
    tonic_prost_build::configure()
        // serde(default): the runtime's verbose JSON (e.g. containerd's copy
        // of the CRI ContainerConfig) omits empty fields.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        // KeyValue.value is `bytes` (cri-api 1.34+), but the runtimes' verbose
        // JSON written before that holds it as a string: text stays text.
        .field_attribute(
            ".runtime.v1.KeyValue.value",
            "#[serde(with = \"crate::cri::json_bytes\")]",
        )
        .generate_default_stubs(true)
        .compile_fds(cri)?;

    // CRIU's RPC protocol (proto2): plain messages, no gRPC service.
    let criu = protox::compile(["criu/rpc.proto"], ["proto"]).map_err(io::Error::other)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(criu)?;
    Ok(())
}
