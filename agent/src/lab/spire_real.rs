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
use veil_spire::{
    cli::{self, fields},
    conf::{AgentConf, ServerConf, ServerKeys},
};

/// The spire-server's address on the lab's bridge (node ids end at 250).
pub const SERVER_IP: &str = "198.18.0.254";
/// [`SERVER_IP`] as an address (what `veil check` recognises SPIRE's traffic by).
pub const SERVER_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 254);
/// The spire-server's address on an IPv6-only lab's bridge (the underlay's numbering: 254 read
/// with its decimal digits).
pub const SERVER_IP6: &str = "fd00:198:18::254";
/// [`SERVER_IP6`] as an address.
pub const SERVER_ADDR6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0x254);
pub const SERVER_PORT: u16 = 8081;

/// Where this lab's spire-server listens: on the underlay's family.
pub fn server_ip(spec: &LabSpec) -> &'static str {
    if spec.ip_family.v6_underlay() {
        SERVER_IP6
    } else {
        SERVER_IP
    }
}
/// Server entry-cache reload and agent sync: together they bound how long a deleted entry's
/// SVID is still handed out.
pub const SERVER_CACHE_RELOAD: Duration = Duration::from_secs(1);
pub const AGENT_SYNC: Duration = Duration::from_secs(1);

/// A SPIRE binary ([`super::tool`]).
pub fn tool(name: &str) -> std::result::Result<PathBuf, String> {
    super::tool(name).map_err(|e| format!("`identity: spire` needs {e}"))
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
/// Registers a Pod's service account on its node with spire-server, as SPIRE's controller
/// manager would for a Pod made with kubectl: one entry per namespace, service account and node
/// (an entry that already exists is kept).
pub fn register_pod(
    spec: &LabSpec,
    paths: &LabPaths,
    node: &str,
    ns: &str,
    sa: &str,
) -> Result<()> {
    let (alias, id) = (node_alias(spec, node), pod_id(spec, ns, sa));
    let (sel_ns, sel_sa) = (format!("k8s:ns:{ns}"), format!("k8s:sa:{sa}"));
    let args = cli::entry_create_args(&alias, &id, &[&sel_ns, &sel_sa], Some(spec.svid_ttl));
    match server_cli(paths, &args) {
        Err(Error::Spire(e))
            if e.contains("AlreadyExists") || e.contains("similar entry already exists") =>
        {
            Ok(())
        }
        r => r.map(drop),
    }
}

/// Undoes [`register_pod`]: deletes the node's entries for the service account. Returns the
/// deleted entry IDs.
pub fn unregister_pod(
    spec: &LabSpec,
    paths: &LabPaths,
    node: &str,
    ns: &str,
    sa: &str,
) -> Result<Vec<String>> {
    let (alias, id) = (node_alias(spec, node), pod_id(spec, ns, sa));
    delete_entries(paths, &["-spiffeID", &id, "-parentID", &alias])
}

/// Deletes every entry `entry show <filter>` lists; returns their IDs.
fn delete_entries(paths: &LabPaths, filter: &[&str]) -> Result<Vec<String>> {
    let mut args = vec!["entry", "show"];
    args.extend_from_slice(filter);
    let out = server_cli(paths, &args)?;
    let ids: Vec<String> = fields(&out, "Entry ID").collect();
    for e in &ids {
        server_cli(paths, &["entry", "delete", "-entryID", e])?;
    }
    Ok(ids)
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
    let (data, keys) = (sd.join("data"), sd.join("data").join("keys.json"));
    let conf = ServerConf {
        bind_address: server_ip(spec),
        bind_port: SERVER_PORT,
        socket_path: &server_socket(paths),
        trust_domain: &spec.trust_domain,
        data_dir: &data,
        log_level: "INFO",
        ca_ttl: ca_ttl(spec),
        x509_svid_ttl: spec.svid_ttl,
        jwt_svid_ttl: Duration::from_secs(300),
        agent_ttl: Duration::from_secs(3600),
        cache_reload_interval: SERVER_CACHE_RELOAD,
        keys: ServerKeys::Disk(&keys),
    }
    .render();
    sys::write_atomic(&server_config(paths), conf.as_bytes()).map_err(Error::from)
}

fn agent_config_text(spec: &LabSpec, paths: &LabPaths, node: &str, token: &str) -> String {
    AgentConf {
        data_dir: &agent_dir(paths, node).join("data"),
        log_level: "INFO",
        server_address: server_ip(spec),
        server_port: SERVER_PORT,
        socket_path: &workload_socket(paths, node),
        admin_socket_path: &admin_socket(paths, node),
        trust_bundle_path: &bundle_path(paths),
        trust_domain: &spec.trust_domain,
        join_token: Some(token),
        delegate: &node_agent_id(spec, node),
        sync_interval: AGENT_SYNC,
    }
    .render()
}

/// `spire-server <args> -socketPath <lab server socket>`: its stdout, or an error with its
/// output.
pub fn server_cli<S: AsRef<str>>(paths: &LabPaths, args: &[S]) -> Result<String> {
    let bin = tool("spire-server").map_err(Error::Prerequisite)?;
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new(&bin)
        .args(&args)
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

fn field(out: &str, name: &str) -> Result<String> {
    fields(out, name)
        .next()
        .ok_or_else(|| Error::Spire(format!("no {name:?} in spire-server output: {out}")))
}

/// Waits for the supervised spire-server, then registers the lab: the bundle for the agents,
/// one join token per node (written into its agent's config, which starts it), the node agents'
/// and the pods' entries.
pub(crate) fn register(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    wait: &super::Wait<'_>,
) -> Result<()> {
    let bin = tool("spire-server").map_err(Error::Prerequisite)?;
    loop {
        let healthcheck = ["healthcheck", "-socketPath"];
        if sys::succeeds(
            Command::new(&bin)
                .args(healthcheck)
                .arg(server_socket(paths)),
        ) {
            break;
        }
        wait.keep_waiting(|waited| Error::not_ready("spire-server", waited, paths.log("spire")))?;
        // Poll interval of the health check.
        std::thread::sleep(Duration::from_millis(100));
    }
    progress.step(format!(
        "spire-server {} healthy on {}:{SERVER_PORT} (socket {})",
        version().unwrap_or_default(),
        server_ip(spec),
        server_socket(paths).display()
    ));
    let bundle = server_cli(paths, &["bundle", "show"])?;
    sys::write_atomic(&bundle_path(paths), bundle.as_bytes())?;
    let mut entries = 0;
    for n in &spec.nodes {
        let alias = node_alias(spec, &n.name);
        let out = server_cli(paths, &["token", "generate", "-spiffeID", &alias])?;
        let token = field(&out, "Token")?;
        let mut create = |id: &str, selectors: &[&str]| -> Result<()> {
            server_cli(
                paths,
                &cli::entry_create_args(&alias, id, selectors, Some(spec.svid_ttl)),
            )?;
            entries += 1;
            Ok(())
        };
        create(&node_agent_id(spec, &n.name), &["unix:uid:0"])?;
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
                    &format!("k8s:ns:{}", p.namespace),
                    &format!("k8s:sa:{}", p.service_account),
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
        "{entries} SPIRE registration entries (x509 SVID TTL {}s, CA TTL {}s)",
        spec.svid_ttl.as_secs(),
        ca_ttl(spec).as_secs()
    ));
    Ok(())
}

/// Where `lab up` records the pids of its `spire-agent api fetch` readiness probes, one per
/// line: a probe that comes a moment before the agent cached veil's node SVID makes spire-agent
/// log `No identity issued` with the probe's pid, which the test suites' log checks must tell
/// apart from a veil agent fetching without an identity.
pub fn probe_pids_path(paths: &LabPaths) -> std::path::PathBuf {
    paths.root.join("spire-probe-pids")
}

fn record_probe_pid(paths: &LabPaths, pid: u32) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(probe_pids_path(paths))
    {
        let _ = writeln!(f, "{pid}");
    }
}

