//! veil's SPIRE client — the `IdentityClient` the agent runs — against the real SPIRE:
//! spire-server and spire-agent v1.13.3 as `scripts/setup.sh` builds them.
//!
//! One spire-server (sqlite, join-token node attestation, X.509-SVID TTL 20 s) and one
//! spire-agent for node `node-a`, attested with a join token, with the `unix` workload
//! attestor, its admin socket (Delegated Identity API) and veil's node agent ID
//! `spiffe://lab.veil/veil/node/node-a` as its only authorized delegate. This test process is
//! veil's node agent: an entry `unix:uid:<our uid>` gives it that ID over the Workload API,
//! which is also how spire-agent authorizes it on the admin socket. A pod entry with the
//! selectors a Kubernetes deployment uses (`k8s:ns:shop`, `k8s:sa:frontend`) is fetched through
//! the Delegated Identity API by the pod's selectors, as the agent asks for it.
//!
//! The binaries are found in `$VEIL_TOOLS_BIN`, else `$VEIL_CACHE_DIR/bin`, else
//! `~/.cache/veil/bin`; without them the test fails (run `scripts/setup.sh`), it never skips.
//! Everything it starts is killed, and its directory removed, when it ends, also on panic (then
//! the tails of the SPIRE logs are printed).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject;
mod common;

use common::{init_tracing, run_client, wait_until};
use tokio::sync::watch;
use veil_identity::{
    validate_x509_svid, CertificateDer, IdentitySnapshot, SelectorSet, SpiffeId, Svid, SvidSource,
    TrustDomain,
};
use veil_spire::{
    cli,
    conf::{AgentConf, ServerConf, ServerKeys},
    ClientConfig, IdentityClientHandle,
};

const TRUST_DOMAIN: &str = "lab.veil";
const NODE: &str = "node-a";
/// The X.509-SVID TTL of every entry (server default). SPIRE backdates `notBefore` by 10 s and
/// its agent renews at half the lifetime, so a new SVID is due about 5 s after issue.
const SVID_TTL: Duration = Duration::from_secs(20);
/// How often the server reloads its entry cache and the agent syncs with the server: together
/// they bound how long a deleted entry's SVID is still handed out (5 s + 4 s ± 10 % jitter).
const SERVER_CACHE_RELOAD: Duration = Duration::from_secs(5);
const AGENT_SYNC: Duration = Duration::from_secs(4);

fn td() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).unwrap()
}

/// veil's node agent ID (the agent's `auth::node_spiffe_id`: `/veil/node/<node>`).
fn node_agent_id() -> SpiffeId {
    SpiffeId::from_segments(&td(), &["veil", "node", NODE]).unwrap()
}

/// The node alias the join token names: the parent of every entry of this node. (SPIRE
/// reserves `/spire/...` for itself.)
fn node_alias() -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/{NODE}")
}

fn frontend_id() -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend")).unwrap()
}

/// What the agent asks the Delegated Identity API for the frontend pod.
fn frontend_selectors() -> SelectorSet {
    SelectorSet::k8s_pod("shop", "frontend", "frontend").unwrap()
}

