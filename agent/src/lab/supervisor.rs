//! The lab supervisor: one process per lab that starts the lab's daemons (agents, dev SPIRE
//! server, pod servers) in their namespaces and cgroups and restarts any that exits, with
//! capped backoff, the way kubelet restarts a DaemonSet pod. `veil lab down` kills its cgroup
//! first so nothing is restarted during teardown.

use std::{
    collections::BTreeMap,
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

impl Managed {
    /// `argv` in `netns` under `cgroup`, logging to the lab log named after the daemon, with
    /// no extra environment and no start condition.
    pub(super) fn new(
        paths: &LabPaths,
        name: String,
        argv: Vec<String>,
        netns: Option<String>,
        cgroup: PathBuf,
    ) -> Managed {
        Managed {
            log: paths.log(&name),
            name,
            argv,
            netns,
            cgroup,
            env: vec![],
            start_after: None,
        }
    }
}

/// Extra environment for some nodes' agents: node name → variable → value.
pub type AgentEnv = BTreeMap<String, BTreeMap<String, String>>;

/// The daemons of a lab; `agent_env` adds to (or overrides) the named nodes' agents' environment.
pub fn manifest(
    spec: &LabSpec,
    paths: &LabPaths,
    exe: &Path,
    agent_env: &AgentEnv,
) -> Vec<Managed> {
    let exe = exe.display().to_string();
    // `veil <args>`, the same binary as `lab up`'s.
    let veil = |args: &[&str]| -> Vec<String> {
        std::iter::once(exe.clone())
            .chain(args.iter().map(|a| a.to_string()))
            .collect()
    };
    // The SPIRE server first: agents fail closed (no identities) until it answers.
    let mut out = match spec.identity {
        IdentityProvider::Dev => vec![Managed::new(
            paths,
            "spire".into(),
            veil(&["lab", "spire-server", "--name", &spec.name]),
            None,
            paths.cgroup.join("spire"),
        )],
        IdentityProvider::Spire => {
            // Real SPIRE: the server in the underlay netns, one agent per node in the node's
            // netns (through `veil lab spire-agent`, which waits for its join token).
            let server = super::spire_real::tool("spire-server")
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "spire-server".into());
            let config = super::spire_real::server_config(paths);
            let mut v = vec![Managed::new(
                paths,
                "spire".into(),
                vec![
                    server,
                    "run".into(),
                    "-config".into(),
                    config.display().to_string(),
                ],
                Some(super::spec::underlay_netns(&spec.name)),
                paths.cgroup.join("spire"),
            )];
            for n in &spec.nodes {
                v.push(Managed::new(
                    paths,
                    format!("spire-agent-{}", n.name),
                    veil(&[
                        "lab",
                        "spire-agent",
                        "--name",
                        &spec.name,
                        "--node",
                        &n.name,
                    ]),
                    Some(n.netns.clone()),
                    paths.node_cgroup(&n.name).join("spire-agent"),
                ));
            }
            v
        }
    };
    let kubernetes = spec.control_plane == super::spec::ControlPlane::Kubernetes;
    if kubernetes {
        // etcd and the apiserver first: the agents' source reads from them.
        let mut cp = super::kube::managed(spec, paths, Path::new(&exe));
        cp.append(&mut out);
        out = cp;
    }
    for n in &spec.nodes {
        let config = paths.agent_config(&n.name).display().to_string();
        let mut env = BTreeMap::from([(
            "RUST_LOG".to_string(),
            std::env::var("VEIL_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        )]);
        env.extend(agent_env.get(&n.name).cloned().unwrap_or_default());
        out.push(Managed {
            env: env.into_iter().collect(),
            // With Kubernetes the agent's credentials exist once the control plane is
            // bootstrapped (before SPIRE releases the agents).
            start_after: if spec.identity == IdentityProvider::Spire {
                Some(super::spire_real::agent_release(paths, &n.name))
            } else if kubernetes {
                Some(super::kube::node_kubeconfig(paths, &n.name))
            } else {
                None
            },
            ..Managed::new(
                paths,
                format!("agent-{}", n.name),
                veil(&["agent", "--config", &config]),
                Some(n.netns.clone()),
                paths.node_cgroup(&n.name).join("agent"),
            )
        });
    }
    // With Kubernetes the pods' servers are their containers, run by the lab's kubelet.
    for p in spec.pods.iter().filter(|_| !kubernetes) {
        for s in &p.serve {
            let kind = match s.kind {
                super::spec::ServeKind::Http => "http",
                super::spec::ServeKind::Echo => "echo",
            };
            let ready = serve::ready_file(paths, p, s.port).display().to_string();
            out.push(Managed::new(
                paths,
                serve::log_name(p, s.port),
                veil(&[
                    "lab",
                    "serve",
                    "--kind",
                    kind,
                    "--port",
                    &s.port.to_string(),
                    "--pod",
                    &p.qualified_name(),
                    "--ready-file",
                    &ready,
                ]),
                Some(p.netns.clone()),
                paths.pod_cgroup(p),
            ));
        }
    }
    out
}

pub fn write_manifest(paths: &LabPaths, m: &[Managed]) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("manifest serializes");
    sys::write_atomic(&paths.supervisor_manifest(), &json).map_err(Error::from)
}

pub(super) fn read_manifest(paths: &LabPaths) -> Result<Vec<Managed>> {
    let p = paths.supervisor_manifest();
    let text = std::fs::read(&p).map_err(|source| Error::Read {
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
