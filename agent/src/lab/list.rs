//! `veil lab list` and `veil lab down --all`: the labs on this host, found where every lab keeps
//! its state (one directory per lab under [`run_root`]), each with what its supervisor and
//! managed processes are doing. A lab's processes are read from its cgroups, so the list needs no
//! agent to answer; readiness is `veil status`'s.

use std::{path::Path, time::SystemTime};

use serde::Serialize;

use super::{run_root, spec, supervisor, LabPaths, Result};

/// One lab, as `veil lab list -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabEntry {
    pub name: String,
    pub state: LabState,
    /// What the state says, in words (why a lab is not `running`, and what to do).
    pub detail: String,
    /// From the lab's state file; absent while that file is missing or unreadable.
    pub control_plane: Option<String>,
    pub identity: Option<String>,
    pub backend: Option<String>,
    pub nodes: usize,
    pub pods: usize,
    pub processes: Processes,
    /// When `lab up` began (its journal's time), unix seconds.
    pub created_unix: Option<u64>,
}

/// The lab's managed processes (agents, veil-wg is the agents', SPIRE, the control plane, pod
/// servers): how many the supervisor keeps, and how many have a live process now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Processes {
    pub running: usize,
    pub expected: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabState {
    /// The supervisor and every process it keeps are running.
    Running,
    /// The supervisor runs, some of its processes do not (it is restarting them).
    Degraded,
    /// The supervisor is gone: nothing restarts the lab's processes.
    Stopped,
    /// `lab up` has not finished building it (still running, or killed): no state file or no
    /// process manifest yet.
    Incomplete,
}

impl std::fmt::Display for LabState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LabState::Running => "running",
            LabState::Degraded => "degraded",
            LabState::Stopped => "stopped",
            LabState::Incomplete => "incomplete",
        })
    }
}

/// The state from what was found: the state file, the manifest, a live supervisor, and how
/// many managed processes run.
fn state_of(
    name: &str,
    has_spec: bool,
    has_manifest: bool,
    supervisor_alive: bool,
    p: Processes,
) -> (LabState, String) {
    let down = |why: &str| format!("{why}; `veil lab down --name {name}` removes what it made");
    match (has_spec && has_manifest, supervisor_alive) {
        (false, _) => (
            LabState::Incomplete,
            if has_spec {
                down("no process manifest: `lab up` is still starting it or was stopped")
            } else {
                down("no state file: `lab up` is still creating it or was stopped")
            },
        ),
        (true, false) => (
            LabState::Stopped,
            down("its supervisor is not running: nothing restarts its processes"),
        ),
        (true, true) if p.running < p.expected => (
            LabState::Degraded,
            format!(
                "{} of {} processes not running (the supervisor restarts them; their logs are in the lab's logs/)",
                p.expected - p.running,
                p.expected
            ),
        ),
        (true, true) => (
            LabState::Running,
            "every process running (readiness: veil status)".into(),
        ),
    }
}

/// The pids in `cgroup` itself (not below it).
fn pids_in(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether the managed process runs: a process in its cgroup with its command line (two may
/// share a cgroup, as a pod's servers do).
fn runs(m: &supervisor::Managed) -> bool {
    pids_in(&m.cgroup).into_iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let argv: Vec<&[u8]> = c.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
            argv.len() == m.argv.len() && argv.iter().zip(&m.argv).all(|(a, b)| *a == b.as_bytes())
        })
    })
}

/// The lab named `name`, as found on this host.
pub fn entry(name: &str) -> Result<LabEntry> {
    let paths = LabPaths::new(name)?;
    let spec: Option<spec::LabSpec> = std::fs::read(paths.spec())
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    let manifest = supervisor::read_manifest(&paths).ok();
    let processes = Processes {
        running: manifest.iter().flatten().filter(|m| runs(m)).count(),
        expected: manifest.as_ref().map_or(0, Vec::len),
    };
    let (state, detail) = state_of(
        name,
        spec.is_some(),
        manifest.is_some(),
        !pids_in(&paths.cgroup.join("supervisor")).is_empty(),
        processes,
    );
    let created_unix = std::fs::metadata(paths.journal())
        .and_then(|m| m.created().or_else(|_| m.modified()))
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    Ok(LabEntry {
        name: name.to_string(),
        state,
        detail,
        control_plane: spec.as_ref().map(|s| s.control_plane.to_string()),
        identity: spec.as_ref().map(|s| s.identity.to_string()),
        backend: spec.as_ref().map(|s| s.backend.to_string()),
        nodes: spec.as_ref().map_or(0, |s| s.nodes.len()),
        pods: spec.as_ref().map_or(0, |s| s.pods.len()),
        processes,
        created_unix,
    })
}

