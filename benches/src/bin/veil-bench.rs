//! `veil-bench`: veil vs plaintext vs boringtun-cli on the same 2-node lab path, interleaved,
//! with medians and ratios against the benchmark issue's targets. See benches/README.md.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use veil_benches::{
    chart, cleanup,
    contender::{self, Contender, Ends, PathBytes, PathCounters},
    lab::Lab,
    measure, procs,
    report::{self, Medians, Samples, TcCost},
    setup,
    sockets::{self, Buffers},
};

#[derive(Parser, Debug, serde::Serialize)]
#[command(
    about = "veil vs plaintext vs boringtun-cli vs wireguard-go: throughput, latency, CPU, idle cost"
)]
struct Args {
    /// Interleaved rounds (each runs every test for every contender once).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Seconds per request/response run.
    #[arg(long, default_value_t = 5.0)]
    rr_seconds: f64,
    /// Request/response size in bytes.
    #[arg(long, default_value_t = 64)]
    rr_size: usize,
    /// Idle window in seconds (agent and veil-wg CPU and RSS).
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Quick smoke run: 1 round, 3 s runs, 10 s idle.
    #[arg(long)]
    quick: bool,
    /// Directory with the release binaries (veil, veil-rr, tc-cost); default: next to this one.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// boringtun-cli binary (default: cargo install 0.7.1 into the cache once).
    #[arg(long)]
    boringtun: Option<PathBuf>,
    /// wireguard-go binary (default: the one scripts/setup.sh builds, in ~/.cache/veil/bin).
    #[arg(long)]
    wireguard_go: Option<PathBuf>,
    /// Lab file for both labs (2 nodes, 10 pods; `client` on node-a, `server` on node-b).
    #[arg(long)]
    lab_file: Option<PathBuf>,
    /// Where to write results.json and chart.png.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Replace the block between the bench markers in benches/README.md with this run.
    #[arg(long)]
    update_readme: bool,
    /// Only the contenders named (plaintext, veil, boringtun-cli, wireguard-go), for profiling
    /// sessions.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip the idle measurement.
    #[arg(long)]
    skip_idle: bool,
    /// Only these tests (tcp1, tcp2, tcp4, rr), for profiling sessions.
    #[arg(long, value_delimiter = ',', default_value = "tcp1,tcp2,tcp4,rr")]
    tests: Vec<String>,
    /// Only draw chart.png again from the results.json in the output directory (no lab, no run).
    #[arg(long)]
    rechart: bool,
    /// Leave boringtun-cli's UDP sockets at the netns defaults instead of veil-wg's buffers
    /// (to reproduce the earlier, unequal runs; not for published numbers).
    #[arg(long)]
    boringtun_default_buffers: bool,
}

const LAB_PLAIN: &str = "vb-plain";
const LAB_VEIL: &str = "vb-veil";

/// What veil-wg asks for its UDP sockets (`SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, 8 MiB each,
/// transport/src/userspace/io.rs), as the kernel reports it (doubled). Checked against the
/// running veil-wg whenever the veil lab is up, so it cannot drift unnoticed.
const VEIL_WG_BUFFERS: Buffers = Buffers {
    rcvbuf: 2 * (8 << 20),
    sndbuf: 2 * (8 << 20),
};

