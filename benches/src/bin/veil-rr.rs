//! `veil-rr server --port P` / `veil-rr client --connect IP:P [--size 64] [--seconds 5]
//! [--new-connections | --http PATH]`: TCP request/response latency (netperf TCP_RR style; TCP_CRR with a new
//! connection per transaction), run inside lab pods by `veil-bench` and `svc-bench`.
//! The client prints one JSON object (p50/p90/p99/mean in µs, transactions).
//! `veil-rr flood --to IP [--first-port 20000] [--ports 10000] [--seconds 10]`: new UDP flows,
//! `--ports` a second (flow-bench); prints one JSON object (datagrams sent).

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "TCP request/response latency (one outstanding request)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every byte back, one thread per connection, until killed.
    Server {
        #[arg(long, default_value_t = 7001)]
        port: u16,
    },
    /// Time request/response round trips and print JSON.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1.0)]
        warmup_seconds: f64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// A new connection per transaction (TCP_CRR).
        #[arg(long)]
        new_connections: bool,
        /// HTTP/1.1 keep-alive instead: `GET PATH` per transaction, the server an HTTP server.
        #[arg(long, value_name = "PATH", conflicts_with = "new_connections")]
        http: Option<String>,
    },
    /// New UDP flows: each second one datagram to each of PORTS ports (the next PORTS in odd
    /// seconds), from a new source port.
    Flood {
        #[arg(long)]
        to: std::net::IpAddr,
        #[arg(long, default_value_t = 20000)]
        first_port: u16,
        #[arg(long, default_value_t = 10000)]
        ports: u16,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Server { port } => veil_benches::rr::serve(port),
        Cmd::Flood {
            to,
            first_port,
            ports,
            seconds,
        } => {
            let r = veil_benches::rr::flood(to, first_port, ports, seconds)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Client {
            connect,
            size,
            warmup_seconds,
            seconds,
            new_connections,
            http,
        } => {
            if let Some(path) = http {
                let r = veil_benches::rr::http_client(
                    connect,
                    &path,
                    Duration::from_secs_f64(warmup_seconds),
                    Duration::from_secs_f64(seconds),
                )?;
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let run = if new_connections {
                veil_benches::rr::crr_client
            } else {
                veil_benches::rr::client
            };
            let r = run(
                connect,
                size,
                Duration::from_secs_f64(warmup_seconds),
                Duration::from_secs_f64(seconds),
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}