/// Waits until each node's spire-agent serves SVIDs (`spire-agent api fetch x509` over its
/// Workload API socket, as root: veil's node agent entry, `unix:uid:0`), then releases the
/// node's veil agent (writes [`agent_release`]).
pub(crate) fn release_agents(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    wait: &super::Wait<'_>,
) -> Result<()> {
    let bin = tool("spire-agent").map_err(Error::Prerequisite)?;
    for n in &spec.nodes {
        let ws = workload_socket(paths, &n.name);
        // A fetch before the node agent's entry is synced makes spire-agent log an error ("No
        // identity issued") for every try; wait first for the agent to start minting veil's
        // node SVID (its "Creating X509-SVID" line), which it caches a server round trip later.
        let log = paths.log(&format!("spire-agent-{}", n.name));
        let minting = "msg=\"Creating X509-SVID\" entry_id=";
        let id = format!("spiffe_id=\"{}\"", node_agent_id(spec, &n.name));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l.contains(minting) && l.contains(&id)) {
                break;
            }
            wait.keep_waiting(|waited| {
                let what = format!("spire-agent on {} (minting {})", n.name, id);
                Error::not_ready(what, waited, log.clone())
            })?;
            // Poll interval of the agent's log (it syncs every second).
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut tries = 0u32;
        loop {
            // The round trip of the CSR to the server; each later try waits another 100 ms.
            std::thread::sleep(Duration::from_millis(100));
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
                .spawn()
                .and_then(|mut c| {
                    record_probe_pid(paths, c.id());
                    c.wait()
                })
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            wait.keep_waiting(|waited| {
                let what = format!("spire-agent on {}", n.name);
                Error::not_ready(what, waited, log.clone())
            })?;
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
    let ids = delete_entries(paths, &["-spiffeID", &id])?;
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

/// A registration entry as `spire-server entry show` prints it (the fields the lab sets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: String,
    pub parent_id: String,
    pub revision: u64,
    /// `None` for SPIRE's default.
    pub x509_svid_ttl: Option<u64>,
    pub selectors: Vec<String>,
}

/// The entries of `entry show` / `entry update` text output: one block per entry, blocks
/// separated by blank lines.
pub fn parse_entries(out: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for block in out.split("\n\n") {
        let one = |k: &str| fields(block, k).next();
        let (Some(id), Some(spiffe_id), Some(parent_id)) =
            (one("Entry ID"), one("SPIFFE ID"), one("Parent ID"))
        else {
            continue;
        };
        entries.push(Entry {
            id,
            spiffe_id,
            parent_id,
            revision: one("Revision").and_then(|r| r.parse().ok()).unwrap_or(0),
            x509_svid_ttl: one("X509-SVID TTL").and_then(|t| t.parse().ok()),
            selectors: fields(block, "Selector").collect(),
        });
    }
    entries
}

/// What `veil lab rotate` renews.
pub enum RotateTarget<'a> {
    Pod(&'a super::spec::PodSpec),
    /// The node's SVID and its pods' (every entry parented by the node).
    Node(&'a str),
    All,
}

/// `veil lab rotate` with SPIRE: `entry update` of the target's entries with their own fields.
/// The server bumps an entry's revision number on every update (sqlstore
/// `updateRegistrationEntry`); at its next sync a spire-agent sees the new revision, marks the
/// cached SVID of that entry stale (`LRUCache.UpdateEntries`: outdated entries) and mints a new
/// one in the same sync (`manager.updateSVIDs`), which the Workload and Delegated Identity
/// streams then deliver. Bound: server cache reload + agent sync (1 s + 1 s in the lab).
/// Returns the updated entries (new revisions).
pub fn rotate(spec: &LabSpec, paths: &LabPaths, target: RotateTarget<'_>) -> Result<Vec<Entry>> {
    let all = parse_entries(&server_cli(paths, &["entry", "show"])?);
    let chosen: Vec<&Entry> = all
        .iter()
        .filter(|e| match &target {
            RotateTarget::Pod(p) => {
                e.spiffe_id == pod_id(spec, &p.namespace, &p.service_account)
                    && e.parent_id == node_alias(spec, &p.node)
            }
            RotateTarget::Node(n) => e.parent_id == node_alias(spec, n),
            RotateTarget::All => true,
        })
        .collect();
    let mut updated = Vec::new();
    for e in chosen {
        // An update without a mask rewrites every field: pass all the lab sets (the lab's
        // entries use no DNS names, hints, admin or downstream flags, federation or JWT TTL).
        let ttl = e.x509_svid_ttl.map(|t| t.to_string());
        let mut args = vec![
            "entry",
            "update",
            "-entryID",
            &e.id,
            "-parentID",
            &e.parent_id,
            "-spiffeID",
            &e.spiffe_id,
        ];
        if let Some(t) = &ttl {
            args.extend(["-x509SVIDTTL", t.as_str()]);
        }
        for s in &e.selectors {
            args.extend(["-selector", s.as_str()]);
        }
        let out = server_cli(paths, &args)?;
        updated.extend(parse_entries(&out));
    }
    Ok(updated)
}

/// `spire-server localauthority x509 show`: authority IDs by slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Authorities {
    pub active: Option<String>,
    pub prepared: Option<String>,
    pub old: Option<String>,
}

pub fn parse_authorities(out: &str) -> Authorities {
    let mut a = Authorities::default();
    let mut slot: Option<&mut Option<String>> = None;
    for line in out.lines() {
        let l = line.trim();
        if l.starts_with("Active X.509 authority") {
            slot = Some(&mut a.active);
        } else if l.starts_with("Prepared X.509 authority") {
            slot = Some(&mut a.prepared);
        } else if l.starts_with("Old X.509 authority") {
            slot = Some(&mut a.old);
        } else if let Some(id) = l.strip_prefix("Authority ID:") {
            if let Some(s) = slot.take() {
                *s = Some(id.trim().to_string());
            }
        }
    }
    a
}

pub fn authorities(paths: &LabPaths) -> Result<Authorities> {
    Ok(parse_authorities(&server_cli(
        paths,
        &["localauthority", "x509", "show"],
    )?))
}

fn authority_of(out: &str) -> Result<String> {
    field(out, "Authority ID")
}

/// `localauthority x509 prepare`: a new authority whose root joins the bundle. Returns its ID.
pub fn ca_prepare(paths: &LabPaths) -> Result<String> {
    authority_of(&server_cli(paths, &["localauthority", "x509", "prepare"])?)
}

/// `localauthority x509 activate` of the prepared authority: it signs from now on; the old one
/// stays in the bundle. Returns the activated ID.
pub fn ca_activate(paths: &LabPaths) -> Result<String> {
    let prepared = authorities(paths)?
        .prepared
        .ok_or_else(|| Error::Spire("no prepared X.509 authority: run `lab ca prepare`".into()))?;
    authority_of(&server_cli(
        paths,
        &[
            "localauthority",
            "x509",
            "activate",
            "-authorityID",
            &prepared,
        ],
    )?)
}

/// `localauthority x509 taint` of the old authority: every spire-agent re-issues the SVIDs it
/// signed (its own included), without waiting for their half-life. `Ok(None)` if it was tainted
/// already.
pub fn ca_taint_old(paths: &LabPaths) -> Result<Option<String>> {
    let old = authorities(paths)?
        .old
        .ok_or_else(|| Error::Spire("no old X.509 authority: run `lab ca activate`".into()))?;
    match server_cli(
        paths,
        &["localauthority", "x509", "taint", "-authorityID", &old],
    ) {
        Ok(_) => Ok(Some(old)),
        Err(Error::Spire(m)) if m.contains("already tainted") => Ok(None),
        Err(e) => Err(e),
    }
}

/// `localauthority x509 revoke` of the (tainted) old authority: its root leaves the bundle.
pub fn ca_revoke_old(paths: &LabPaths) -> Result<String> {
    let old = authorities(paths)?
        .old
        .ok_or_else(|| Error::Spire("no old X.509 authority: run `lab ca activate`".into()))?;
    server_cli(
        paths,
        &["localauthority", "x509", "revoke", "-authorityID", &old],
    )?;
    Ok(old)
}

/// Attested spire-agents and the serial of each one's own SVID (`agent list`).
pub fn agent_serials(paths: &LabPaths) -> Result<Vec<(String, String)>> {
    let out = server_cli(paths, &["agent", "list"])?;
    Ok(out
        .split("\n\n")
        .filter_map(|b| {
            Some((
                fields(b, "SPIFFE ID").next()?,
                fields(b, "Serial number").next()?,
            ))
        })
        .collect())
}

/// `veil lab ca revoke` with SPIRE: taint the old authority, wait (bounded) until every
/// spire-agent renewed its own SVID (else it could no longer reach the server once the root is
/// gone: join tokens do not re-attest), then revoke. The veil agents' SVIDs are not waited for:
/// what still holds an SVID of the old authority is refused from then on.
pub fn ca_revoke_step(paths: &LabPaths) -> Result<String> {
    let before = agent_serials(paths)?;
    if ca_taint_old(paths)?.is_some() {
        wait_until("spire-agents renew their own SVIDs", CA_WAIT, || {
            Ok(agents_renewed(&before, &agent_serials(paths)?))
        })?;
    }
    ca_revoke_old(paths)
}

fn agents_renewed(before: &[(String, String)], now: &[(String, String)]) -> bool {
    before
        .iter()
        .all(|(id, s)| now.iter().any(|(i, n)| i == id && n != s))
}

/// Bound of each wait of a CA rotation.
pub const CA_WAIT: Duration = Duration::from_secs(60);

/// Polls `cond` every 200 ms until true; fails naming `what` after `timeout`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if cond()? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(Error::Spire(format!(
                "CA rotation: {what}: not done after {timeout:?}"
            )));
        }
        // Poll interval of a step that takes SPIRE seconds (sync 1 s, rotator 5 s).
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `veil lab ca rotate [--revoke-old]`: what happened, when (ms since the command started).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaRotation {
    pub provider: String,
    /// Authority IDs (authority key identifiers) of the SVIDs the agents held before.
    pub old_authorities: Vec<String>,
    pub new_authority: Option<String>,
    pub steps: Vec<CaRotationStep>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CaRotationStep {
    pub step: String,
    pub at_ms: u64,
    pub detail: String,
}

/// The lab's provider behind a CA rotation.
pub trait CaProvider {
    fn name(&self) -> &'static str;
    fn prepare(&self) -> Result<String>;
    fn activate(&self) -> Result<String>;
    /// Make the issuer re-issue what the old authority signed (SPIRE: entry update of every
    /// entry). Returns a note.
    fn reissue(&self) -> Result<String>;
    /// Wait condition after `reissue` beyond the veil agents' SVIDs.
    fn reissued(&self) -> Result<bool>;
    /// Revoke the old authority (SPIRE: taint, wait for the spire-agents' own SVIDs, revoke).
    fn revoke(&self) -> Result<String>;
}

/// SPIRE's local authority. Re-issue is an `entry update` of every entry (as `lab rotate
/// --all`), not the taint: a taint makes each spire-agent delete the SVIDs the old authority
/// signed from its cache (`LRUCache.processTaintedSVIDs`) and the bundle change that carries it
/// notifies the Delegated Identity subscribers with what is left, so for a moment a pod's SVID
/// is gone from the stream and veil removes its pairs as if it were revoked (seen: a TCP stream
/// cut in 1 of 2 runs under load). Renewal through a new revision replaces each SVID in place;
/// the taint that follows finds no workload SVID of the old authority left and only makes the
/// spire-agents renew their own.
pub struct SpireCa<'a> {
    pub spec: &'a LabSpec,
    pub paths: &'a LabPaths,
}