/// The UDP socket buffers every tunnel contender runs with: veil-wg's own. boringtun-cli (no
/// option for it) starts with the netns defaults (`net.core.rmem_default`/`wmem_default`,
/// 208 KiB, not writable from a lab netns here), wireguard-go with its own 7 MiB; both get
/// veil-wg's through `pidfd_getfd`.
fn equalize_socket_buffers(
    veil_wg: &[u32],
    references: &[(&'static str, Vec<u32>)],
) -> anyhow::Result<serde_json::Value> {
    for &pid in veil_wg {
        let b = sockets::uniform_udp_buffers(pid)?;
        if b != VEIL_WG_BUFFERS {
            bail!("veil-wg (pid {pid}) runs with {b}, not the {VEIL_WG_BUFFERS} this harness gives boringtun-cli: update VEIL_WG_BUFFERS");
        }
    }
    let mut json = serde_json::json!({ "every_tunnel_socket": VEIL_WG_BUFFERS });
    for (name, pids) in references {
        for &pid in pids {
            let b = sockets::set_udp_buffers(pid, VEIL_WG_BUFFERS)?;
            eprintln!(
                "{name} pid {pid}: {} UDP sockets from {} to {VEIL_WG_BUFFERS} (veil-wg's)",
                b.len(),
                b[0]
            );
            json[format!("{name}_default")] = serde_json::json!(b[0]);
        }
    }
    Ok(json)
}

/// Refuses a run whose bytes did not cross the contender's own path: in each direction with a
/// payload, the sending end's device must have counted at least the payload sent and the
/// receiving end's at least the payload received (a tunnel counts what it encrypted and what
/// it decrypted).
fn check_path(
    c: Contender,
    test: &str,
    (to_server, to_client): (u64, u64),
    counted: PathBytes,
    path: &PathCounters,
) -> anyhow::Result<()> {
    if counted.client_tx < to_server
        || counted.server_rx < to_server
        || counted.server_tx < to_client
        || counted.client_rx < to_client
    {
        bail!(
            "{} {test}: {to_server} bytes went client -> server and {to_client} back, but its path ({}) counted {counted:?}: the traffic did not cross {}'s own path",
            c.key(),
            path.describe(),
            c.key()
        );
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

fn date_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn run_tc_cost(bin_dir: &Path) -> TcCost {
    let bin = bin_dir.join("tc-cost");
    if !bin.exists() {
        return TcCost::Missing;
    }
    eprintln!("tc-cost: {} --json", bin.display());
    match Command::new(&bin).arg("--json").output() {
        Ok(o) if o.status.success() => match serde_json::from_slice::<serde_json::Value>(&o.stdout)
        {
            Ok(v) => TcCost::from_output(v),
            Err(e) => TcCost::Failed {
                error: format!("output is not JSON: {e}"),
            },
        },
        Ok(o) => TcCost::Failed {
            error: format!(
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        },
        Err(e) => TcCost::Failed {
            error: e.to_string(),
        },
    }
}

/// The run this is part of: `scripts/bench.sh` exports `VEIL_BENCH_RUN_ID` and
/// `VEIL_BENCH_RUN_STARTED_UNIX` before control-bench runs; run alone, veil-bench's own start.
fn this_run() -> report::Run {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    report::Run {
        id: std::env::var("VEIL_BENCH_RUN_ID")
            .ok()
            .filter(|s| !s.is_empty()),
        started_unix: std::env::var("VEIL_BENCH_RUN_STARTED_UNIX")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(now),
    }
}

fn main() -> anyhow::Result<()> {
    let run = this_run();
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.seconds = 3;
        args.rr_seconds = 2.0;
        args.idle_seconds = 10;
    }
    if args.rechart {
        return rechart(&args);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the labs need network namespaces, cgroups and BPF");
    }
    let _guard = cleanup::install_signal_cleanup();
    cleanup::reap_stale();
    let root = workspace_root();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("own directory")?
            .to_path_buf(),
    };
    let veil = bin_dir.join("veil");
    let rr_bin = bin_dir.join("veil-rr");
    for b in [&veil, &rr_bin, &bin_dir.join("veil-wg")] {
        if !b.exists() {
            bail!(
                "{} not found: build first (cargo build --release --workspace --bins)",
                b.display()
            );
        }
    }
    let lab_file = args
        .lab_file
        .clone()
        .unwrap_or_else(|| root.join("benches/labs/bench.yaml"));
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| root.join("benches/results"));
    std::fs::create_dir_all(&out_dir)?;
    let state = PathBuf::from(cleanup::STATE_DIR);
    std::fs::create_dir_all(&state)?;

    setup::ensure_debian_packages(&["iperf3", "wireguard-tools", "iproute2", "iputils-ping"])?;
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| o == c.key()))
        .collect();
    // The reference WireGuards this run compares with, and their binaries.
    let mut reference_bins = vec![];
    for &c in contenders.iter().filter(|c| c.reference().is_some()) {
        let bin = match c {
            Contender::Boringtun => match &args.boringtun {
                Some(b) => b.clone(),
                None => setup::ensure_boringtun(&setup::cache_dir())?,
            },
            _ => match &args.wireguard_go {
                Some(b) => b.clone(),
                None => veil_agent::lab::spire_real::tool("wireguard-go").map_err(|_| {
                    anyhow::anyhow!(
                        "wireguard-go not found in $VEIL_TOOLS_BIN or ~/.cache/veil/bin: run scripts/setup.sh (it builds it), or pass --wireguard-go"
                    )
                })?,
            },
        };
        reference_bins.push((c, bin));
    }

    let date = date_utc();
    let machine = setup::machine();
    eprintln!("veil-bench: {date}, {machine}");

    // Labs: one with encryption off (plaintext, and the reference WireGuards on its node
    // namespaces), one with veil's userspace backend. Both stay up for the whole run.
    let need_plain = contenders
        .iter()
        .any(|c| *c == Contender::Plaintext || c.reference().is_some());
    let need_veil = contenders.contains(&Contender::Veil) || !args.skip_idle;
    // A lab with the benchmark's servers running in its pods.
    let serving_lab = |name: &str, what: &str, up_args: &[&str]| -> anyhow::Result<Lab> {
        eprintln!("lab {name}: up ({what})");
        let l = Lab::up(&veil, name, &lab_file, up_args)?;
        measure::start_servers(&Ends::Pods(&l), &rr_bin)?;
        Ok(l)
    };
    let plain = need_plain
        .then(|| serving_lab(LAB_PLAIN, "encryption off", &["--encryption", "off"]))
        .transpose()?;
    let veil_lab = need_veil
        .then(|| {
            serving_lab(
                LAB_VEIL,
                "encryption on, userspace backend",
                &["--backend", "userspace"],
            )
        })
        .transpose()?;
    let mut refs = vec![];
    if let Some(p) = &plain {
        for (c, bin) in &reference_bins {
            let t = contender::start_reference(p, *c, bin, &state)?;
            measure::start_servers(&t.endpoints(), &rr_bin)?;
            refs.push(t);
        }
    }
    let reference = |c: Contender| refs.iter().find(|t| t.contender == c);
    let veil_wg = match &veil_lab {
        Some(l) => contender::veil_wg_pids(l)?,
        None => vec![],
    };

    // Idle first, before any load has grown a buffer: both labs quiet for the window.
    let mut idle = vec![];
    if !args.skip_idle {
        let vl = veil_lab.as_ref().expect("veil lab is up for idle");
        std::thread::sleep(Duration::from_secs(5));
        let mut procs_list = vec![];
        for (i, pid) in contender::agent_pids(vl)?.into_iter().enumerate() {
            procs_list.push((format!("agent node-{}", ["a", "b"][i]), pid));
        }
        for (i, pid) in veil_wg.iter().enumerate() {
            procs_list.push((format!("veil-wg node-{}", ["a", "b"][i]), *pid));
        }
        for t in &refs {
            for (i, pid) in t.pids().into_iter().enumerate() {
                procs_list.push((
                    format!("{} node-{} (ref.)", t.contender.key(), ["a", "b"][i]),
                    pid,
                ));
            }
        }
        eprintln!(
            "idle: sampling {} processes for {} s",
            procs_list.len(),
            args.idle_seconds
        );
        idle = procs::sample_idle(&procs_list, Duration::from_secs(args.idle_seconds))?;
    }

    // Warm every path (WireGuard handshakes) before the first timed run.
    if let Some(p) = &plain {
        contender::warm_path(&Ends::Pods(p))?;
    }
    for t in &refs {
        contender::warm_path(&t.endpoints())?;
    }
    if let Some(v) = &veil_lab {
        contender::warm_path(&Ends::Pods(v))?;
    }
    // The references' sockets exist now (the connected one after the first handshake).
    let equalized: Vec<(&'static str, Vec<u32>)> = refs
        .iter()
        .filter(|t| !(args.boringtun_default_buffers && t.contender == Contender::Boringtun))
        .map(|t| (t.contender.key(), t.pids()))
        .collect();
    let mut socket_buffers = equalize_socket_buffers(&veil_wg, &equalized)?;
    if args.boringtun_default_buffers {
        socket_buffers["boringtun-cli"] = "netns defaults (--boringtun-default-buffers)".into();
    }

    // Each contender: its ends, tunnel processes, path counters and node netns.
    struct Path<'a> {
        ends: Ends<'a>,
        pids: Vec<u32>,
        counters: PathCounters,
        netns: [String; 2],
    }
    let path = |c: Contender| -> anyhow::Result<Path<'_>> {
        Ok(match c {
            Contender::Plaintext => {
                let p = plain.as_ref().expect("plain lab");
                Path {
                    ends: Ends::Pods(p),
                    pids: vec![],
                    counters: contender::underlay_counters(p)?,
                    netns: contender::node_netns(p)?,
                }
            }
            Contender::Boringtun | Contender::WireguardGo | Contender::VeilWg => {
                let p = plain.as_ref().expect("plain lab");
                let t = reference(c).expect("reference tunnel started");
                Path {
                    ends: t.endpoints(),
                    pids: t.pids(),
                    counters: contender::reference_counters(t),
                    netns: contender::node_netns(p)?,
                }
            }
            Contender::Veil => {
                let v = veil_lab.as_ref().expect("veil lab");
                Path {
                    ends: Ends::Pods(v),
                    pids: veil_wg.clone(),
                    counters: contender::veil_counters(v)?,
                    netns: contender::node_netns(v)?,
                }
            }
        })
    };
    let rcvbuf_errors = |netns: &[String; 2]| -> anyhow::Result<u64> {
        Ok(contender::udp_rcvbuf_errors(&netns[0])? + contender::udp_rcvbuf_errors(&netns[1])?)
    };

    let mut samples: BTreeMap<&'static str, Samples> = Contender::ALL
        .iter()
        .map(|c| (c.key(), Samples::default()))
        .collect();
    // The machine is shared: the load average per round says how quiet it was.
    let mut loads = vec![];
    for round in 0..args.rounds {
        // Rotate the order each round so no contender always runs first or last.
        let mut order = contenders.clone();
        let k = round as usize % order.len().max(1);
        order.rotate_left(k);
        loads.push(loadavg());
        for test in args.tests.iter().map(String::as_str) {
            for &c in &order {
                let p = path(c)?;
                // Same socket buffers on every tunnel socket, still (a new socket would not
                // have them).
                let equal = !(args.boringtun_default_buffers && c == Contender::Boringtun);
                for &pid in p.pids.iter().filter(|_| equal) {
                    let b = sockets::uniform_udp_buffers(pid)?;
                    if b != VEIL_WG_BUFFERS {
                        bail!(
                            "{} (pid {pid}) runs with {b}, not {VEIL_WG_BUFFERS}",
                            c.key()
                        );
                    }
                }
                let s = samples.get_mut(c.key()).expect("known contender");
                let (counted0, drops0) = (p.counters.read()?, rcvbuf_errors(&p.netns)?);
                let (dev_drops0, ofo0) = (
                    p.counters.client_tx_dropped()?,
                    p.ends.server_out_of_order()?,
                );
                match test {
                    "tcp1" | "tcp2" | "tcp4" => {
                        let streams = match test {
                            "tcp1" => 1,
                            "tcp2" => 2,
                            _ => 4,
                        };
                        let mut t = measure::iperf(&p.ends, streams, args.seconds, &p.pids)?;
                        let counted1 = p.counters.read()?;
                        t.path_bytes = counted1 - counted0;
                        t.udp_rcvbuf_errors = rcvbuf_errors(&p.netns)? - drops0;
                        t.device_tx_dropped = p.counters.client_tx_dropped()? - dev_drops0;
                        t.server_out_of_order = p.ends.server_out_of_order()? - ofo0;
                        check_path(c, test, (t.bytes, 0), t.path_bytes, &p.counters)?;
                        eprintln!(
                            "round {}/{} {:<14} TCP x{streams}: {:>6.2} Gbit/s  retr {:>5}  cpu/GB {}  path {:.2}/{:.2} GB  drops: udp rcvbuf {} device {}  out of order {}",
                            round + 1,
                            args.rounds,
                            c.key(),
                            t.gbit_per_s,
                            t.retransmits,
                            t.cpu_seconds_per_gb
                                .map_or("-".into(), |v| format!("{v:.2} s")),
                            t.path_bytes.client_tx as f64 / 1e9,
                            t.path_bytes.server_rx as f64 / 1e9,
                            t.udp_rcvbuf_errors,
                            t.device_tx_dropped,
                            t.server_out_of_order
                        );
                        match streams {
                            1 => s.tcp1.push(t),
                            2 => s.tcp2.push(t),
                            _ => s.tcp4.push(t),
                        }
                    }
                    "rr" => {
                        let r = measure::request_response(
                            &p.ends,
                            &rr_bin,
                            args.rr_size,
                            args.rr_seconds,
                        )?;
                        let counted1 = p.counters.read()?;
                        let payload = r.transactions * args.rr_size as u64;
                        check_path(
                            c,
                            test,
                            (payload, payload),
                            counted1 - counted0,
                            &p.counters,
                        )?;
                        eprintln!(
                            "round {}/{} {:<14} RR {} B: p50 {:.1} µs  p99 {:.1} µs  ({} tx)",
                            round + 1,
                            args.rounds,
                            c.key(),
                            args.rr_size,
                            r.p50_us,
                            r.p99_us,
                            r.transactions
                        );
                        s.rr.push(r);
                    }
                    other => bail!("unknown test {other:?} (tcp1, tcp2, tcp4, rr)"),
                }
            }
        }
    }
    // Peak RSS of the tunnel processes after load (for the record; the target is idle RSS).
    let mut after_load = vec![];
    for (i, pid) in veil_wg.iter().enumerate() {
        let (rss, hwm) = procs::rss_bytes(*pid)?;
        after_load.push(serde_json::json!({"what": format!("veil-wg node-{}", ["a","b"][i]), "rss_mb": rss as f64/1e6, "peak_rss_mb": hwm as f64/1e6}));
    }
    for t in &refs {
        for (i, pid) in t.pids().into_iter().enumerate() {
            let (rss, hwm) = procs::rss_bytes(pid)?;
            after_load.push(serde_json::json!({"what": format!("{} node-{}", t.contender.key(), ["a","b"][i]), "rss_mb": rss as f64/1e6, "peak_rss_mb": hwm as f64/1e6}));
        }
    }

    for t in refs {
        t.stop();
    }
    if let Some(p) = &plain {
        p.down();
    }
    if let Some(v) = &veil_lab {
        v.down();
    }

    let tc = run_tc_cost(&bin_dir);

    let med: BTreeMap<&'static str, Medians> =
        samples.iter().map(|(k, s)| (*k, Medians::of(s))).collect();
    // control-bench (run just before by scripts/bench.sh) leaves its numbers here; a file from
    // another run is refused, not reported as this run's.
    let control_bytes = std::fs::read(out_dir.join("control.json")).ok();
    let control = report::control_for_run(control_bytes.as_deref(), &run);
    if let Err(why) = &control {
        eprintln!("control plane: {why}");
    }
    let targets = report::targets(&med, &idle, Some(&tc), &control);
    let table = report::text(&med, &targets, &idle, &tc);
    let load = report::median(&loads).unwrap_or(0.0);
    let header = header_line(
        &date,
        &machine,
        (args.rounds, args.seconds, args.rr_seconds),
        load,
    );
    println!("\n{header}\n\n{table}");

    let mut json = serde_json::json!({
        "date": date,
        "run_id": run.id,
        "run_started_unix": run.started_unix,
        "machine": machine,
        "config": &args,
        "medians": med,
        "samples": samples,
        "idle": idle,
        "tunnel_rss_after_load": after_load,
        "tc_cost": tc,
        "socket_buffers": socket_buffers,
        "load_average_per_round": loads,
        "targets": targets,
        "header": header,
    });
    // This run's control-bench figures as it wrote them; no key when there are none.
    if let (Ok(_), Some(bytes)) = (&control, &control_bytes) {
        json["control_plane"] = serde_json::from_slice(bytes)?;
    }
    veil_benches::setup::write_results(&out_dir, "results.json", &json)?;

    let png = out_dir.join("chart.png");
    render_chart(&png, &header, args.rr_size, &samples)?;
    let md = report::markdown(&med, &targets, &idle, &tc, &format!("Run: {header}."));
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, &md)?;
    if args.update_readme {
        update_readme(&root.join("benches/README.md"), &md)?;
    }
    eprintln!("wrote {} and {}", png.display(), md_path.display());
    Ok(())
}

