use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = [
        "waymark/common/v1/event.proto",
        "waymark/common/v1/identity.proto",
        "waymark/common/v1/event_sink.proto",
        "waymark/common/v1/outbox.proto",
        "waymark/ingest/v1/ingest.proto",
        "waymark/profile/v1/profile.proto",
        "waymark/orchestration/v1/journey.proto",
        "waymark/orchestration/v1/orchestration.proto",
        "waymark/analytics/v1/analytics.proto",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // `prost::Name` lets `proto_json` find each message's descriptor by its type.
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("waymark_descriptor.bin"))
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
