//! tc-cost: per-packet cost of `veil_from_pod` with 10, 1,000 and 100,000 policy entries
//! (benchmarks issue, item 4; target: flat within ±10 %), and with `--ipcache`, with up to
//! 100,000 remote endpoints in the ipcache (scale issue).
//!
//! Loads veil's programs once per policy size through the agent's test-run harness (a private
//! pin directory and network namespace each, nothing attached), fills each with the same node
//! (three local pods, two peers' pod CIDRs) and a policy map of exactly N entries: the measured
//! flow's two entries (frontend egress and backend ingress, both endpoints selected) among
//! N − 4 others spread over hundreds of local and thousands of remote identities, ports and
//! both protocols and directions. Then, interleaved size after size for several rounds, it times
//! through `BPF_PROG_TEST_RUN`:
//! - `deny`: a new flow that policy drops (intruder → backend 8080: default deny at the
//!   backend's ingress, 1 + 7 lookups, the throttled drop event), `repeat` runs per sample;
//! - `allow-new`: a new connection that policy admits (frontend → backend 8080: 2 × 7 lookups,
//!   conntrack insert, the throttled event); every run must be a new flow, so each sample is
//!   one run with a fresh source port (the kernel's own per-run time, which includes a few
//!   tens of ns of its timer), median over `--new-flows` runs;
//! - `established`: an ACK of that connection, admitted by its SYN first (conntrack hit),
//!   `repeat` runs.
//!
//! Prints per size the median ns over rounds with its min–max, and the ratio to the smallest
//! map: the median over rounds of paired per-round ratios (same round, fractions of a second
//! apart, so a shared machine's load cancels), with its interquartile range. `--json` prints
//! the same as one JSON object. Needs root and BPF.
//!
//! Unlike the lab benchmarks this binary uses the agent library (the embedded eBPF object and
//! its test-run harness), not the `veil` binary: there is no CLI for a test run.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use veil_agent::datapath::{
    maps::Prefix,
    testrun::{
        packet::{self, Packet},
        tc_act, TestDatapath,
    },
};
use veil_common::{
    config_flags,
    maps::{direction, node_flags, policy_flags, DatapathConfig, NodeInfo, PolicyEntry, PolicyKey},
    programs,
};

#[derive(Parser, Debug)]
#[command(about = "Per-packet cost of veil's TC program by policy map size")]
struct Args {
    /// Policy map sizes (entries).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    sizes: Vec<usize>,
    /// ipcache sizes: remote endpoints (/32s over 1,000 other nodes and 1,000 identities, in
    /// 198.18.4.0-198.18.255.255 and 198.19.16.0-198.19.255.255) beside the measured node's
    /// 203 entries. Every policy size is loaded with every ipcache size (the scale issue: cost
    /// at 100,000 endpoints against 1,000).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    ipcache: Vec<usize>,
    /// Runs per timed sample for the repeatable cases.
    #[arg(long, default_value_t = 200_000)]
    repeat: u32,
    /// Interleaved rounds (each size, each case, once per round). Many short rounds spread a
    /// shared machine's noise evenly over the sizes.
    #[arg(long, default_value_t = 21)]
    rounds: usize,
    /// New connections timed per round for `allow-new`.
    #[arg(long, default_value_t = 5_000)]
    new_flows: u16,
    /// Pin the benchmark to this CPU (the test runs execute on the caller's CPU).
    #[arg(long)]
    cpu: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const NODE: u32 = 1;
const FE: u32 = 256;
const BE: u32 = 257;
const IN: u32 = 258;
const TCP: u8 = packet::IPPROTO_TCP;
const UDP: u8 = packet::IPPROTO_UDP;
const CASES: [&str; 3] = ["deny", "allow-new", "established"];

fn v4(node: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, node, host))
}