/// The chart: every contender on every figure, bars at the median of the rounds and a line
/// across the rounds' range.
fn render_chart(
    png: &Path,
    header: &str,
    rr_size: usize,
    samples: &BTreeMap<&'static str, Samples>,
) -> anyhow::Result<()> {
    let series = [
        "plaintext",
        "veil (userspace)",
        "boringtun-cli 0.7.1",
        "wireguard-go",
    ];
    // (group label, every round's value of one contender)
    type Figure = (&'static str, fn(&Samples) -> Vec<f64>);
    let panels: [(String, &str, [Figure; 2]); 3] = [
        (
            "TCP throughput, pod to pod".into(),
            "Gbit/s; bar: median, line: range of the rounds",
            [
                ("1 stream", |s| {
                    s.tcp1.iter().map(|t| t.gbit_per_s).collect()
                }),
                ("4 streams", |s| {
                    s.tcp4.iter().map(|t| t.gbit_per_s).collect()
                }),
            ],
        ),
        (
            format!("TCP request/response, {rr_size} B"),
            "µs round trip; bar: median, line: range",
            [
                ("p50", |s| s.rr.iter().map(|r| r.p50_us).collect()),
                ("p99", |s| s.rr.iter().map(|r| r.p99_us).collect()),
            ],
        ),
        (
            "tunnel CPU per GB, both ends".into(),
            "CPU seconds / GB; bar: median, line: range",
            [
                ("1 stream", |s| {
                    s.tcp1.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()
                }),
                ("4 streams", |s| {
                    s.tcp4.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()
                }),
            ],
        ),
    ];
    let rounds = |f: fn(&Samples) -> Vec<f64>| -> Vec<Vec<f64>> {
        Contender::ALL
            .iter()
            .map(|c| samples.get(c.key()).map(f).unwrap_or_default())
            .collect()
    };
    let panels: Vec<chart::Panel> = panels
        .into_iter()
        .map(|(title, unit, figures)| chart::Panel {
            title,
            unit: unit.into(),
            groups: figures
                .into_iter()
                .map(|(label, f)| {
                    let per_contender = rounds(f);
                    chart::Group {
                        label: label.into(),
                        values: per_contender.iter().map(|v| report::median(v)).collect(),
                        spread: per_contender.iter().map(|v| report::range(v)).collect(),
                    }
                })
                .collect(),
        })
        .collect();
    chart::render(
        png,
        "veil vs plaintext vs boringtun-cli vs wireguard-go (2-node lab)",
        header,
        &series,
        &panels,
    )
}

/// The run's one-line description (the chart's footer, the table's heading).
fn header_line(
    date: &str,
    machine: &serde_json::Value,
    (rounds, seconds, rr_seconds): (u32, u32, f64),
    load: f64,
) -> String {
    format!(
        "{date} · kernel {} · {} × {} · {} GiB · {rounds} rounds × {seconds} s iperf3, {rr_seconds} s RR, interleaved · median 1-min load average {load:.1}",
        machine["kernel"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or(""),
        machine["memory_gib"],
    )
}

/// `--rechart`: chart.png again from the output directory's results.json.
fn rechart(args: &Args) -> anyhow::Result<()> {
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("benches/results"));
    let path = out_dir.join("results.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut samples = BTreeMap::new();
    for c in Contender::ALL {
        let s: Samples = serde_json::from_value(v["samples"][c.key()].clone())
            .with_context(|| format!("{}: samples of {}", path.display(), c.key()))?;
        samples.insert(c.key(), s);
    }
    let loads: Vec<f64> = serde_json::from_value(v["load_average_per_round"].clone())
        .with_context(|| format!("{}: load_average_per_round", path.display()))?;
    let c = &v["config"];
    let header = header_line(
        v["date"].as_str().unwrap_or(""),
        &v["machine"],
        (
            c["rounds"].as_u64().unwrap_or(0) as u32,
            c["seconds"].as_u64().unwrap_or(0) as u32,
            c["rr_seconds"].as_f64().unwrap_or(0.0),
        ),
        report::median(&loads).unwrap_or(0.0),
    );
    let rr_size = v["config"]["rr_size"].as_u64().unwrap_or(64) as usize;
    let png = out_dir.join("chart.png");
    render_chart(&png, &header, rr_size, &samples)?;
    eprintln!("wrote {}", png.display());
    Ok(())
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn update_readme(path: &Path, md: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{}: no {BEGIN} … {END} block", path.display());
    };
    let new = format!("{}{BEGIN}\n{md}\n{}", &text[..a], &text[b..]);
    std::fs::write(path, new)?;
    Ok(())
}
