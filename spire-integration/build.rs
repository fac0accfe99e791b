//! Compiles the Workload and Delegated Identity API protos with protox (a pure-Rust protobuf
//! compiler: the machines have no `protoc`) and generates tonic clients and servers.

fn main() -> anyhow::Result<()> {
    let fds = protox::compile(
        [
            "workload.proto",
            "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry private keys get a hand-written, redacted Debug.
        .skip_debug([
            ".X509SVID",
            ".spire.api.agent.delegatedidentity.v1.X509SVIDWithKey",
        ])
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
