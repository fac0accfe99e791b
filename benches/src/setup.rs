//! What the harness needs besides veil, installed idempotently: iperf3 and wireguard-tools from
//! Debian, and the reference boringtun-cli 0.7.1 from crates.io into a cache directory.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

pub const BORINGTUN_VERSION: &str = "0.7.1";

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the Debian packages that are missing (`apt-get`), nothing when all are there.
pub fn ensure_debian_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let ok = Command::new("apt-get")
        .args(["update", "-q"])
        .envs(env)
        .status()?
        .success()
        && Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .envs(env)
            .status()?
            .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/veil/bench` (default `~/.cache/veil/bench`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("veil")
        .join("bench")
}

/// The boringtun-cli binary, built once with `cargo install --locked` into the cache.
pub fn ensure_boringtun(cache: &Path) -> anyhow::Result<PathBuf> {
    let root = cache.join(format!("boringtun-cli-{BORINGTUN_VERSION}"));
    let bin = root.join("bin").join("boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "setup: cargo install boringtun-cli {BORINGTUN_VERSION} into {} (once, ~2 min)",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "install",
            "boringtun-cli",
            "--locked",
            "--version",
            BORINGTUN_VERSION,
            "--root",
        ])
        .arg(&root)
        .status()
        .context("running cargo install")?
        .success();
    if !ok || !bin.exists() {
        bail!("cargo install boringtun-cli {BORINGTUN_VERSION} failed");
    }
    Ok(bin)
}

/// `uname -r`, the CPU model and the number of CPUs, for the report.
pub fn machine() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb as f64 / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    serde_json::json!({
        "kernel": kernel,
        "cpu": cpu,
        "cpus": cpus,
        "memory_gib": (mem * 10.0).round() / 10.0,
    })
}

/// The directory holding this workspace's release binaries (`bin_dir`, else the running
/// binary's own), checked to hold every one of `names`.
pub fn release_bins(bin_dir: Option<&Path>, names: &[&str]) -> anyhow::Result<PathBuf> {
    let dir = match bin_dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow::anyhow!("binary directory"))?
            .to_path_buf(),
    };
    for n in names {
        let b = dir.join(n);
        if !b.exists() {
            bail!(
                "{} not found (cargo build --release --workspace --bins)",
                b.display()
            );
        }
    }
    Ok(dir)
}

/// Where results go (`out_dir`, else `benches/results`), created.
pub fn results_dir(out_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let d = out_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Writes a benchmark's results as `out_dir/name` (pretty JSON) and says so on stderr.
pub fn write_results(
    out_dir: &Path,
    name: &str,
    results: &serde_json::Value,
) -> anyhow::Result<PathBuf> {
    let path = out_dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

/// Where a benchmark binary finds the release binaries and writes its results.
#[derive(clap::Args, Debug, Clone)]
pub struct Dirs {
    /// Directory with the release binaries (default: next to this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where to write the results (default: benches/results).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

/// How long an interleaved benchmark runs.
#[derive(clap::Args, Debug, Clone)]
pub struct Rounds {
    /// Interleaved rounds (each starting with the next target).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
}
