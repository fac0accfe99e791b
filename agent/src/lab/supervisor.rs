//! The lab supervisor: one process per lab that starts the lab's daemons (agents, dev SPIRE
//! server, pod servers) in their namespaces and cgroups and restarts any that exits, with
//! capped backoff, the way kubelet restarts a DaemonSet pod. `veil lab down` kills its cgroup
//! first so nothing is restarted during teardown.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    serve,
    spec::{IdentityProvider, LabSpec},
    Error, LabPaths, Result,
};
use crate::sys;

/// One daemon the supervisor keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Managed {
    pub name: String,
    pub argv: Vec<String>,
    pub netns: Option<String>,
    pub cgroup: PathBuf,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    /// The first start waits until this file exists (restarts do not): with real SPIRE, a
    /// node's veil agent waits for `lab up` to see its spire-agent serving SVIDs.
    #[serde(default)]
    pub start_after: Option<PathBuf>,
}

/// The daemons of a lab.
pub fn manifest(spec: &LabSpec, paths: &LabPaths, exe: &Path) -> Vec<Managed> {
    let exe = exe.display().to_string();
    // The SPIRE server first: agents fail closed (no identities) until it answers.
    let mut out = match spec.identity {
        IdentityProvider::Dev => vec![Managed {
            name: "spire".into(),
            argv: vec![
                exe.clone(),
                "lab".into(),
                "spire-server".into(),
                "--name".into(),
                spec.name.clone(),
            ],
            netns: None,
            cgroup: paths.cgroup.join("spire"),
            log: paths.log("spire"),
            env: vec![],
            start_after: None,
        }],
        IdentityProvider::Spire => {
            // Real SPIRE: the server in the underlay netns, one agent per node in the node's
            // netns (through `veil lab spire-agent`, which waits for its join token).
            let server = super::spire_real::tool("spire-server")
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "spire-server".into());
            let mut v = vec![Managed {
                name: "spire".into(),
                argv: vec![
                    server,
                    "run".into(),
                    "-config".into(),
                    super::spire_real::server_config(paths)
                        .display()
                        .to_string(),
                ],
                netns: Some(super::spec::underlay_netns(&spec.name)),
                cgroup: paths.cgroup.join("spire"),
                log: paths.log("spire"),
                env: vec![],
                start_after: None,
            }];
            for n in &spec.nodes {
                v.push(Managed {
                    name: format!("spire-agent-{}", n.name),
                    argv: vec![
                        exe.clone(),
                        "lab".into(),
                        "spire-agent".into(),
                        "--name".into(),
                        spec.name.clone(),
                        "--node".into(),
                        n.name.clone(),
                    ],
                    netns: Some(n.netns.clone()),
                    cgroup: paths.node_cgroup(&n.name).join("spire-agent"),
                    log: paths.log(&format!("spire-agent-{}", n.name)),
                    env: vec![],
                    start_after: None,
                });
            }
            v
        }
    };
    for n in &spec.nodes {
        out.push(Managed {
            name: format!("agent-{}", n.name),
            argv: vec![
                exe.clone(),
                "agent".into(),
                "--config".into(),
                paths.agent_config(&n.name).display().to_string(),
            ],
            netns: Some(n.netns.clone()),
            cgroup: paths.node_cgroup(&n.name).join("agent"),
            log: paths.log(&format!("agent-{}", n.name)),
            env: vec![(
                "RUST_LOG".into(),
                std::env::var("VEIL_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )],
            start_after: (spec.identity == IdentityProvider::Spire)
                .then(|| super::spire_real::agent_release(paths, &n.name)),
        });
    }
    for p in &spec.pods {
        for s in &p.serve {
            let kind = match s.kind {
                super::spec::ServeKind::Http => "http",
                super::spec::ServeKind::Echo => "echo",
            };
            out.push(Managed {
                name: serve::log_name(p, s.port),
                argv: vec![
                    exe.clone(),
                    "lab".into(),
                    "serve".into(),
                    "--kind".into(),
                    kind.into(),
                    "--port".into(),
                    s.port.to_string(),
                    "--pod".into(),
                    p.qualified_name(),
                    "--ready-file".into(),
                    serve::ready_file(paths, p, s.port).display().to_string(),
                ],
                netns: Some(p.netns.clone()),
                cgroup: paths.pod_cgroup(p),
                log: paths.log(&serve::log_name(p, s.port)),
                env: vec![],
                start_after: None,
            });
        }
    }
    out
}

pub fn write_manifest(paths: &LabPaths, m: &[Managed]) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("manifest serializes");
    sys::write_atomic(&paths.supervisor_manifest(), &json).map_err(Error::from)
}

fn read_manifest(paths: &LabPaths) -> Result<Vec<Managed>> {
    let p = paths.supervisor_manifest();
    let text = std::fs::read(&p).map_err(|source| Error::Write {
        path: p.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| Error::BadState {
        lab: paths.name.clone(),
        path: p,
        source,
    })
}

/// Restart delay after the n-th consecutive quick exit: 0.5 s doubling to a 10 s cap. A process
/// that ran for a minute starts over at the minimum.
pub fn backoff(consecutive_failures: u32) -> Duration {
    const RESTART: veil_common::backoff::Backoff =
        veil_common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    RESTART.delay(consecutive_failures)
}

/// Runs the supervisor loop (never returns unless the manifest is unreadable).
pub fn run(paths: &LabPaths) -> Result<()> {
    let manifest = read_manifest(paths)?;
    let (tx, rx) = mpsc::channel::<usize>();
    let mut failures = vec![0u32; manifest.len()];
    let mut started = vec![Instant::now(); manifest.len()];
    for (i, m) in manifest.iter().enumerate() {
        match &m.start_after {
            None => start(i, m, &tx),
            Some(gate) => {
                let (gate, m, tx) = (gate.clone(), m.clone(), tx.clone());
                eprintln!("supervisor: {} waits for {}", m.name, gate.display());
                std::thread::spawn(move || {
                    while !gate.exists() {
                        // Poll interval of the start gate (`lab up` writes it).
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    start(i, &m, &tx);
                });
            }
        }
        started[i] = Instant::now();
    }
    while let Ok(i) = rx.recv() {
        let m = &manifest[i];
        if started[i].elapsed() > Duration::from_secs(60) {
            failures[i] = 0;
        }
        let delay = backoff(failures[i]);
        failures[i] = failures[i].saturating_add(1);
        eprintln!("supervisor: {} exited; restarting in {delay:?}", m.name);
        std::thread::sleep(delay);
        start(i, m, &tx);
        started[i] = Instant::now();
    }
    Ok(())
}

fn start(i: usize, m: &Managed, done: &mpsc::Sender<usize>) {
    let mut cmd = Command::new(&m.argv[0]);
    cmd.args(&m.argv[1..]);
    for (k, v) in &m.env {
        cmd.env(k, v);
    }
    let placement = sys::Placement {
        netns: m.netns.as_deref(),
        cgroup: Some(&m.cgroup),
        log: &m.log,
    };
    let done = done.clone();
    match sys::spawn_daemon(&mut cmd, &placement) {
        Ok(mut child) => {
            eprintln!("supervisor: started {} (pid {})", m.name, child.id());
            std::thread::spawn(move || {
                let status = child.wait();
                eprintln!("supervisor: process {i} ended: {status:?}");
                let _ = done.send(i);
            });
        }
        Err(e) => {
            eprintln!("supervisor: cannot start {}: {e}", m.name);
            std::thread::spawn(move || {
                let _ = done.send(i);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(5), Duration::from_secs(10));
        assert_eq!(backoff(100), Duration::from_secs(10));
    }
}
