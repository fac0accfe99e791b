//! flow-bench: node-a's agent under 10,000 new flows a second (scale issue): its CPU and
//! memory, and the flow records it wrote.
//!
//! A 2-node lab (benches/labs/bench.yaml, IPv4, encryption on). The `client` pod on node-a
//! runs `veil-rr flood`: each second one UDP datagram to each of `--ports` ports of the `server`
//! pod on node-b (the next `--ports` ports in odd seconds), from a new source port, so every
//! datagram is a new flow and its (identities, port) recurs only every 2 s, past the
//! datapath's one-per-second event throttle: up to `--ports` flow events a
//! second into the ring buffer, which node-a's agent drains into its flow store (4,096 records
//! in memory) and its flow log on disk. Measured on node-a's agent: its CPU (% of one core)
//! over an idle window and over the flood, each `--seconds` long; RSS before, after, and its
//! VmHWM; the flow records added during the flood (the newest record's `seq`, from
//! `veil observe`). Prints a table, writes `flow.json`. Needs root.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Parser;
use veil_benches::{cleanup, contender, lab::Lab, procs};

#[derive(Parser, Debug)]
#[command(about = "The agent's CPU and memory under 10,000 new flows a second")]
struct Args {
    /// New flows a second (ports of the server each second).
    #[arg(long, default_value_t = 10_000)]
    ports: u16,
    /// Seconds of the idle window and of the flood.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    #[command(flatten)]
    dirs: veil_benches::setup::Dirs,
}

#[derive(Debug, serde::Serialize)]
struct Run {
    flows_per_second_sent: f64,
    datagrams: u64,
    send_errors: u64,
    flood_seconds: f64,
    records: u64,
    records_per_second: f64,
    idle_cpu_percent: f64,
    flood_cpu_percent: f64,
    rss_before_mb: f64,
    rss_after_mb: f64,
    peak_rss_mb: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.ports == 0 || args.seconds == 0 {
        bail!("--ports and --seconds must be at least 1");
    }
    let _guard = cleanup::start_as_root()?;
    let bins =
        veil_benches::setup::release_bins(args.dirs.bin_dir.as_deref(), &["veil", "veil-rr"])?;
    let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/bench.yaml");
    let lab = Lab::up(
        &bins.join("veil"),
        "vflow",
        &file,
        &["--quiet", "--ip-family", "ipv4"],
    )?;
    let run = measure(&args, &lab, &bins.join("veil-rr"));
    lab.down();
    let run = run?;
    println!(
        "node-a's agent, {} new flows/s for {} s (sent {:.0}/s)",
        args.ports, args.seconds, run.flows_per_second_sent
    );
    println!("| figure | value |");
    println!("|---|---:|");
    for (name, v) in [
        ("flow records written per second", run.records_per_second),
        ("agent CPU idle, % of a core", run.idle_cpu_percent),
        (
            "agent CPU during the flood, % of a core",
            run.flood_cpu_percent,
        ),
        ("agent RSS before, MB", run.rss_before_mb),
        ("agent RSS after, MB", run.rss_after_mb),
        ("agent VmHWM, MB", run.peak_rss_mb),
    ] {
        println!("| {name} | {v:.2} |");
    }
    let doc = serde_json::json!({
        "ports": args.ports,
        "seconds": args.seconds,
        "machine": veil_benches::setup::machine(),
        "run": run,
    });
    veil_benches::setup::write_results(&out_dir, "flow.json", &doc)?;
    Ok(())
}

/// The newest flow record's sequence number on node-a (0: none yet).
fn newest_seq(lab: &Lab) -> anyhow::Result<u64> {
    let out = veil_benches::lab::run(std::process::Command::new(lab.veil()).args([
        "observe",
        "--name",
        lab.name(),
        "--node",
        "node-a",
        "--last",
        "1",
        "-o",
        "json",
    ]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap_or(0))
}

fn measure(args: &Args, lab: &Lab, rr_bin: &std::path::Path) -> anyhow::Result<Run> {
    contender::warm_path(&contender::Ends::Pods(lab))?;
    let pid = Some(lab.status("node-a")?.agent.pid)
        .filter(|&p| p != 0)
        .context("veil status: no agent pid for node-a")?;
    let window = std::time::Duration::from_secs(u64::from(args.seconds));
    let c0 = procs::cpu_seconds(pid)?;
    // The idle window: the same length as the flood, nothing sent.
    std::thread::sleep(window);
    let c1 = procs::cpu_seconds(pid)?;
    let (rss_before, _) = procs::rss_bytes(pid)?;
    let seq0 = newest_seq(lab)?;
    let server = lab.pod("server")?.ip.clone();
    let c2 = procs::cpu_seconds(pid)?;
    let out = lab.exec(
        "client",
        &[
            &rr_bin.display().to_string(),
            "flood",
            "--to",
            &server,
            "--ports",
            &args.ports.to_string(),
            "--seconds",
            &args.seconds.to_string(),
        ],
    )?;
    let c3 = procs::cpu_seconds(pid)?;
    let flood: veil_benches::rr::FloodResult =
        serde_json::from_str(out.trim()).context("veil-rr flood output")?;
    let seq1 = newest_seq(lab)?;
    let (rss_after, peak) = procs::rss_bytes(pid)?;
    let records = seq1.saturating_sub(seq0);
    if records == 0 {
        bail!("no flow record written during the flood");
    }
    Ok(Run {
        flows_per_second_sent: flood.datagrams as f64 / flood.seconds,
        datagrams: flood.datagrams,
        send_errors: flood.send_errors,
        flood_seconds: flood.seconds,
        records,
        records_per_second: records as f64 / flood.seconds,
        idle_cpu_percent: (c1 - c0) / window.as_secs_f64() * 100.0,
        flood_cpu_percent: (c3 - c2) / flood.seconds * 100.0,
        rss_before_mb: rss_before as f64 / 1e6,
        rss_after_mb: rss_after as f64 / 1e6,
        peak_rss_mb: peak as f64 / 1e6,
    })
}