impl<'a> SpireCa<'a> {
    pub fn new(spec: &'a LabSpec, paths: &'a LabPaths) -> Self {
        Self { spec, paths }
    }
}

impl CaProvider for SpireCa<'_> {
    fn name(&self) -> &'static str {
        "spire"
    }
    fn prepare(&self) -> Result<String> {
        ca_prepare(self.paths).map(|id| format!("localauthority x509 prepare: {id}"))
    }
    fn activate(&self) -> Result<String> {
        ca_activate(self.paths).map(|id| format!("localauthority x509 activate: {id}"))
    }
    fn reissue(&self) -> Result<String> {
        let n = rotate(self.spec, self.paths, RotateTarget::All)?.len();
        Ok(format!("entry update of {n} entries (new revisions)"))
    }
    fn reissued(&self) -> Result<bool> {
        Ok(true)
    }
    fn revoke(&self) -> Result<String> {
        ca_revoke_step(self.paths).map(|id| {
            format!("localauthority x509 taint, spire-agents renewed their own SVIDs, revoke: {id}")
        })
    }
}

/// The authority IDs of every SVID the lab's agents hold, and each node's root count for the
/// lab's trust domain; a node whose agent does not answer is `None`.
pub type NodeIdentity = (String, Option<HeldIdentity>);
/// Authority IDs of the SVIDs a node's agent holds, and its root count.
pub type HeldIdentity = (Vec<String>, usize);