/// Exactly `n` entries (n ≥ 4): the measured flow's markers and allow entries, and n − 4
/// others that no measured packet looks up.
fn policy(n: usize) -> Result<BTreeMap<PolicyKey, PolicyEntry>> {
    if n < 4 {
        bail!("a policy map for the measured flow needs at least 4 entries, not {n}");
    }
    let allow = PolicyEntry {
        flags: policy_flags::ALLOW,
        rule: 1,
    };
    let marker = PolicyEntry {
        flags: policy_flags::ENFORCED,
        rule: 0,
    };
    let mut m = BTreeMap::new();
    m.insert(PolicyKey::marker(FE, direction::EGRESS), marker);
    m.insert(PolicyKey::new(FE, BE, 8080, TCP, direction::EGRESS), allow);
    m.insert(PolicyKey::marker(BE, direction::INGRESS), marker);
    m.insert(PolicyKey::new(BE, FE, 8080, TCP, direction::INGRESS), allow);
    // Others: local identities FE, BE and 400 more endpoints; remote identities from a pool
    // that grows with the map (about ten entries per identity), never FE/BE/IN/ANY, so the
    // measured lookups hit exactly what they hit with 10 entries.
    const PORTS: [u16; 12] = [
        80, 443, 8080, 8443, 5432, 6379, 3306, 9090, 53, 25, 11211, 9092,
    ];
    let remotes = (n as u32 / 10).max(16);
    // Seeded: every size gets the same kind of map, run after run.
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    while m.len() < n {
        let local = match rng.u8(..4) {
            0 => FE,
            1 => BE,
            _ => 1000 + rng.u32(..400),
        };
        let remote = 2000 + rng.u32(..remotes);
        let port = if rng.u8(..4) == 0 {
            1024 + rng.u16(..30000)
        } else {
            PORTS[rng.usize(..PORTS.len())]
        };
        let proto = if rng.u8(..5) == 0 { UDP } else { TCP };
        let dir = if rng.bool() {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        m.insert(PolicyKey::new(local, remote, port, proto, dir), allow);
    }
    Ok(m)
}

/// One loaded datapath with a policy of `entries` and `ipcache` extra remote endpoints.
struct Contender {
    entries: usize,
    ipcache: usize,
    dp: TestDatapath,
    fe_if: u32,
    in_if: u32,
}

/// The `i`th extra remote endpoint's address (see `Args::ipcache`), None past the last.
fn extra_endpoint(i: usize) -> Option<Ipv4Addr> {
    const FIRST: u32 = u32::from_be_bytes([198, 18, 4, 0]);
    const SKIP_FROM: u32 = u32::from_be_bytes([198, 19, 0, 0]);
    const SKIP_TO: u32 = u32::from_be_bytes([198, 19, 16, 0]);
    const END: u32 = u32::from_be_bytes([198, 20, 0, 0]);
    let mut a = FIRST.checked_add(u32::try_from(i).ok()?)?;
    if a >= SKIP_FROM {
        a = a.checked_add(SKIP_TO - SKIP_FROM)?;
    }
    (a < END).then(|| Ipv4Addr::from(a))
}

fn contender(entries: usize, ipcache: usize) -> Result<Contender> {
    let mut dp = TestDatapath::new(&["fe", "be", "in", "veil0"])
        .context("loading the datapath for a test run (needs root and BPF)")?;
    let tunnel = dp.ifindex("veil0")?;
    dp.set_config(DatapathConfig {
        flags: config_flags::ENCRYPT | config_flags::STRICT,
        tunnel_ifindex: tunnel,
        node_id: NODE,
        ..DatapathConfig::default()
    })?;
    for n in [1u8, 2, 3] {
        dp.add_pod_cidr(Prefix::v4(Ipv4Addr::new(198, 19, n, 0), 24), u32::from(n))?;
    }
    dp.add_local_pod(v4(1, 10), FE, "fe")?;
    dp.add_local_pod(v4(1, 20), BE, "be")?;
    dp.add_local_pod(v4(1, 30), IN, "in")?;
    for h in 1..=200u8 {
        dp.add_remote_pod(v4(2, h), 2000 + u32::from(h), 2)?;
    }
    dp.upsert_node(
        2,
        NodeInfo {
            flags: node_flags::HAS_KEY,
            _pad: 0,
        },
    )?;
    for i in 0..ipcache {
        let ip = extra_endpoint(i).with_context(|| format!("no room for {ipcache} endpoints"))?;
        let k = i as u32 % 1000;
        dp.add_remote_pod(IpAddr::V4(ip), 3000 + k, 4 + k)?;
    }
    let p = policy(entries)?;
    let written = dp.set_policy(0, &p)?;
    if written != entries {
        bail!("wrote {written} policy entries, wanted {entries}");
    }
    Ok(Contender {
        entries,
        ipcache,
        fe_if: dp.ifindex("fe")?,
        in_if: dp.ifindex("in")?,
        dp,
    })
}

/// ns per packet for one sample of `case`.
fn sample(c: &mut Contender, case: &str, args: &Args) -> Result<f64> {
    match case {
        "deny" => {
            let f = Packet::tcp(v4(1, 30), v4(1, 20), 40000, 8080).frame();
            let r =
                c.dp.run_repeat(programs::FROM_POD, c.in_if, &f, args.repeat)?;
            if r.retval != tc_act::SHOT {
                bail!("deny case returned {} with {} entries", r.retval, c.entries);
            }
            Ok(r.duration.as_nanos() as f64)
        }
        "established" => {
            let f = Packet::tcp(v4(1, 10), v4(1, 20), 39999, 8080)
                .with_tcp_flags(packet::tcp_flags::ACK)
                .frame();
            // The SYN admits and tracks the connection (only a SYN starts one); the timed runs,
            // ACKs of it, hit conntrack.
            let syn = Packet::tcp(v4(1, 10), v4(1, 20), 39999, 8080).frame();
            c.dp.run(programs::FROM_POD, c.fe_if, &syn)?;
            let r =
                c.dp.run_repeat(programs::FROM_POD, c.fe_if, &f, args.repeat)?;
            if r.retval != tc_act::REDIRECT {
                bail!(
                    "established case returned {} with {} entries",
                    r.retval,
                    c.entries
                );
            }
            Ok(r.duration.as_nanos() as f64)
        }
        "allow-new" => {
            c.dp.clear_conntrack()?;
            let mut ns = Vec::with_capacity(usize::from(args.new_flows));
            for i in 0..args.new_flows {
                let f = Packet::tcp(v4(1, 10), v4(1, 20), 10000 + i, 8080).frame();
                let r = c.dp.run(programs::FROM_POD, c.fe_if, &f)?;
                if r.retval != tc_act::REDIRECT {
                    bail!(
                        "allow-new case returned {} with {} entries",
                        r.retval,
                        c.entries
                    );
                }
                ns.push(r.duration.as_nanos() as f64);
            }
            Ok(median(&mut ns))
        }
        other => bail!("unknown case {other}"),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity
    // reads size_of::<cpu_set_t>() bytes from a valid pointer.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "cannot pin to cpu {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty()
        || args.ipcache.is_empty()
        || args.rounds == 0
        || args.new_flows == 0
        || args.repeat == 0
    {
        bail!(
            "--sizes, --ipcache, --rounds, --new-flows and --repeat must be non-empty / positive"
        );
    }
    if let Some(cpu) = args.cpu {
        pin_to_cpu(cpu)?;
    }
    let load_before = load_average();
    let t0 = Instant::now();
    let mut contenders = Vec::new();
    for &n in &args.sizes {
        for &m in &args.ipcache {
            let t = Instant::now();
            contenders.push(contender(n, m)?);
            if !args.json {
                eprintln!(
                    "loaded {n} policy entries, {m} extra ipcache entries in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    // samples[case][size index] = one value per round.
    let mut samples: BTreeMap<&str, Vec<Vec<f64>>> = CASES
        .iter()
        .map(|c| (*c, vec![Vec::new(); contenders.len()]))
        .collect();
    for round in 0..args.rounds {
        for case in CASES {
            // A B C, then C B A next round: neither order nor drift favours a size.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..contenders.len()).collect()
            } else {
                (0..contenders.len()).rev().collect()
            };
            for i in order {
                let v = sample(&mut contenders[i], case, &args)?;
                samples.get_mut(case).expect("every case has a row")[i].push(v);
            }
        }
        if !args.json {
            eprintln!("round {}/{} done", round + 1, args.rounds);
        }
    }

    // Ratios are paired: each round's sample of a size over the same round's sample of the
    // smallest map, taken within a fraction of a second of each other, so a neighbour's load
    // that comes and goes cancels out; the median over rounds is the reported ratio.
    let mut rows = Vec::new();
    for case in CASES {
        let per_size = &samples[case];
        for (i, c) in contenders.iter().enumerate() {
            let mut v = per_size[i].clone();
            let med = median(&mut v);
            let mut ratios: Vec<f64> = per_size[i]
                .iter()
                .zip(&per_size[0])
                .map(|(x, base)| x / base)
                .collect();
            let ratio = median(&mut ratios);
            rows.push(serde_json::json!({
                "case": case,
                "entries": c.entries,
                "ipcache_extra": c.ipcache,
                "median_ns": (med * 10.0).round() / 10.0,
                "min_ns": v.first().copied().unwrap_or(0.0),
                "max_ns": v.last().copied().unwrap_or(0.0),
                "ratio": (ratio * 1000.0).round() / 1000.0,
                "ratio_p25": (quantile(&ratios, 0.25) * 1000.0).round() / 1000.0,
                "ratio_p75": (quantile(&ratios, 0.75) * 1000.0).round() / 1000.0,
            }));
        }
    }
    let worst = rows
        .iter()
        .filter_map(|r| r["ratio"].as_f64())
        .map(|r| (r - 1.0).abs())
        .fold(0.0, f64::max);
    let flat = worst <= 0.10;

    if args.json {
        let out = serde_json::json!({
            "benchmark": "tc-cost",
            "program": programs::FROM_POD,
            "kernel": kernel_release(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "repeat": args.repeat,
            "rounds": args.rounds,
            "new_flows_per_round": args.new_flows,
            "cpu": args.cpu,
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "results": rows,
            "target": "flat within ±10% from the smallest to the largest map",
            "worst_deviation": (worst * 1000.0).round() / 1000.0,
            "flat": flat,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "veil_from_pod per-packet cost by policy map size (BPF_PROG_TEST_RUN; kernel {}; \
             {} rounds; repeat {}; {} new flows/round; load {} -> {})",
            kernel_release(),
            args.rounds,
            args.repeat,
            args.new_flows,
            load_before,
            load_average()
        );
        println!(
            "{:<12} {:>9} {:>9} {:>10} {:>12} {:>12} {:>16}",
            "case", "entries", "ipcache+", "median ns", "min-max ns", "vs smallest", "(p25-p75)"
        );
        let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
        for r in &rows {
            println!(
                "{:<12} {:>9} {:>9} {:>10.1} {:>12} {:>12} {:>16}",
                r["case"].as_str().unwrap_or(""),
                r["entries"].as_u64().unwrap_or(0),
                r["ipcache_extra"].as_u64().unwrap_or(0),
                f(r, "median_ns"),
                format!("{:.0}-{:.0}", f(r, "min_ns"), f(r, "max_ns")),
                format!("{:.3}x", f(r, "ratio")),
                format!("{:.3}-{:.3}", f(r, "ratio_p25"), f(r, "ratio_p75")),
            );
        }
        println!(
            "target flat ±10%: {} (worst deviation {:.1}%), {:.0}s",
            if flat { "met" } else { "MISSED" },
            worst * 100.0,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