/// Every lab on this host (a directory under the run root with a lab's name), by name.
pub fn list() -> Result<Vec<LabEntry>> {
    let root = run_root();
    let dirs = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(super::Error::Read { path: root, source });
        }
    };
    let mut names: Vec<String> = dirs
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| spec::validate_lab_name(n).is_ok())
        .collect();
    names.sort();
    names.iter().map(|n| entry(n)).collect()
}

/// `veil lab list`'s table.
pub fn format_table(labs: &[LabEntry], now_unix: u64) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<9} {:<11} {:<14} {:<9} {:<10} {:>5} {:>5} {:>9} {:>6}\n",
        "NAME",
        "STATE",
        "CONTROL PLANE",
        "IDENTITY",
        "BACKEND",
        "NODES",
        "PODS",
        "PROCESSES",
        "AGE"
    );
    for l in labs {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<9} {:<11} {:<14} {:<9} {:<10} {:>5} {:>5} {:>9} {:>6}",
            l.name,
            l.state.to_string(),
            dash(&l.control_plane),
            dash(&l.identity),
            dash(&l.backend),
            l.nodes,
            l.pods,
            format!("{}/{}", l.processes.running, l.processes.expected),
            l.created_unix
                .map_or_else(|| "-".into(), |t| age(now_unix.saturating_sub(t))),
        );
    }
    for l in labs.iter().filter(|l| l.state != LabState::Running) {
        let _ = writeln!(s, "{}: {}", l.name, l.detail);
    }
    s
}

/// An age as kubectl prints one: seconds under 2 minutes, minutes and seconds under 10,
/// minutes under 3 hours, hours under 2 days, then days.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(running: usize, expected: usize) -> Processes {
        Processes { running, expected }
    }

    #[test]
    fn the_state_follows_the_files_the_supervisor_and_the_processes() {
        let st = |spec, manifest, sup, procs| state_of("lab", spec, manifest, sup, procs).0;
        assert_eq!(st(true, true, true, p(10, 10)), LabState::Running);
        assert_eq!(st(true, true, true, p(9, 10)), LabState::Degraded);
        // Without a supervisor nothing comes back, whatever still runs.
        assert_eq!(st(true, true, false, p(10, 10)), LabState::Stopped);
        assert_eq!(st(true, true, false, p(0, 10)), LabState::Stopped);
        assert_eq!(st(true, false, false, p(0, 0)), LabState::Incomplete);
        assert_eq!(st(false, false, false, p(0, 0)), LabState::Incomplete);
        let (_, why) = state_of("lab", true, true, true, p(8, 10));
        assert!(why.starts_with("2 of 10 processes not running"), "{why}");
        let (_, why) = state_of("lab", false, false, false, p(0, 0));
        assert!(
            why.contains("no state file") && why.contains("veil lab down --name lab"),
            "{why}"
        );
    }

    #[test]
    fn the_table_has_a_row_per_lab_and_says_why_one_is_not_running() {
        let lab = |name: &str, state| LabEntry {
            name: name.into(),
            state,
            detail: format!("{name} detail"),
            control_plane: Some("files".into()),
            identity: Some("dev".into()),
            backend: Some("userspace".into()),
            nodes: 2,
            pods: 3,
            processes: p(7, 7),
            created_unix: Some(1_000),
        };
        let mut gone = lab("gone", LabState::Incomplete);
        gone.control_plane = None;
        gone.created_unix = None;
        let t = format_table(&[lab("veil", LabState::Running), gone], 1_000 + 3_700);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[0].starts_with("NAME") && lines[0].ends_with("AGE"),
            "{t}"
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "veil",
                "running",
                "files",
                "dev",
                "userspace",
                "2",
                "3",
                "7/7",
                "61m"
            ]
        );
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!((row[1], row[2], row[8]), ("incomplete", "-", "-"));
        assert_eq!(lines[3], "gone: gone detail");
    }

    #[test]
    fn ages_read_like_kubectls() {
        let got: Vec<String> = [5, 119, 130, 3_599, 7_300, 12_000, 90_000, 200_000]
            .into_iter()
            .map(age)
            .collect();
        assert_eq!(
            got,
            ["5s", "119s", "2m10s", "59m", "121m", "3h", "25h", "2d"]
        );
    }
}
