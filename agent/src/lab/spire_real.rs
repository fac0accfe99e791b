//! The lab on real SPIRE (`identity: spire`): one `spire-server` in the lab's underlay netns
//! (listening on the bridge address 198.18.0.254:8081), one `spire-agent` per node in the
//! node's netns, attested with a join token, with its Workload API socket and its admin socket
//! (Delegated Identity API) listing the node's veil agent (`spiffe://<td>/veil/node/<node>`)
//! as its only authorized delegate. The lab registers, per node:
//!
//! - the join token's alias `spiffe://<td>/node/<node>` (`token generate -spiffeID`), the parent
//!   of every entry of that node (SPIRE reserves `/spire/...` for itself);
//! - veil's node agent: `spiffe://<td>/veil/node/<node>`, selector `unix:uid:0`;
//! - each pod of the node: `spiffe://<td>/ns/<ns>/sa/<sa>`, selectors `k8s:ns:<ns>` and
//!   `k8s:sa:<sa>` (the agent asks for `k8s:ns`, `k8s:sa`, `k8s:pod-name`; SPIRE matches entries
//!   whose selectors are a subset). One entry per service account and node.
//!
//! Every entry's X.509-SVID TTL is the lab's `svid_ttl` (SPIRE backdates `notBefore` by 10 s
//! and its agent renews at half the lifetime). The CA TTL is 6 × `svid_ttl`, at least 2 h.
//! The server polls its datastore for entry and node changes every second and each agent syncs
//! every second (± 10 % jitter), so a deleted entry's SVID leaves the Delegated Identity stream
//! within about 2-3 s, and a fresh agent's first SVIDs arrive within about 2 s of attestation
//! (with SPIRE's defaults, 5 s each, `lab up` took 11 s instead of ~3 s).
//!
//! The supervisor runs `spire-server run` directly and each spire-agent through
//! `veil lab spire-agent`, which waits until `lab up` has written the agent's config (join
//! token and trust bundle in it) and then `exec`s spire-agent in place: same pid, netns and
//! cgroup. A node's veil agent is started only once its spire-agent serves SVIDs
//! (`spire-agent api fetch x509` as root returns veil's node SVID): `lab up` then writes the
//! node's release file, which the supervisor waits for before the agent's first start (not
//! before restarts). Started earlier, the agent's identity client sits in its reconnect
//! backoff (up to 5 s) when the SVIDs appear. Everything lives under `<state>/spire/`, which
//! `lab down` removes with the state dir.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{spec::LabSpec, Error, LabPaths, Progress, Result};
use crate::sys;

/// The spire-server's address on the lab's bridge (node ids end at 250).
pub const SERVER_IP: &str = "198.18.0.254";
pub const SERVER_PORT: u16 = 8081;
/// Server entry-cache reload and agent sync: together they bound how long a deleted entry's
/// SVID is still handed out.
pub const SERVER_CACHE_RELOAD: &str = "1s";
pub const AGENT_SYNC: &str = "1s";

/// A SPIRE binary: `$VEIL_TOOLS_BIN`, else `$VEIL_CACHE_DIR/bin`, else `~/.cache/veil/bin`.
pub fn tool(name: &str) -> std::result::Result<PathBuf, String> {
    let dir = if let Some(d) = std::env::var_os("VEIL_TOOLS_BIN") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("VEIL_CACHE_DIR") {
        PathBuf::from(d).join("bin")
    } else {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/veil/bin")
    };
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "`identity: spire` needs {name}, not found at {} (run scripts/setup.sh, or set VEIL_TOOLS_BIN)",
            p.display()
        ))
    }
}

/// Both binaries, checked before `lab up` creates anything.
pub fn check_tools() -> std::result::Result<(), String> {
    tool("spire-server")?;
    tool("spire-agent")?;
    Ok(())
}

/// `spire-server --version`, e.g. `1.13.3`.
pub fn version() -> Option<String> {
    let out = Command::new(tool("spire-server").ok()?)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_string())
}