/// A SPIRE binary from the machine's tool cache; a missing one fails the test.
fn tool(name: &str) -> PathBuf {
    let dir = match (
        std::env::var_os("VEIL_TOOLS_BIN"),
        std::env::var_os("VEIL_CACHE_DIR"),
    ) {
        (Some(bin), _) => PathBuf::from(bin),
        (None, Some(cache)) => PathBuf::from(cache).join("bin"),
        (None, None) => {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/veil/bin")
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run scripts/setup.sh (it builds SPIRE v1.13.3 into \
         ~/.cache/veil/bin; VEIL_TOOLS_BIN or VEIL_CACHE_DIR move that place)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 for the server (released just before the server binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Copy)]
enum Which {
    Server,
    Agent,
}

/// A running spire-server and (once started) spire-agent in their own directory. Drop kills
/// both and removes the directory.
struct Spire {
    dir: PathBuf,
    server_bin: PathBuf,
    agent_bin: PathBuf,
    port: u16,
    server: Option<Child>,
    agent: Option<Child>,
}

impl Spire {
    async fn start_server() -> Spire {
        static N: AtomicU32 = AtomicU32::new(0);
        let (server_bin, agent_bin) = (tool("spire-server"), tool("spire-agent"));
        let dir = std::env::temp_dir().join(format!(
            "veil-real-spire-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["server/data", "agent/data", "agent/public", "agent/admin"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut spire = Spire {
            dir,
            server_bin,
            agent_bin,
            port: free_port(),
            server: None,
            agent: None,
        };
        let conf = spire.dir.join("server.conf");
        std::fs::write(&conf, spire.server_conf()).unwrap();
        spire.server = Some(spawn(
            &spire.server_bin,
            &["run", "-config", conf.to_str().unwrap()],
            &spire.dir.join("server.log"),
        ));
        let socket = spire.server_socket();
        spire.wait_healthy(Which::Server, &socket).await;
        spire
    }

    fn server_socket(&self) -> PathBuf {
        self.dir.join("server/api.sock")
    }
    fn workload_socket(&self) -> PathBuf {
        self.dir.join("agent/public/api.sock")
    }
    fn admin_socket(&self) -> PathBuf {
        self.dir.join("agent/admin/admin.sock")
    }

    fn server_conf(&self) -> String {
        ServerConf {
            bind_address: "127.0.0.1",
            bind_port: self.port,
            socket_path: &self.server_socket(),
            trust_domain: TRUST_DOMAIN,
            data_dir: &self.dir.join("server/data"),
            log_level: "DEBUG",
            ca_ttl: Duration::from_secs(600),
            x509_svid_ttl: SVID_TTL,
            jwt_svid_ttl: Duration::from_secs(60),
            agent_ttl: Duration::from_secs(60),
            cache_reload_interval: SERVER_CACHE_RELOAD,
            keys: ServerKeys::Memory,
        }
        .render()
    }

    fn agent_conf(&self) -> String {
        AgentConf {
            data_dir: &self.dir.join("agent/data"),
            log_level: "DEBUG",
            server_address: "127.0.0.1",
            server_port: self.port,
            socket_path: &self.workload_socket(),
            admin_socket_path: &self.admin_socket(),
            trust_bundle_path: &self.dir.join("bundle.pem"),
            trust_domain: TRUST_DOMAIN,
            join_token: None,
            delegate: &node_agent_id().to_string(),
            sync_interval: AGENT_SYNC,
        }
        .render()
    }

    /// `spire-server <args> -socketPath <server socket>`; its stdout, or a panic with its output.
    async fn server_cli<S: AsRef<str>>(&self, args: &[S]) -> String {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let out = tokio::process::Command::new(&self.server_bin)
            .args(&args)
            .arg("-socketPath")
            .arg(self.server_socket())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "spire-server {args:?} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Creates an entry under this node's alias; returns its entry ID.
    async fn create_entry(&self, spiffe_id: &str, selectors: &[&str]) -> String {
        let args = cli::entry_create_args(&node_alias(), spiffe_id, selectors, None);
        let out = self.server_cli(&args).await;
        field(&out, "Entry ID")
    }

    /// Attests a spire-agent for `NODE` with a fresh join token and waits until it is healthy.
    async fn start_agent(&mut self) {
        let out = self
            .server_cli(&["token", "generate", "-spiffeID", &node_alias()])
            .await;
        let token = field(&out, "Token");
        let bundle = self.server_cli(&["bundle", "show"]).await;
        std::fs::write(self.dir.join("bundle.pem"), bundle).unwrap();
        let conf = self.dir.join("agent.conf");
        std::fs::write(&conf, self.agent_conf()).unwrap();
        self.agent = Some(spawn(
            &self.agent_bin,
            &[
                "run",
                "-config",
                conf.to_str().unwrap(),
                "-joinToken",
                &token,
            ],
            &self.dir.join("agent.log"),
        ));
        let socket = self.workload_socket();
        self.wait_healthy(Which::Agent, &socket).await;
    }

    /// Polls `<bin> healthcheck -socketPath <socket>` until it succeeds; fails if the process
    /// exits or after 60 s.
    async fn wait_healthy(&mut self, which: Which, socket: &Path) {
        let (what, bin, child) = match which {
            Which::Server => ("spire-server", &self.server_bin, &mut self.server),
            Which::Agent => ("spire-agent", &self.agent_bin, &mut self.agent),
        };
        let child = child.as_mut().expect("started");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{what} exited during start-up: {status}");
            }
            let ok = tokio::process::Command::new(bin)
                .arg("healthcheck")
                .arg("-socketPath")
                .arg(socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .unwrap()
                .success();
            if ok {
                eprintln!(
                    "{what} healthy after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what} not healthy after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's trust bundle (`bundle show`), DER.
    async fn server_bundle(&self) -> Vec<CertificateDer<'static>> {
        let pem = self.server_cli(&["bundle", "show"]).await;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        for child in [self.agent.take(), self.server.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for log in ["server.log", "agent.log"] {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("---- last lines of {log} ----\n{}", tail.join("\n"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a long-running SPIRE process with its output in `log`. It gets SIGKILL if this test
/// process dies without running `Drop` (a nextest timeout, say).
fn spawn(bin: &Path, args: &[&str], log: &Path) -> Child {
    let out = File::create(log).unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: the closure runs in the forked child before exec and only makes one syscall
    // (prctl), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

/// The value of a `Name: value` / `Name   : value` line of spire-server's text output.
fn field(out: &str, name: &str) -> String {
    cli::fields(out, name)
        .next()
        .unwrap_or_else(|| panic!("no {name:?} in spire-server output: {out}"))
}

/// The client the agent runs (`IdentityClient::new`, then `run`), on the spire-agent's two
/// sockets, with quicker reconnects than the default; runs until the returned sender is dropped.
fn start_client(workload: &Path, admin: &Path) -> (IdentityClientHandle, watch::Sender<bool>) {
    run_client(
        ClientConfig::spire_agent(workload, admin),
        Duration::from_millis(500),
    )
}

fn frontend_svid(s: &IdentitySnapshot) -> Option<&Svid> {
    s.workloads
        .get(&frontend_selectors())
        .and_then(|v| v.first())
        .map(|a| &**a)
}

/// Waits (30 s at most) until frontend's SVID is in `client`'s snapshot (`is_present`) or gone.
async fn wait_frontend(
    client: &IdentityClientHandle,
    is_present: bool,
    what: &str,
) -> IdentitySnapshot {
    wait_until(client, Duration::from_secs(30), what, |s| {
        frontend_svid(s).is_some() == is_present
    })
    .await
}

/// veil's own validation of `svid` against the snapshot's bundles, now; returns the serial.
fn validate(svid: &Svid, s: &IdentitySnapshot, id: &SpiffeId) -> String {
    let v =
        validate_x509_svid(svid.cert_chain(), &s.bundles, SystemTime::now()).unwrap_or_else(|e| {
            panic!(
                "SVID {} from SPIRE does not validate: {e}",
                svid.spiffe_id()
            )
        });
    assert_eq!(&v.spiffe_id, id);
    assert_eq!(v.serial, svid.serial());
    v.serial
}

fn lifetime(svid: &Svid) -> Duration {
    svid.not_after().duration_since(svid.not_before()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_pod_svids_rotate_and_a_deleted_entry_withdraws_the_pod_svid() {
    init_tracing();
    let mut spire = Spire::start_server().await;

    // The node agent's entry (this process, by its uid) and the pod's, before the agent
    // starts, so its first sync brings both.
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    spire
        .create_entry(node_agent_id().as_str(), &[&format!("unix:uid:{uid}")])
        .await;
    let frontend_entry = spire
        .create_entry(frontend_id().as_str(), &["k8s:ns:shop", "k8s:sa:frontend"])
        .await;
    spire.start_agent().await;

    let (client, _stop) = start_client(&spire.workload_socket(), &spire.admin_socket());
    client.watch_workload(frontend_selectors());

    // (a) The node SVID and the bundle through the Workload API; the bundle is the server's.
    let start = Instant::now();
    let snap = wait_until(&client, Duration::from_secs(30), "node svid", |s| {
        s.node.is_some()
    })
    .await;
    let node = snap.node.clone().unwrap();
    validate(&node, &snap, &node_agent_id());
    let roots = snap.bundles.get(&td()).expect("bundle of lab.veil");
    for ca in spire.server_bundle().await {
        assert!(
            roots.contains(&ca),
            "server CA missing from the client's bundle"
        );
    }
    eprintln!(
        "node svid {} serial {} after {:.1} s",
        node.spiffe_id(),
        node.serial(),
        start.elapsed().as_secs_f64()
    );

    // (b) The pod's SVID through the Delegated Identity API by the pod's selectors (a superset
    // of the entry's), validated by veil against the bundle.
    let snap = wait_frontend(&client, true, "frontend svid").await;
    let first = frontend_svid(&snap).unwrap().clone();
    let first_serial = validate(&first, &snap, &frontend_id());
    assert_eq!(snap.workloads[&frontend_selectors()].len(), 1);
    // 20 s TTL plus SPIRE's 10 s backdating.
    assert_eq!(lifetime(&first), Duration::from_secs(30));
    let first_seen = Instant::now();
    eprintln!(
        "frontend svid serial {first_serial} after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // The Delegated Identity API's bundle stream alone is enough: a client with no Workload
    // API (socket absent) still validates and publishes the pod's SVID.
    let absent = spire.dir.join("agent/public/absent.sock");
    let (delegated_only, _stop2) = start_client(&absent, &spire.admin_socket());
    delegated_only.watch_workload(frontend_selectors());
    let snap2 = wait_frontend(
        &delegated_only,
        true,
        "frontend svid with delegated bundles only",
    )
    .await;
    assert!(snap2.node.is_none());
    validate(frontend_svid(&snap2).unwrap(), &snap2, &frontend_id());

    // (c) Rotation: SPIRE's agent renews at half the lifetime; the same subscription
    // delivers the new SVID.
    let snap = wait_until(
        &client,
        Duration::from_secs(45),
        "frontend svid rotated (new serial)",
        |s| frontend_svid(s).is_some_and(|v| v.serial() != first_serial),
    )
    .await;
    let rotated = frontend_svid(&snap).unwrap().clone();
    validate(&rotated, &snap, &frontend_id());
    assert!(rotated.not_after() > first.not_after());
    eprintln!(
        "frontend svid rotated {} -> {} after {:.1} s (first not_before + {:.1} s)",
        first_serial,
        rotated.serial(),
        first_seen.elapsed().as_secs_f64(),
        rotated
            .not_before()
            .duration_since(first.not_before())
            .unwrap()
            .as_secs_f64()
    );
    // The node SVID rotates the same way, through the Workload API stream.
    let snap = wait_until(&client, Duration::from_secs(45), "node svid rotated", |s| {
        s.node.as_ref().is_some_and(|n| n.serial() != node.serial())
    })
    .await;
    validate(snap.node.as_ref().unwrap(), &snap, &node_agent_id());

    // (d) Withdrawal: deleting the entry makes the agent send an empty list on the open
    // subscription; the pod's SVID leaves the snapshot at once, the node's stays.
    spire
        .server_cli(&["entry", "delete", "-entryID", &frontend_entry])
        .await;
    let deleted = Instant::now();
    let snap = wait_frontend(&client, false, "frontend svid withdrawn after entry delete").await;
    let withdrawn_after = deleted.elapsed();
    assert!(snap.node.is_some());
    assert!(snap.workload_svid(&frontend_id()).is_none());
    wait_frontend(
        &delegated_only,
        false,
        "frontend svid withdrawn (second client)",
    )
    .await;
    eprintln!(
        "frontend svid withdrawn {:.1} s after `entry delete` (bound: server cache reload \
         {SERVER_CACHE_RELOAD:?} + agent sync {AGENT_SYNC:?})",
        withdrawn_after.as_secs_f64()
    );

    // The subscription survives the withdrawal: registering the pod again brings a new SVID.
    spire
        .create_entry(frontend_id().as_str(), &["k8s:ns:shop", "k8s:sa:frontend"])
        .await;
    let created = Instant::now();
    let snap = wait_frontend(&client, true, "frontend svid back after re-registration").await;
    let back = frontend_svid(&snap).unwrap();
    validate(back, &snap, &frontend_id());
    assert_ne!(back.serial(), rotated.serial());
    eprintln!(
        "frontend svid back {:.1} s after `entry create`",
        created.elapsed().as_secs_f64()
    );
}