fn node_identities(spec: &LabSpec, paths: &LabPaths) -> Vec<NodeIdentity> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    spec.nodes
        .iter()
        .map(|n| {
            let st = rt
                .block_on(crate::admin::get_json::<crate::api::Status>(
                    &paths.admin_socket(&n.name),
                    "/v1/status",
                ))
                .ok();
            let v = st.map(|st| {
                let auths = st
                    .svids
                    .iter()
                    .map(|s| s.authority_id.clone().unwrap_or_default())
                    .collect();
                let roots = st
                    .bundles
                    .iter()
                    .find(|b| b.trust_domain == spec.trust_domain)
                    .map(|b| b.roots)
                    .unwrap_or(0);
                (auths, roots)
            });
            (n.name.clone(), v)
        })
        .collect()
}

/// `veil lab ca rotate [--revoke-old]` for either provider: prepare; wait until every veil
/// agent holds the new root in its bundle (so nothing the new authority signs is refused);
/// activate. With `revoke_old`: make the issuer re-issue everything the old authority signed
/// (SPIRE: entry update of every entry; the dev server re-issued at activate), wait until no
/// veil agent holds an SVID of the old authority, revoke the old authority (SPIRE: taint, wait
/// until every spire-agent renewed its own SVID, revoke) and wait until every agent's bundle
/// lost its root. Each wait is bounded by [`CA_WAIT`].
pub fn ca_rotate(
    spec: &LabSpec,
    paths: &LabPaths,
    ca: &dyn CaProvider,
    revoke_old: bool,
) -> Result<CaRotation> {
    let t0 = Instant::now();
    let mut report = CaRotation {
        provider: ca.name().into(),
        ..Default::default()
    };
    let step = |r: &mut CaRotation, step: &str, detail: String| {
        r.steps.push(CaRotationStep {
            step: step.into(),
            at_ms: t0.elapsed().as_millis() as u64,
            detail,
        })
    };
    let answering = |what: &str| -> Result<Vec<(String, HeldIdentity)>> {
        node_identities(spec, paths)
            .into_iter()
            .map(|(n, v)| {
                v.map(|v| (n.clone(), v)).ok_or_else(|| {
                    Error::Spire(format!(
                        "CA rotation ({what}): node {n}'s agent does not answer"
                    ))
                })
            })
            .collect()
    };
    let in_ms = |what: &str, took: Duration| format!("{what} in {} ms", took.as_millis());
    let before = answering("before")?;
    let roots_before = before.iter().map(|(_, (_, r))| *r).max().unwrap_or(1);
    let mut old: Vec<String> = before
        .iter()
        .flat_map(|(_, (a, _))| a.iter().cloned())
        .filter(|a| !a.is_empty())
        .collect();
    old.sort();
    old.dedup();
    report.old_authorities = old.clone();

    step(&mut report, "prepare", ca.prepare()?);
    let took = wait_until("every agent trusts the new root", CA_WAIT, || {
        Ok(node_identities(spec, paths)
            .iter()
            .all(|(_, v)| v.as_ref().is_some_and(|(_, r)| *r > roots_before)))
    })?;
    step(
        &mut report,
        "bundle",
        in_ms("the new root reached every agent's bundle", took),
    );
    step(&mut report, "activate", ca.activate()?);
    if !revoke_old {
        return Ok(report);
    }
    step(&mut report, "reissue", ca.reissue()?);
    let mut new = None;
    let took = wait_until(
        "no agent holds an SVID of the old authority",
        CA_WAIT,
        || {
            let ids = node_identities(spec, paths);
            let done = ids.iter().all(|(_, v)| {
                v.as_ref()
                    .is_some_and(|(a, _)| a.iter().all(|x| !x.is_empty() && !old.contains(x)))
            });
            if done {
                new = ids
                    .iter()
                    .find_map(|(_, v)| v.as_ref().and_then(|(a, _)| a.first().cloned()));
            }
            Ok(done && ca.reissued()?)
        },
    )?;
    report.new_authority = new;
    step(
        &mut report,
        "reissued",
        in_ms("every SVID re-issued by the new authority", took),
    );
    step(&mut report, "revoke", ca.revoke()?);
    let took = wait_until("every agent dropped the old root", CA_WAIT, || {
        Ok(node_identities(spec, paths)
            .iter()
            .all(|(_, v)| v.as_ref().is_some_and(|(_, r)| *r <= roots_before)))
    })?;
    step(
        &mut report,
        "bundle",
        in_ms("the old root left every agent's bundle", took),
    );
    Ok(report)
}
