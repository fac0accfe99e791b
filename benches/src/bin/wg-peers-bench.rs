//! wg-peers-bench: veil-wg's per-packet cost with 1,000 peers against 1 (scale issue).
//!
//! Two stand-alone veil-wg devices, one in each node namespace of a 2-node lab with encryption
//! off (benches/labs/bench.yaml), configured through their UAPI sockets with `wg set` as
//! veil-bench configures the reference WireGuards, carry traffic between two endpoint
//! namespaces of their own (198.19.205.10 beside node-a, 198.19.206.10 beside node-b). The
//! agent manages no peer of these devices (it removes peers it did not install from its own).
//!
//! Each round measures the same path at both peer counts, in alternating order: with the one
//! peer that carries the traffic, and with `--peers` − 1 more on each device (a key of its own,
//! one /32 of allowed IPs in 198.19.160.0/19 that nothing sends to, no endpoint: never a
//! handshake), added and removed through UAPI between the halves and counted with `wg show`
//! before measuring. Measured: TCP_RR 64 B (p50 µs, transactions/s), one iperf3 stream (Gbit/s)
//! and veil-wg's CPU seconds per GB over it. Ratios are many/one per round (paired), medians
//! over rounds. Prints a table, writes `wg-peers.json`. Needs root.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use clap::Parser;
use veil_benches::{
    cleanup,
    contender::{self, Contender, RefTunnel},
    lab::Lab,
    measure,
    report::median_or_nan,
};

#[derive(Parser, Debug)]
#[command(about = "veil-wg with 1,000 peers against 1: latency, throughput, CPU per GB")]
struct Args {
    /// Peers on each device in the large case (the one that carries traffic included).
    #[arg(long, default_value_t = 1000)]
    peers: u32,
    /// Rounds; each measures both peer counts.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of each TCP_RR and iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    #[command(flatten)]
    dirs: veil_benches::setup::Dirs,
}

/// The first address of the extra peers' allowed IPs (198.19.160.0/19: 8,192 addresses).
const EXTRA_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 160, 0);
const EXTRA_MAX: u32 = 8192;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Sample {
    rr_p50_us: f64,
    rr_per_s: f64,
    gbit_per_s: f64,
    cpu_seconds_per_gb: f64,
}

#[derive(Debug, serde::Serialize)]
struct Round {
    one: Sample,
    many: Sample,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.peers < 2 || args.peers - 1 > EXTRA_MAX {
        bail!("--peers must be 2 to {}", EXTRA_MAX + 1);
    }
    if args.rounds == 0 || args.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    let _guard = cleanup::start_as_root()?;
    let bins = veil_benches::setup::release_bins(
        args.dirs.bin_dir.as_deref(),
        &["veil", "veil-wg", "veil-rr"],
    )?;
    let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
    let state = PathBuf::from(cleanup::STATE_DIR);
    std::fs::create_dir_all(&state)?;
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/bench.yaml");
    let lab = Lab::up(
        &bins.join("veil"),
        "vwgpeers",
        &file,
        &["--quiet", "--ip-family", "ipv4", "--encryption", "off"],
    )?;
    let run = contender::start_reference(&lab, Contender::VeilWg, &bins.join("veil-wg"), &state)
        .and_then(|t| {
            let r = measure_rounds(&args, &t, &bins.join("veil-rr"));
            t.stop();
            r
        });
    lab.down();
    let rounds = run?;
    report(&args, &rounds, &out_dir)
}

/// Extra peers' public keys (their private keys are dropped: nothing ever talks to them).
fn extra_keys(n: u32) -> Vec<String> {
    (0..n)
        .map(|_| {
            veil_transport::PrivateKey::generate()
                .public_key()
                .to_base64()
        })
        .collect()
}

