//! `veil sysdump`: what a lab's veil was doing, in one archive to attach to a bug report
//! (`cilium sysdump`, `istioctl bug-report`). Each node's agent status, metrics and recent
//! flows; its netns's addresses, routes, rules, links, sockets, BPF attachments and WireGuard
//! device (`wg show`, which hides private keys); the lab's pinned maps; every log of the lab;
//! the lab's own records; the cluster objects (Kubernetes mode) or state files (files mode).
//!
//! A step that fails (an agent that does not answer, a tool that is missing) is written down in
//! `SUMMARY.txt` and on stderr, and the rest is still collected: a dump is most needed when
//! something is broken. No secret goes in: no key file is read, `wg show` prints `(hidden)` for
//! private and preshared keys, and the Kubernetes objects taken are the ones veil reads
//! (no Secrets).

use std::{
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};

use veil_common::maps as map_names;

use crate::{
    admin,
    lab::{self, spec::LabSpec, LabPaths},
};

/// A file in the dump is cut to its last this many bytes (logs, map dumps).
const MAX_FILE_BYTES: usize = 8 << 20;
/// How long one command or admin call may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow records taken per node (the newest).
const FLOWS: usize = 10_000;

/// What was written.
#[derive(Debug)]
pub struct Report {
    pub archive: PathBuf,
    pub files: usize,
    /// One line per step that failed: what, and why.
    pub failures: Vec<String>,
}

/// The dump's files as they are gathered, and the steps that failed.
struct Dump {
    dir: PathBuf,
    files: Vec<(String, usize)>,
    failures: Vec<String>,
}

impl Dump {
    /// Writes `rel` (its last [`MAX_FILE_BYTES`]), or records why there is nothing to write.
    fn put(&mut self, rel: &str, content: Result<Vec<u8>>) {
        match content {
            Ok(mut bytes) => {
                if bytes.len() > MAX_FILE_BYTES {
                    let cut = bytes.len() - MAX_FILE_BYTES;
                    let mut head =
                        format!("[veil sysdump: the first {cut} bytes are cut]\n").into_bytes();
                    head.extend_from_slice(&bytes[cut..]);
                    bytes = head;
                }
                let path = self.dir.join(rel);
                let written = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&path, &bytes));
                match written {
                    Ok(()) => self.files.push((rel.to_string(), bytes.len())),
                    Err(e) => self.failures.push(format!("{rel}: cannot write: {e}")),
                }
            }
            Err(e) => self.failures.push(format!("{rel}: {e:#}")),
        }
    }
}

/// Runs `argv`, in `netns` when given; its stdout, or an error with its stderr. Killed past
/// [`STEP_TIMEOUT`].
fn command(netns: Option<&str>, argv: &[&str]) -> Result<Vec<u8>> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    // Read both pipes while it runs (a full pipe would stop it), and stop it past the limit.
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{} did not finish within {STEP_TIMEOUT:?}", argv.join(" "));
        }
        // The poll interval of this wait.
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        anyhow::bail!(
            "{} failed ({status}): {}",
            argv.join(" "),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(stdout)
}

/// GET `path` from a node agent's admin socket.
fn admin_get(rt: &tokio::runtime::Runtime, socket: &Path, path: &str) -> Result<Vec<u8>> {
    let body = rt
        .block_on(admin::call(
            socket,
            hyper::Method::GET,
            path,
            None,
            STEP_TIMEOUT,
        ))
        .with_context(|| format!("the agent at {} did not answer {path}", socket.display()))?;
    Ok(body.to_vec())
}