pub fn dir(paths: &LabPaths) -> PathBuf {
    paths.root.join("spire")
}
fn server_dir(paths: &LabPaths) -> PathBuf {
    dir(paths).join("server")
}
pub fn server_config(paths: &LabPaths) -> PathBuf {
    server_dir(paths).join("server.conf")
}
/// The server's API socket (`spire-server entry show -socketPath ...`).
pub fn server_socket(paths: &LabPaths) -> PathBuf {
    server_dir(paths).join("api.sock")
}
fn bundle_path(paths: &LabPaths) -> PathBuf {
    dir(paths).join("bundle.pem")
}
fn agent_dir(paths: &LabPaths, node: &str) -> PathBuf {
    dir(paths).join(node)
}
/// Written by `lab up` once the node's join token exists; `veil lab spire-agent` waits for it.
pub fn agent_config(paths: &LabPaths, node: &str) -> PathBuf {
    agent_dir(paths, node).join("agent.conf")
}
pub fn workload_socket(paths: &LabPaths, node: &str) -> PathBuf {
    agent_dir(paths, node).join("workload").join("api.sock")
}
/// Not under the Workload API socket's directory (spire-agent refuses that).
pub fn admin_socket(paths: &LabPaths, node: &str) -> PathBuf {
    agent_dir(paths, node).join("admin").join("admin.sock")
}

/// Written by `lab up` once the node's spire-agent serves SVIDs; the supervisor starts the
/// node's veil agent after it exists.
pub fn agent_release(paths: &LabPaths, node: &str) -> PathBuf {
    agent_dir(paths, node).join("serving")
}

fn node_alias(spec: &LabSpec, node: &str) -> String {
    format!("spiffe://{}/node/{node}", spec.trust_domain)
}
/// veil's node agent ID (`auth::node_spiffe_id`).
fn node_agent_id(spec: &LabSpec, node: &str) -> String {
    format!("spiffe://{}/veil/node/{node}", spec.trust_domain)
}
pub fn pod_id(spec: &LabSpec, ns: &str, sa: &str) -> String {
    format!("spiffe://{}/ns/{ns}/sa/{sa}", spec.trust_domain)
}

/// The CA TTL: 6 × the SVID TTL (SPIRE's advice), at least 2 h.
pub fn ca_ttl(spec: &LabSpec) -> Duration {
    (spec.svid_ttl * 6).max(Duration::from_secs(2 * 3600))
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|source| Error::Write {
        path: p.into(),
        source,
    })
}

/// Directories and the server config; the agents' configs follow in `register`.
pub fn prepare(spec: &LabSpec, paths: &LabPaths) -> Result<()> {
    let sd = server_dir(paths);
    mkdir(&sd.join("data"))?;
    for n in &spec.nodes {
        let ad = agent_dir(paths, &n.name);
        for sub in ["data", "workload", "admin"] {
            mkdir(&ad.join(sub))?;
        }
    }
    let d = sd.display();
    let conf = format!(
        r#"server {{
    bind_address = "{SERVER_IP}"
    bind_port = "{SERVER_PORT}"
    socket_path = "{d}/api.sock"
    trust_domain = "{td}"
    data_dir = "{d}/data"
    log_level = "INFO"
    ca_ttl = "{ca}s"
    default_x509_svid_ttl = "{ttl}s"
    default_jwt_svid_ttl = "5m"
    agent_ttl = "1h"
    experimental {{
        cache_reload_interval = "{SERVER_CACHE_RELOAD}"
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{d}/data/keys.json"
        }}
    }}
}}
"#,
        td = spec.trust_domain,
        ca = ca_ttl(spec).as_secs(),
        ttl = spec.svid_ttl.as_secs(),
    );
    sys::write_atomic(&server_config(paths), conf.as_bytes()).map_err(Error::from)
}

