//! `veil-proxy`: the node-local L7 HTTP policy proxy (`veil_agent::l7::proxy`). The agent starts
//! and supervises it; it runs as its own process so it can be restarted alone.
//!
//! `veil-proxy --listen-port PORT --control SOCKET`

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

#[derive(Parser)]
#[command(name = "veil-proxy", about = "veil's node-local L7 HTTP policy proxy")]
struct Args {
    /// Port of the listener on 127.0.0.1 the datapath hands connections to.
    #[arg(long, default_value_t = veil_agent::config::DEFAULT_PROXY_PORT)]
    listen_port: u16,
    /// Unix socket the agent connects to (configuration in, request records out).
    #[arg(long)]
    control: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // One thread: a request's downstream and upstream halves wake each other on the same
    // thread instead of across two (measured in benches/README.md: l7-bench).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veil-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = veil_agent::l7::proxy::Options {
        listen_port: args.listen_port,
        control: args.control,
    };
    match rt.block_on(veil_agent::l7::proxy::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-proxy: {}", veil_agent::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
