fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox compiles the .proto in pure Rust, so no system protoc is needed.
    println!("cargo:rerun-if-changed=proto/hoist.proto");
    let fds = protox::compile(["proto/hoist.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
