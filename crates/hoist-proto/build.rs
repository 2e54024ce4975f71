fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox compiles the .proto in pure Rust, so no system protoc is needed.
    println!("cargo:rerun-if-changed=proto/hoist.proto");
    let fds = protox::compile(["proto/hoist.proto"], ["proto"])?;
    // Build records are kept as JSON by the builder and printed as JSON by `hoist builds show --json`.
    let record = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    tonic_prost_build::configure()
        .type_attribute(".hoist.v1.BuildRecord", record)
        .type_attribute(".hoist.v1.BuildStep", record)
        .compile_fds(fds)?;
    Ok(())
}
