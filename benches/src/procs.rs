//! Process accounting: CPU time (the process CPU clock, nanoseconds, all threads) and resident
//! memory from /proc, and finding a lab's processes by the network namespace they run in.

use std::{
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

/// CPU time of the whole process (every thread, and threads that already exited), in seconds,
/// read from the process's CPU-time clock (`clock_getcpuclockid`, the scheduler's nanosecond
/// `sum_exec_runtime`). `/proc/<pid>/stat`'s utime + stime count 10 ms ticks, too coarse for the
/// handshake rate (55 ticks decided it) and for idle CPU (a few ticks a minute).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes one clockid_t through a valid pointer.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        anyhow::bail!(
            "CPU clock of pid {pid}: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        anyhow::bail!(
            "CPU clock of pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Sum of [`cpu_seconds`] over several processes.
pub fn cpu_seconds_sum(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// (VmRSS, VmHWM) in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes running in the named network namespace (`/run/netns/<netns>`) whose argv matches.
pub fn find_in_netns(netns: &str, matches: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(Path::new("/run/netns").join(netns)) else {
        return vec![];
    };
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if ns.ino() != target.ino() || ns.dev() != target.dev() {
            continue;
        }
        if matches(&cmdline(pid)) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// The `veil-wg` process serving `interface` in a node's netns.
pub fn find_veil_wg(netns: &str, interface: &str) -> Option<u32> {
    find_in_netns(netns, |argv| {
        argv.first().is_some_and(|a| a.ends_with("veil-wg"))
            && argv.last().is_some_and(|a| a == interface)
    })
    .into_iter()
    .next()
}

/// CPU % (of one core) and RSS of one process, sampled over a window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleSample {
    pub what: String,
    pub pid: u32,
    pub seconds: f64,
    pub cpu_percent: f64,
    pub rss_mb: f64,
    pub rss_max_mb: f64,
}

/// Samples CPU and RSS of `procs` (label, pid) over `window`, RSS every second.
pub fn sample_idle(procs: &[(String, u32)], window: Duration) -> anyhow::Result<Vec<IdleSample>> {
    let start = Instant::now();
    let cpu0: Vec<f64> = procs
        .iter()
        .map(|(_, p)| cpu_seconds(*p))
        .collect::<anyhow::Result<_>>()?;
    let mut rss_max = vec![0u64; procs.len()];
    let mut rss_last = vec![0u64; procs.len()];
    while start.elapsed() < window {
        for (i, (_, p)) in procs.iter().enumerate() {
            let (rss, _) = rss_bytes(*p)?;
            rss_max[i] = rss_max[i].max(rss);
            rss_last[i] = rss;
        }
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(start.elapsed())));
    }
    let secs = start.elapsed().as_secs_f64();
    procs
        .iter()
        .enumerate()
        .map(|(i, (what, p))| {
            let cpu = cpu_seconds(*p)? - cpu0[i];
            Ok(IdleSample {
                what: what.clone(),
                pid: *p,
                seconds: secs,
                cpu_percent: cpu / secs * 100.0,
                rss_mb: rss_last[i] as f64 / 1e6,
                rss_max_mb: rss_max[i] as f64 / 1e6,
            })
        })
        .collect()
}