/// The files of `dir` (not below it) whose names `keep` accepts, by name.
fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .filter(|(n, _)| keep(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The UTC time as `20261206T074300Z` (RFC 3339 without its separators, for a file name).
fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// Collects the dump of lab `spec` into `output` (default: `veil-sysdump-<lab>-<time>.tar.gz`
/// in the current directory).
pub fn run(spec: &LabSpec, paths: &LabPaths, output: Option<&Path>) -> Result<Report> {
    let started = SystemTime::now();
    let base = format!("veil-sysdump-{}-{}", spec.name, stamp(started));
    let archive = output.map_or_else(
        || PathBuf::from(format!("{base}.tar.gz")),
        Path::to_path_buf,
    );
    let tmp = std::env::temp_dir().join(format!("{base}-{}", std::process::id()));
    let dir = tmp.join(&base);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut d = Dump {
        dir,
        files: Vec::new(),
        failures: Vec::new(),
    };
    collect(spec, paths, &mut d);
    let mut summary = format!(
        "veil sysdump of lab {} taken {} ({} s)\n\nfiles:\n",
        spec.name,
        stamp(started),
        started.elapsed().map_or(0, |e| e.as_secs())
    );
    for (f, n) in &d.files {
        let _ = writeln!(summary, "  {f} ({n} bytes)");
    }
    let _ = writeln!(summary, "\nnot collected ({}):", d.failures.len());
    for f in &d.failures {
        let _ = writeln!(summary, "  {f}");
    }
    d.put("SUMMARY.txt", Ok(summary.into_bytes()));
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&tmp)
        .arg(&base)
        .output();
    let _ = std::fs::remove_dir_all(&tmp);
    let tar = tar.context("cannot run tar")?;
    anyhow::ensure!(
        tar.status.success(),
        "tar could not write {}: {}",
        archive.display(),
        String::from_utf8_lossy(&tar.stderr).trim()
    );
    Ok(Report {
        archive,
        files: d.files.len(),
        failures: d.failures,
    })
}

fn collect(spec: &LabSpec, paths: &LabPaths, d: &mut Dump) {
    let view = lab::view(spec, paths);
    d.put(
        "lab.json",
        serde_json::to_vec_pretty(&view).map_err(Into::into),
    );
    d.put(
        "lab-state.json",
        lab::list::entry(&spec.name)
            .map_err(anyhow::Error::from)
            .and_then(|e| serde_json::to_vec_pretty(&e).map_err(Into::into)),
    );
    for (name, path) in [
        ("journal.jsonl", paths.journal()),
        ("processes.json", paths.supervisor_manifest()),
    ] {
        d.put(&format!("lab/{name}"), read(&path));
    }
    // Every log of the lab: agents, veil-wg, veil-proxy, SPIRE, the control plane, pod servers.
    for (name, path) in files_in(&paths.logs(), |_| true) {
        d.put(&format!("logs/{name}"), read(&path));
    }
    cluster_objects(paths, &view, d);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for n in &view.nodes {
        let at = |f: &str| format!("nodes/{}/{f}", n.name);
        let sock = Path::new(&n.agent_admin);
        d.put(&at("status.json"), admin_get(&rt, sock, "/v1/status"));
        d.put(&at("metrics.txt"), admin_get(&rt, sock, "/metrics"));
        d.put(
            &at("flows.jsonl"),
            admin_get(&rt, sock, &format!("/v1/flows?limit={FLOWS}")).and_then(|body| {
                // The API answers a JSON array; the dump has one flow per line, as `veil observe
                // -o json` prints them.
                let flows: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
                let mut out = Vec::new();
                for f in flows {
                    serde_json::to_writer(&mut out, &f)?;
                    out.push(b'\n');
                }
                Ok(out)
            }),
        );
        let ns = Some(n.netns.as_str());
        for (file, argv) in [
            ("ip-addr.txt", &["ip", "-d", "address", "show"][..]),
            ("ip-route.txt", &["ip", "route", "show", "table", "all"]),
            (
                "ip6-route.txt",
                &["ip", "-6", "route", "show", "table", "all"],
            ),
            ("ip-rule.txt", &["ip", "rule", "show"]),
            ("ip-link.txt", &["ip", "-d", "-s", "link", "show"]),
            ("sockets.txt", &["ss", "-tuanpe"]),
            ("bpf-attachments.txt", &["bpftool", "net", "show"]),
            ("wg.txt", &["wg", "show", "all"]),
        ] {
            d.put(&at(file), command(ns, argv));
        }
        // The node's pinned maps, each dumped (conntrack too, cut to the last 8 MiB like any
        // file); not the flow-event ring buffer, which has no entries to dump (its events are
        // the flows above).
        for (map, path) in files_in(Path::new(&n.pin_dir), |m| m != map_names::EVENTS) {
            let p = path.display().to_string();
            d.put(
                &at(&format!("maps/{map}.json")),
                command(None, &["bpftool", "-j", "map", "dump", "pinned", &p]),
            );
        }
    }
    // Every BPF link of the host: `veil status` names each attachment's link id (tcx links
    // are listed here whatever bpftool's version; `bpftool net show` above lists clsact ones).
    d.put("bpf/links.txt", command(None, &["bpftool", "link", "show"]));
    d.put(
        "bpf/programs.txt",
        command(None, &["bpftool", "prog", "show"]),
    );
    d.put("bpf/maps.txt", command(None, &["bpftool", "map", "show"]));
    if let (Some(bin), Some(sock)) = (&view.identity.server_bin, &view.identity.server_socket) {
        for (file, argv) in [
            ("entries.txt", ["entry", "show"]),
            ("agents.txt", ["agent", "list"]),
        ] {
            d.put(
                &format!("spire/{file}"),
                command(None, &[bin, argv[0], argv[1], "-socketPath", sock]),
            );
        }
    }
    d.put(
        "underlay/ip-addr.txt",
        command(Some(&view.underlay.netns), &["ip", "-d", "address", "show"]),
    );
}

/// What the agents read the cluster from: the Kubernetes objects veil reads (never Secrets), or
/// the lab's state files.
fn cluster_objects(paths: &LabPaths, view: &lab::LabView, d: &mut Dump) {
    match &view.kubernetes {
        Some(k) => {
            let kubeconfig = format!("--kubeconfig={}", k.kubeconfig.display());
            let kubectl = k.kubectl.display().to_string();
            d.put(
                "cluster/objects.yaml",
                command(
                    None,
                    &[
                        &kubectl,
                        &kubeconfig,
                        "get",
                        "nodes,namespaces,pods,services,endpointslices,networkpolicies,ciliumnetworkpolicies,ciliumclusterwidenetworkpolicies,veilidentities",
                        "--all-namespaces",
                        "-o",
                        "yaml",
                    ],
                ),
            );
            d.put(
                "cluster/events.txt",
                command(
                    None,
                    &[&kubectl, &kubeconfig, "get", "events", "--all-namespaces"],
                ),
            );
        }
        None => {
            for (name, path) in files_in(&paths.control_plane(), |n| n.ends_with(".json")) {
                d.put(&format!("cluster/{name}"), read(&path));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_civil_times() {
        let at = |s: u64| stamp(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        // 2026-12-06 07:43:34 UTC, a leap day, and the last second of a year.
        assert_eq!(at(1_796_543_014), "20261206T074334Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_735_689_599), "20241231T235959Z");
    }

    #[test]
    fn a_file_over_the_limit_keeps_its_end_and_says_so() {
        let dir = std::env::temp_dir().join(format!("sysdump-unit-{}", std::process::id()));
        let mut d = Dump {
            dir: dir.clone(),
            files: Vec::new(),
            failures: Vec::new(),
        };
        let mut big = vec![b'a'; MAX_FILE_BYTES];
        big.extend_from_slice(b"the end");
        d.put("x/big.log", Ok(big));
        d.put("x/missing.log", Err(anyhow::anyhow!("gone")));
        let got = std::fs::read(dir.join("x/big.log")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(got.starts_with(b"[veil sysdump: the first 7 bytes are cut]\n"));
        assert!(got.ends_with(b"the end"));
        assert_eq!(d.files.len(), 1);
        assert_eq!(d.failures, ["x/missing.log: gone"]);
    }

    #[test]
    fn a_command_that_fails_says_why() {
        let e = command(None, &["sh", "-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("failed (exit status: 3): nope"),
            "{e:#}"
        );
        assert_eq!(command(None, &["echo", "hi"]).unwrap(), b"hi\n");
        assert!(command(None, &["/nonexistent/tool"]).is_err());
    }
}
