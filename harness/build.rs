//! Compiles the vendored CRI v1 proto (`proto/api.proto`) into a tonic client without `protoc`:
//! the pure-Rust `protox` parses it into a file descriptor set, which `tonic-prost-build` turns
//! into Rust. Only the client side is generated.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/api.proto");
    let fds = protox::compile(["api.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