/// `wg set IFACE peer K allowed-ips A/32 …` (or `peer K remove …`) in one UAPI transaction.
fn set_extra(netns: &str, iface: &str, keys: &[String], add: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "wg", "set", iface]);
    for (i, k) in keys.iter().enumerate() {
        cmd.args(["peer", k]);
        if add {
            let a = Ipv4Addr::from(u32::from(EXTRA_BASE) + i as u32);
            cmd.args(["allowed-ips", &format!("{a}/32")]);
        } else {
            cmd.arg("remove");
        }
    }
    let out = cmd.output().context("running wg set")?;
    if !out.status.success() {
        bail!(
            "wg set {iface} ({} peers {}): {}",
            keys.len(),
            if add { "added" } else { "removed" },
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Peers the device holds, as `wg show IFACE peers` lists them.
fn peer_count(netns: &str, iface: &str) -> anyhow::Result<usize> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "wg", "show", iface, "peers"])
        .output()
        .context("running wg show")?;
    if !out.status.success() {
        bail!("wg show {iface} peers failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn measure_rounds(
    args: &Args,
    t: &RefTunnel,
    rr_bin: &std::path::Path,
) -> anyhow::Result<Vec<Round>> {
    let ends = t.endpoints();
    measure::start_servers(&ends, rr_bin)?;
    contender::warm_path(&ends)?;
    let pids = t.pids();
    let devices = t.interfaces();
    let keys: Vec<Vec<String>> = devices.iter().map(|_| extra_keys(args.peers - 1)).collect();
    let set_peers = |many: bool| -> anyhow::Result<()> {
        for ((netns, iface), k) in devices.iter().zip(&keys) {
            set_extra(netns, iface, k, many)?;
            let want = if many { args.peers as usize } else { 1 };
            let have = peer_count(netns, iface)?;
            if have != want {
                bail!("{iface} holds {have} peers, not {want}");
            }
        }
        Ok(())
    };
    let sample = || -> anyhow::Result<Sample> {
        let rr = measure::request_response(&ends, rr_bin, 64, f64::from(args.seconds))?;
        let tp = measure::iperf(&ends, 1, args.seconds, &pids)?;
        Ok(Sample {
            rr_p50_us: rr.p50_us,
            rr_per_s: rr.transactions as f64 / rr.seconds,
            gbit_per_s: tp.gbit_per_s,
            cpu_seconds_per_gb: tp.cpu_seconds_per_gb.unwrap_or(f64::NAN),
        })
    };
    let mut rounds = Vec::new();
    for r in 0..args.rounds {
        // Alternating order, so drift over the run weighs on both counts alike.
        let mut one = Sample::default();
        let mut many = Sample::default();
        for m in [r % 2 == 1, r % 2 == 0] {
            set_peers(m)?;
            if m {
                many = sample()?;
            } else {
                one = sample()?;
            }
        }
        eprintln!(
            "round {}: 1 peer {one:?}; {} peers {many:?}",
            r + 1,
            args.peers
        );
        rounds.push(Round { one, many });
    }
    set_peers(false)?;
    Ok(rounds)
}

fn report(args: &Args, rounds: &[Round], out_dir: &std::path::Path) -> anyhow::Result<()> {
    let med = |f: &dyn Fn(&Round) -> f64| median_or_nan(rounds.iter().map(f).collect());
    type Figure = fn(&Sample) -> f64;
    let rows: [(&str, Figure); 4] = [
        ("TCP_RR 64 B p50, µs", |s| s.rr_p50_us),
        ("TCP_RR 64 B, transactions/s", |s| s.rr_per_s),
        ("1 TCP stream, Gbit/s", |s| s.gbit_per_s),
        ("veil-wg CPU s per GB", |s| s.cpu_seconds_per_gb),
    ];
    println!(
        "veil-wg, 1 peer vs {} peers (medians of {} rounds; ratio: per round, paired)",
        args.peers,
        rounds.len()
    );
    println!("| figure | 1 peer | {} peers | ratio |", args.peers);
    println!("|---|---:|---:|---:|");
    let mut json = serde_json::Map::new();
    for (name, f) in rows {
        let one = med(&|r| f(&r.one));
        let many = med(&|r| f(&r.many));
        let ratio = med(&|r| f(&r.many) / f(&r.one));
        println!("| {name} | {one:.3} | {many:.3} | {ratio:.3} |");
        json.insert(
            name.into(),
            serde_json::json!({ "one": one, "many": many, "ratio": ratio }),
        );
    }
    let doc = serde_json::json!({
        "peers": args.peers,
        "seconds": args.seconds,
        "machine": veil_benches::setup::machine(),
        "medians": json,
        "rounds": rounds,
    });
    veil_benches::setup::write_results(out_dir, "wg-peers.json", &doc)?;
    Ok(())
}