fn agent_config_text(spec: &LabSpec, paths: &LabPaths, node: &str, token: &str) -> String {
    let d = agent_dir(paths, node);
    format!(
        r#"agent {{
    data_dir = "{d}/data"
    log_level = "INFO"
    server_address = "{SERVER_IP}"
    server_port = "{SERVER_PORT}"
    socket_path = "{ws}"
    admin_socket_path = "{adm}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
    join_token = "{token}"
    authorized_delegates = ["{delegate}"]
    experimental {{
        sync_interval = "{AGENT_SYNC}"
    }}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{d}/data"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
        d = d.display(),
        ws = workload_socket(paths, node).display(),
        adm = admin_socket(paths, node).display(),
        bundle = bundle_path(paths).display(),
        td = spec.trust_domain,
        delegate = node_agent_id(spec, node),
    )
}

/// `spire-server <args> -socketPath <lab server socket>`: its stdout, or an error with its
/// output.
pub fn server_cli(paths: &LabPaths, args: &[&str]) -> Result<String> {
    let bin = tool("spire-server").map_err(Error::Prerequisite)?;
    let out = Command::new(&bin)
        .args(args)
        .arg("-socketPath")
        .arg(server_socket(paths))
        .stdin(Stdio::null())
        .output()
        .map_err(|source| sys::Error::Spawn {
            command: bin.display().to_string(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(Error::Spire(format!(
            "spire-server {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(stdout)
}

/// The value of a `Name: value` / `Name   : value` line of spire-server's text output.
pub fn fields<'a>(out: &'a str, name: &'a str) -> impl Iterator<Item = String> + 'a {
    out.lines().filter_map(move |l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_owned())
    })
}

fn field(out: &str, name: &str) -> Result<String> {
    fields(out, name)
        .next()
        .ok_or_else(|| Error::Spire(format!("no {name:?} in spire-server output: {out}")))
}

/// Waits for the supervised spire-server, then registers the lab: the bundle for the agents,
/// one join token per node (written into its agent's config, which starts it), the node agents'
/// and the pods' entries.
pub fn register(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    deadline: Instant,
    interrupted: &dyn Fn() -> bool,
) -> Result<()> {
    let bin = tool("spire-server").map_err(Error::Prerequisite)?;
    let t0 = Instant::now();
    loop {
        let ok = Command::new(&bin)
            .arg("healthcheck")
            .arg("-socketPath")
            .arg(server_socket(paths))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            break;
        }
        if interrupted() {
            return Err(Error::Interrupted);
        }
        if Instant::now() > deadline {
            let log = paths.log("spire");
            return Err(Error::NotReady {
                what: "spire-server".into(),
                waited: t0.elapsed(),
                log_tail: super::log_tail(&log),
                log,
            });
        }
        // Poll interval of the health check.
        std::thread::sleep(Duration::from_millis(100));
    }
    progress.step(format!(
        "spire-server {} healthy on {SERVER_IP}:{SERVER_PORT} (socket {})",
        version().unwrap_or_default(),
        server_socket(paths).display()
    ));
    let bundle = server_cli(paths, &["bundle", "show"])?;
    sys::write_atomic(&bundle_path(paths), bundle.as_bytes())?;
    let ttl = spec.svid_ttl.as_secs().to_string();
    let mut entries = 0;
    for n in &spec.nodes {
        let alias = node_alias(spec, &n.name);
        let out = server_cli(paths, &["token", "generate", "-spiffeID", &alias])?;
        let token = field(&out, "Token")?;
        let mut create = |id: &str, selectors: &[String]| -> Result<()> {
            let mut args = vec![
                "entry",
                "create",
                "-parentID",
                &alias,
                "-spiffeID",
                id,
                "-x509SVIDTTL",
                &ttl,
            ];
            for s in selectors {
                args.extend(["-selector", s.as_str()]);
            }
            server_cli(paths, &args)?;
            entries += 1;
            Ok(())
        };
        create(&node_agent_id(spec, &n.name), &["unix:uid:0".to_string()])?;
        let mut done: Vec<(&str, &str)> = Vec::new();
        for p in spec.pods.iter().filter(|p| p.node == n.name) {
            let key = (p.namespace.as_str(), p.service_account.as_str());
            if done.contains(&key) {
                continue; // one entry per service account and node
            }
            done.push(key);
            create(
                &pod_id(spec, &p.namespace, &p.service_account),
                &[
                    format!("k8s:ns:{}", p.namespace),
                    format!("k8s:sa:{}", p.service_account),
                ],
            )?;
        }
        let conf = agent_config_text(spec, paths, &n.name, &token);
        sys::write_atomic(&agent_config(paths, &n.name), conf.as_bytes())?;
        progress.step(format!(
            "spire-agent {} configured (join token for {alias})",
            n.name
        ));
    }
    progress.step(format!(
        "{entries} SPIRE registration entries (x509 SVID TTL {ttl}s, CA TTL {}s)",
        ca_ttl(spec).as_secs()
    ));
    Ok(())
}

/// Waits until each node's spire-agent serves SVIDs (`spire-agent api fetch x509` over its
/// Workload API socket, as root: veil's node agent entry, `unix:uid:0`), then releases the
/// node's veil agent (writes [`agent_release`]).
pub fn release_agents(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    deadline: Instant,
    interrupted: &dyn Fn() -> bool,
) -> Result<()> {
    let bin = tool("spire-agent").map_err(Error::Prerequisite)?;
    let t0 = Instant::now();
    for n in &spec.nodes {
        let ws = workload_socket(paths, &n.name);
        let mut tries = 0u32;
        loop {
            tries += 1;
            // `api fetch` fails at once while the socket is missing or the entry not yet synced
            // ("no identity issued"); its own timeout only bounds a hung call.
            let ok = Command::new(&bin)
                .args([
                    "api",
                    "fetch",
                    "x509",
                    "-silent",
                    "-timeout",
                    "2s",
                    "-socketPath",
                ])
                .arg(&ws)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if interrupted() {
                return Err(Error::Interrupted);
            }
            if Instant::now() > deadline {
                let log = paths.log(&format!("spire-agent-{}", n.name));
                return Err(Error::NotReady {
                    what: format!("spire-agent on {}", n.name),
                    waited: t0.elapsed(),
                    log_tail: super::log_tail(&log),
                    log,
                });
            }
            // Poll interval: each try is a spire-agent process (~20 ms of CPU).
            std::thread::sleep(Duration::from_millis(100));
        }
        sys::write_atomic(&agent_release(paths, &n.name), b"")?;
        progress.step(format!(
            "spire-agent {} serves SVIDs ({tries} tries); veil agent released",
            n.name
        ));
    }
    Ok(())
}

/// `veil lab revoke --pod` with SPIRE: deletes every entry of the pod's SPIFFE ID. Returns the
/// SPIFFE ID and the deleted entry IDs.
pub fn revoke(
    spec: &LabSpec,
    paths: &LabPaths,
    pod: &super::spec::PodSpec,
) -> Result<(String, Vec<String>)> {
    let id = pod_id(spec, &pod.namespace, &pod.service_account);
    let out = server_cli(paths, &["entry", "show", "-spiffeID", &id])?;
    let ids: Vec<String> = fields(&out, "Entry ID").collect();
    for e in &ids {
        server_cli(paths, &["entry", "delete", "-entryID", e])?;
    }
    Ok((id, ids))
}

/// `veil lab spire-agent` (run by the supervisor in the node's netns and cgroup): waits for the
/// agent config `lab up` writes, then becomes spire-agent. Returns only on error.
pub fn exec_agent(paths: &LabPaths, node: &str) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt as _;
    let bin = tool("spire-agent").map_err(Error::Prerequisite)?;
    let conf = agent_config(paths, node);
    let mut said = false;
    while !conf.exists() {
        if !said {
            eprintln!("waiting for {} (written by `lab up`)", conf.display());
            said = true;
        }
        // Poll interval while `lab up` registers the node.
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = Command::new(&bin)
        .arg("run")
        .arg("-config")
        .arg(&conf)
        .exec();
    Err(sys::Error::Spawn {
        command: bin.display().to_string(),
        source: err,
    }
    .into())
}
