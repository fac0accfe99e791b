//! daemon: the node agent. Loads the datapath, follows cluster state, keeps programs attached and
//! maps in sync, and serves the admin API.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::{Method, StatusCode};
use tokio::sync::watch;
use tracing::Instrument as _;
use veil_common::{
    config_flags,
    maps::{self as map_names, ip_flags, node_flags, DatapathConfig, IpInfo, NodeInfo},
    programs,
};
use veil_identity::{SelectorSet, SvidKey, SvidSource as _};
use veil_spire::{ClientConfig, IdentityClient, IdentityClientHandle};

use aya::maps::RingBuf;
use veil_common::maps::FlowEvent;

use veil_common::maps::{PolicyEntry, PolicyKey};

use crate::{
    admin::{self, AdminRequest, AdminResponse, BoxFuture},
    api,
    cluster::{self, ClusterSource, ClusterState},
    config::Config,
    datapath::policy as dp_policy,
    datapath::{
        self,
        maps::{sync, IpCacheMap, KernelHash, Prefix},
        Datapath, Hook,
    },
    flows::FlowStore,
    mesh::{Mesh, MeshConfig, MeshStatus, PeerKeys},
    tunnel::NodeTunnel,
};

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::Error),
    #[error("cannot publish the node key")]
    Publish(#[source] cluster::Error),
    #[error("identity client")]
    Spire(#[source] veil_spire::Error),
    #[error("cluster trust domain {0:?} is not a SPIFFE trust domain")]
    TrustDomain(String),
    #[error("node {0:?} is not in the cluster state")]
    UnknownNode(String),
    #[error("cannot prepare state dir {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the admin API and the reconcile loop share.
struct Shared {
    cfg: Config,
    /// Where cluster state comes from and this node's key is published.
    source: Arc<dyn ClusterSource>,
    datapath: Datapath,
    cluster: Arc<ClusterState>,
    tunnel: Option<NodeTunnel>,
    ready: bool,
    started_unix: u64,
    restarts: u64,
    last_error: Option<String>,
    /// SVIDs of this node and its pods, as the SPIRE clients deliver them.
    identities: Option<IdentityClientHandle>,
    /// Pods whose SVIDs are subscribed (Delegated Identity API selectors).
    watched: BTreeSet<SelectorSet>,
    /// What the installed policy was compiled from: (policy generation, identity table, local
    /// identities). Recompiled only when it changes.
    policy_input: Option<(u64, Vec<crate::cluster::Identity>, Vec<u32>)>,
    policy: api::PolicyStatus,
    /// Node-wide audit mode: would-be policy drops pass and are reported as AUDIT.
    audit: bool,
    /// Peer keys from authenticated node handshakes (mutual auth); None: keys from the cluster
    /// state (mutual auth off).
    mesh_keys: Option<watch::Receiver<BTreeMap<String, PeerKeys>>>,
    mesh_status: Option<Arc<Mutex<MeshStatus>>>,
    /// With mutual auth: where node handshakes read the node's public key, and how to make
    /// them re-run (static key rotation).
    key_rotation: Option<(
        Arc<arc_swap::ArcSwap<veil_transport::PublicKey>>,
        tokio::sync::mpsc::Sender<()>,
    )>,
    /// The compiled policy in force, for the mesh's pre-authentication.
    policy_tx: watch::Sender<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
    hold_stats: crate::hold::SharedStats,
}

pub struct Agent {
    shared: Arc<Mutex<Shared>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
    identity_client: Option<IdentityClient>,
    flows: Arc<Mutex<FlowStore>>,
    events: Option<RingBuf<aya::maps::MapData>>,
    mesh: Option<Mesh>,
    policy_rx: watch::Receiver<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
    hold: Option<HoldParts>,
}

/// The hold device and the mesh handles its loop needs.
type HoldParts = (
    tun_rs::SyncDevice,
    tokio::sync::mpsc::Sender<crate::auth::AuthTriple>,
    watch::Receiver<BTreeSet<crate::auth::AuthTriple>>,
);

/// The hold device's name inside the node's network namespace.
pub const HOLD_DEVICE: &str = "veil-hold";

impl Agent {
    pub async fn new(cfg: Config) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| Error::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let restarts = bump_start_count(&cfg.state_dir);
        let source = cluster::open(&cfg.source);
        let cluster_rx = source.watch().await?;
        let cluster = cluster_rx.borrow().clone();
        let me = cluster
            .node(&cfg.node)
            .ok_or_else(|| Error::UnknownNode(cfg.node.clone()))?;
        let mut flags = 0;
        if cfg.encryption {
            flags |= config_flags::ENCRYPT;
        }
        if cfg.strict {
            flags |= config_flags::STRICT;
        }
        let tunnel = if cfg.encryption {
            let key = crate::tunnel::load_or_create_key(&cfg.state_dir)?;
            let t = NodeTunnel::open(&cfg, key)?;
            source
                .publish_node_key(&cfg.node, &t.public_key().to_base64(), None)
                .map_err(Error::Publish)?;
            tracing::info!(
                backend = t.backend().as_str(),
                interface = t.interface(),
                public_key = %t.public_key(),
                "tunnel ready"
            );
            Some(t)
        } else {
            tracing::warn!(
                "encryption is OFF: pod traffic to other nodes crosses the underlay in clear"
            );
            None
        };
        let tunnel_ifindex = tunnel
            .as_ref()
            .and_then(|t| nix::net::if_::if_nametoindex(t.interface()).ok())
            .unwrap_or(0);
        let dp_cfg = DatapathConfig {
            flags,
            tunnel_ifindex,
            node_id: me.id,
            policy_slot: 0,
            hold_ifindex: 0,
            _pad: 0,
        };
        let datapath = Datapath::open(&cfg.bpffs, &cfg.pin_dir, dp_cfg)?;
        tracing::info!(
            node = %cfg.node, pin_dir = %cfg.pin_dir.display(), restarts,
            "datapath loaded (maps pinned, {} earlier start(s) re-adopted)", restarts
        );
        let (identity_client, identities) = match &cfg.spire_socket {
            Some(socket) => {
                let client_cfg = match &cfg.spire_admin_socket {
                    Some(admin) => {
                        tracing::info!(workload = %socket.display(), admin = %admin.display(), "identities from a spire-agent (Workload API + Delegated Identity API on its admin socket)");
                        ClientConfig::spire_agent(socket, admin)
                    }
                    None => {
                        tracing::info!(socket = %socket.display(), "identities from SPIRE (Workload + Delegated Identity API)");
                        ClientConfig::new(socket)
                    }
                };
                let (client, handle) = IdentityClient::new(client_cfg).map_err(Error::Spire)?;
                (Some(client), Some(handle))
            }
            None => {
                tracing::warn!("no SPIRE socket configured: no identities, mutual auth impossible");
                (None, None)
            }
        };
        let started_unix = unix_now();
        let mut datapath = datapath;
        // The agent owns the ring buffer reader; a restarted agent reopens the pinned map and
        // picks up where the kernel left off.
        let events = datapath
            .ebpf_mut()
            .take_map(map_names::EVENTS)
            .map(RingBuf::try_from)
            .transpose()
            .map_err(|source| datapath::Error::Map {
                name: map_names::EVENTS,
                source,
            })?;
        let flows = Arc::new(Mutex::new(FlowStore::open(
            Some(cfg.state_dir.join("flows.jsonl")),
            FlowStore::DEFAULT_CAPACITY,
            FlowStore::DEFAULT_LOG_BYTES,
        )));
        let audit = datapath.config_map()?.get()?.flags & config_flags::AUDIT != 0;
        let (policy_tx, policy_rx) = watch::channel(Arc::new(BTreeMap::new()));
        let me = cluster
            .node(&cfg.node)
            .ok_or_else(|| Error::UnknownNode(cfg.node.clone()))?
            .clone();
        let (mesh, mesh_keys, mesh_status, hold, key_rotation) = match (&tunnel, &identities) {
            (Some(t), Some(_)) if cfg.mutual_auth => {
                let map = datapath
                    .ebpf_mut()
                    .take_map(map_names::AUTH)
                    .ok_or(datapath::Error::MissingMap(map_names::AUTH))?;
                let auth_map =
                    aya::maps::HashMap::try_from(map).map_err(|source| datapath::Error::Map {
                        name: map_names::AUTH,
                        source,
                    })?;
                let td = veil_identity::TrustDomain::new(&cluster.trust_domain)
                    .map_err(|_| Error::TrustDomain(cluster.trust_domain.clone()))?;
                let mcfg = MeshConfig {
                    node: cfg.node.clone(),
                    node_id: me.id,
                    trust_domain: td,
                    underlay_ip: std::net::IpAddr::V4(me.underlay_ip),
                    port: cfg.control_port,
                    allow_classical: cfg.allow_classical_kx,
                    rekey_interval: cfg.psk_rotation,
                };
                let (mesh, handles) = Mesh::new(mcfg, auth_map, t.public_key());
                tracing::info!(
                    port = cfg.control_port,
                    "mutual auth on: tunnel keys come only from authenticated node handshakes"
                );
                // The hold device: flows missing auth wait here instead of being dropped.
                let hold = match tun_rs::DeviceBuilder::new()
                    .name(HOLD_DEVICE)
                    .mtu(cfg.mtu)
                    .enable(true)
                    .build_sync()
                {
                    Ok(dev) => {
                        let ifindex = nix::net::if_::if_nametoindex(HOLD_DEVICE).unwrap_or(0);
                        let mut cm = datapath.config_map()?;
                        let mut c = cm.get()?;
                        c.hold_ifindex = ifindex;
                        cm.set(c)?;
                        Some((dev, handles.requests.clone(), handles.authenticated.clone()))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no hold device: a flow missing auth is dropped until its pair authenticates");
                        None
                    }
                };
                (
                    Some(mesh),
                    Some(handles.keys),
                    Some(handles.status),
                    hold,
                    Some((handles.wg_key, handles.rehandshake)),
                )
            }
            _ => {
                if cfg.mutual_auth && cfg.encryption {
                    tracing::warn!("mutual auth needs identities (spire_socket): tunnel keys come from cluster state");
                }
                (None, None, None, None, None)
            }
        };
        if let Some(ms) = &mesh_status {
            flows
                .lock()
                .expect("flow store lock")
                .set_annotator(auth_error_annotator(ms.clone(), cluster_rx.clone()));
        }
        let shared = Shared {
            source,
            cfg,
            datapath,
            cluster,
            tunnel,
            identities,
            watched: BTreeSet::new(),
            ready: false,
            started_unix,
            restarts,
            last_error: None,
            policy_input: None,
            policy: api::PolicyStatus::default(),
            audit,
            mesh_keys,
            mesh_status,
            key_rotation,
            policy_tx,
            hold_stats: Default::default(),
        };
        Ok(Self {
            shared: Arc::new(Mutex::new(shared)),
            cluster_rx,
            identity_client,
            flows,
            events,
            mesh,
            policy_rx,
            hold,
        })
    }

    /// Runs until `shutdown` resolves. Leaves programs attached and maps pinned.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let socket = self
            .shared
            .lock()
            .expect("agent state lock")
            .cfg
            .admin_socket
            .clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let handler: Arc<dyn admin::Handler> = Arc::new(AdminHandler {
            shared: self.shared.clone(),
            flows: self.flows.clone(),
        });
        if let Some(events) = self.events {
            let mut stop_events = stop_rx.clone();
            let (shared, flows, cluster_rx) = (
                self.shared.clone(),
                self.flows.clone(),
                self.cluster_rx.clone(),
            );
            tokio::spawn(
                async move {
                    tokio::select! {
                        _ = stop_events.wait_for(|s| *s) => {}
                        r = read_events(events, shared, flows, cluster_rx) => {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "flow event reader stopped");
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("flows")),
            );
        }
        let mut stop_admin = stop_rx.clone();
        let admin_task = tokio::spawn(async move {
            admin::serve(&socket, handler, async move {
                let _ = stop_admin.wait_for(|s| *s).await;
            })
            .await
        });

        if let Some(client) = self.identity_client {
            let mut stop_ids = stop_rx.clone();
            tokio::spawn(
                client
                    .run(async move {
                        let _ = stop_ids.wait_for(|s| *s).await;
                    })
                    .instrument(tracing::info_span!("identity")),
            );
        }
        if let Some(mesh) = self.mesh {
            let ids = self
                .shared
                .lock()
                .expect("agent state lock")
                .identities
                .clone();
            if let Some(ids) = ids {
                let mut stop_mesh = stop_rx.clone();
                let (crx, prx) = (self.cluster_rx.clone(), self.policy_rx.clone());
                tokio::spawn(
                    mesh.run(crx, ids.subscribe(), prx, async move {
                        let _ = stop_mesh.wait_for(|s| *s).await;
                    })
                    .instrument(tracing::info_span!("mesh")),
                );
            }
        }
        if let Some((dev, requests, authenticated)) = self.hold {
            let (crx, flows) = (self.cluster_rx.clone(), self.flows.clone());
            let (me, stats) = {
                let s = self.shared.lock().expect("agent state lock");
                (s.cfg.node.clone(), s.hold_stats.clone())
            };
            let mut stop_hold = stop_rx.clone();
            tokio::spawn(
                async move {
                    let cfg = crate::hold::HoldConfig::default();
                    tokio::select! {
                        _ = stop_hold.wait_for(|s| *s) => {}
                        r = crate::hold::run(dev, cfg, crx, me, requests, authenticated, flows, stats) => {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "hold device loop stopped");
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("hold")),
            );
        }
        let mut mesh_keys = self
            .shared
            .lock()
            .expect("agent state lock")
            .mesh_keys
            .clone();
        let shared = self.shared.clone();
        let mut cluster_rx = self.cluster_rx;
        let mut stop_loop = stop_rx.clone();
        let key_period = shared.lock().expect("agent state lock").cfg.key_rotation;
        let reconcile_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut key_tick =
                tokio::time::interval_at(tokio::time::Instant::now() + key_period, key_period);
            key_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending_key: Option<PendingKey> = None;
            // veil-wg's process, watched through a pidfd: its exit wakes the loop at once (the
            // reconcile restarts it) instead of at the next 5 s tick.
            let mut watched: Option<(i32, tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>)> = None;
            loop {
                {
                    let state = cluster_rx.borrow_and_update().clone();
                    let mut s = shared.lock().expect("agent state lock");
                    s.cluster = state;
                    match reconcile(&mut s) {
                        Ok(()) => {
                            if !s.ready {
                                tracing::info!("agent ready");
                            }
                            s.ready = true;
                            s.last_error = None;
                        }
                        Err(e) => {
                            let msg = crate::error_chain(&e);
                            tracing::warn!(error = %msg, "reconcile failed; retrying");
                            s.last_error = Some(msg);
                        }
                    }
                }
                let pid = shared
                    .lock()
                    .expect("agent state lock")
                    .tunnel
                    .as_ref()
                    .and_then(|t| t.device_pid());
                if watched.as_ref().map(|(p, _)| *p) != pid {
                    watched = pid.and_then(|p| Some((p, watch_exit(p)?)));
                }
                let commit_at = pending_key.as_ref().map(|(at, _)| *at);
                tokio::select! {
                    // veil-wg exited: reconcile now (`ensure_device` restarts it, counted).
                    _ = async {
                        match watched.as_ref() {
                            Some((_, fd)) => { let _ = fd.readable().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {
                        tracing::warn!(pid = ?watched.as_ref().map(|(p, _)| *p), "veil-wg exited");
                        watched = None;
                    }
                    _ = stop_loop.wait_for(|s| *s) => return,
                    r = cluster_rx.changed() => if r.is_err() { return },
                    // Peer keys from a (re-)authenticated node pair go on the tunnel at once.
                    Ok(()) = async {
                        match mesh_keys.as_mut() {
                            Some(rx) => rx.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = tick.tick() => {}
                    _ = key_tick.tick() => {
                        let mut s = shared.lock().expect("agent state lock");
                        pending_key = rotate_node_key(&mut s);
                    }
                    // The new key was published a lead ago: every peer has read it by now, so
                    // its node handshake claiming that key is admitted (`unpublished-wg-key`).
                    _ = tokio::time::sleep_until(commit_at.unwrap_or_else(tokio::time::Instant::now)), if commit_at.is_some() => {
                        if let Some((_, key)) = pending_key.take() {
                            let mut s = shared.lock().expect("agent state lock");
                            commit_node_key(&mut s, key);
                        }
                    }
                }
            }
        });

        shutdown.await;
        tracing::info!("shutting down (programs stay attached, maps stay pinned)");
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), reconcile_task).await;
        match tokio::time::timeout(Duration::from_secs(5), admin_task).await {
            Ok(Ok(r)) => r?,
            _ => tracing::warn!("admin server did not stop within 5s"),
        }
        Ok(())
    }
}

/// Static key rotation: a new node key on the device, announced to every peer by re-running
/// the node handshakes (each peer swaps the old key for the new one with a fresh PSK). Without
/// mutual auth the key is published to the cluster state instead.
/// A pidfd for `pid` registered with the runtime: readable once the process exits. `None` if
/// the kernel has no pidfd_open (before 5.3) or the process is already gone.
fn watch_exit(pid: i32) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just returned to us and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns `fd` (an OwnedFd: valid, open, the same descriptor for its
    // whole life) and nothing else closes it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}

/// With mutual auth, a node key is published this long before the node uses it: a peer
/// admits a node handshake only for the key the node published (§9.6a), and cluster state
/// reaches every agent well within it (the lab source polls every 250 ms).
const KEY_PUBLICATION_LEAD: Duration = Duration::from_secs(1);

/// A rotated key waiting for its publication lead: when to put it on the device, and the key.
type PendingKey = (tokio::time::Instant, veil_transport::PrivateKey);

/// Starts a static key rotation. With mutual auth: publishes the new public key and returns
/// it for [`commit_node_key`] after [`KEY_PUBLICATION_LEAD`]. Without: rotates at once.
fn rotate_node_key(s: &mut Shared) -> Option<PendingKey> {
    if s.key_rotation.is_some() {
        let key = veil_transport::PrivateKey::generate();
        let current = s.tunnel.as_ref()?.public_key().to_base64();
        let next = key.public_key().to_base64();
        if let Err(e) = s
            .source
            .publish_node_key(&s.cfg.node, &current, Some(&next))
        {
            tracing::warn!(error = %e, "cannot publish the next node key; keeping the current key");
            return None;
        }
        tracing::info!(public_key = %key.public_key(), "next node WireGuard key published");
        return Some((tokio::time::Instant::now() + KEY_PUBLICATION_LEAD, key));
    }
    let state_dir = s.cfg.state_dir.clone();
    let t = s.tunnel.as_mut()?;
    let started = std::time::Instant::now();
    let public = match t.rotate_key(&state_dir) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "node key rotation failed; keeping the current key");
            return None;
        }
    };
    if let Err(e) = s
        .source
        .publish_node_key(&s.cfg.node, &public.to_base64(), None)
    {
        tracing::warn!(error = %e, "cannot publish the rotated node key");
    }
    tracing::info!(public_key = %public, took_us = started.elapsed().as_micros() as u64, "node WireGuard key rotated");
    None
}

/// Puts a published key on the device and re-runs the node handshakes with it.
fn commit_node_key(s: &mut Shared, key: veil_transport::PrivateKey) {
    let state_dir = s.cfg.state_dir.clone();
    let Some(t) = s.tunnel.as_mut() else {
        return;
    };
    let started = std::time::Instant::now();
    let public = match t.rotate_key_to(&state_dir, key) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "node key rotation failed; keeping the current key");
            // Publish the key in use again, so peers keep admitting its handshakes.
            let current = t.public_key();
            let _ = s
                .source
                .publish_node_key(&s.cfg.node, &current.to_base64(), None);
            return;
        }
    };
    // The next key is the current one now (a peer that has not read this yet still admits it
    // as the published next key).
    if let Err(e) = s
        .source
        .publish_node_key(&s.cfg.node, &public.to_base64(), None)
    {
        tracing::warn!(error = %e, "cannot publish the rotated node key");
    }
    if let Some((wg_key, rehandshake)) = &s.key_rotation {
        wg_key.store(Arc::new(public));
        let _ = rehandshake.try_send(());
    }
    tracing::info!(public_key = %public, took_us = started.elapsed().as_micros() as u64, "node WireGuard key rotated");
}

/// Counts agent starts on this node's state (0 on the first), persisted in the state dir.
fn bump_start_count(state_dir: &std::path::Path) -> u64 {
    let path = state_dir.join("starts");
    let n: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write(&path, (n + 1).to_string());
    n
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Errors of one reconcile pass (retried on the next).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::Error),
}

/// Brings the node in line with the cluster state: tunnel peers and routes, programs on every
/// local pod veth and on the tunnel device, the ipcache and node table exactly as the state says.
fn reconcile(s: &mut Shared) -> Result<(), ReconcileError> {
    let cluster = s.cluster.clone();
    let me = s.cfg.node.clone();
    let mut first_error: Option<ReconcileError> = None;
    // Peers first: a node only gets HAS_KEY (and so traffic) once its peer is on the device.
    let auth_keys = s.mesh_keys.as_ref().map(|rx| rx.borrow().clone());
    let with_key = match s
        .tunnel
        .as_mut()
        .map(|t| t.reconcile(&cluster, &me, auth_keys.as_ref()))
    {
        Some(Ok(nodes)) => nodes,
        Some(Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "tunnel reconcile failed");
            first_error.get_or_insert(e.into());
            Default::default()
        }
        None => Default::default(),
    };
    if let Some(t) = &s.tunnel {
        let ifname = t.interface().to_string();
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).unwrap_or(0);
        let mut cm = s.datapath.config_map()?;
        let mut c = cm.get()?;
        if c.tunnel_ifindex != ifindex {
            c.tunnel_ifindex = ifindex;
            cm.set(c)?;
        }
        let hold = (c.hold_ifindex != 0).then_some(HOLD_DEVICE);
        // Tunnel ingress (decrypted packets), tunnel egress (no host process may pose as a
        // pod), hold ingress (released packets are checked, tracked and marked).
        let mut hooks = vec![
            (programs::FROM_TUNNEL, ifname.clone(), Hook::TcxIngress),
            (programs::TO_TUNNEL, ifname.clone(), Hook::TcxEgress),
        ];
        if let Some(h) = hold {
            hooks.push((programs::FROM_HOLD, h.to_string(), Hook::TcxIngress));
        }
        for (program, interface, hook) in hooks {
            if let Err(e) = s.datapath.attach(program, &interface, hook) {
                tracing::warn!(interface = %interface, program, error = %crate::error_chain(&e), "cannot attach");
                first_error.get_or_insert(e.into());
            }
        }
    }
    // Underlay ingress, with or without encryption: with it, no plaintext for pods from other
    // nodes; without it (the capture sanity check), the ingress checks pod traffic from other
    // nodes gets, as from the tunnel.
    match cluster
        .nodes
        .iter()
        .find(|n| n.name == me)
        .and_then(|n| interface_with_address(n.underlay_ip))
    {
        Some(u) => {
            if let Err(e) = s
                .datapath
                .attach(programs::FROM_UNDERLAY, &u, Hook::TcxIngress)
            {
                tracing::warn!(interface = %u, error = %crate::error_chain(&e), "cannot attach to the underlay");
                first_error.get_or_insert(e.into());
            }
        }
        None => tracing::warn!(
            "no interface holds this node's underlay address: plaintext from the underlay is not filtered"
        ),
    }
    for pod in cluster.pods_on(&me) {
        for (program, hook) in [
            (programs::FROM_POD, Hook::TcxIngress),
            (programs::TO_POD, Hook::TcxEgress),
        ] {
            if let Err(e) = s.datapath.attach(program, &pod.host_veth, hook) {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), program, error = %crate::error_chain(&e), "cannot attach");
                first_error.get_or_insert(e.into());
            }
        }
    }
    s.datapath.prune_pins();
    if let Some(ids) = &s.identities {
        // Subscribe to the SVIDs of exactly the pods on this node.
        let want: BTreeSet<SelectorSet> = cluster
            .pods_on(&me)
            .filter_map(|p| SelectorSet::k8s_pod(&p.namespace, &p.service_account, &p.name).ok())
            .collect();
        for gone in s.watched.difference(&want) {
            ids.unwatch_workload(gone);
        }
        for new in want.difference(&s.watched) {
            ids.watch_workload(new.clone());
        }
        s.watched = want;
    }
    let (ipcache, nodes) = desired_maps(&cluster, &me, &with_key);
    sync(&mut IpCacheMap::new(s.datapath.ebpf_mut())?, &ipcache)?;
    sync(
        &mut KernelHash::<u32, NodeInfo>::new(s.datapath.ebpf_mut(), map_names::NODES)?,
        &nodes,
    )?;
    reconcile_policy(s, &cluster, &me)?;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The interface holding `addr` in this network namespace (the node's underlay interface).
fn interface_with_address(addr: std::net::Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let a = ifa.address?;
        let sin = a.as_sockaddr_in()?;
        (sin.ip() == addr).then(|| ifa.interface_name.clone())
    })
}

/// Compiles the cluster's policies for this node's endpoints and installs them atomically when
/// the input changed. A policy that does not compile leaves the previous one in force.
fn reconcile_policy(
    s: &mut Shared,
    cluster: &ClusterState,
    me: &str,
) -> Result<(), datapath::Error> {
    let mut locals: Vec<u32> = cluster
        .pods_on(me)
        .map(|p| p.identity)
        .filter(|i| *i != 0)
        .collect();
    locals.sort_unstable();
    locals.dedup();
    let input = (
        cluster.policy_generation,
        cluster.identities.clone(),
        locals.clone(),
    );
    if s.policy_input.as_ref() == Some(&input) {
        return Ok(());
    }
    let compiled = crate::policy::compile(&cluster.policies, &cluster.identity_table(), &locals);
    s.policy_input = Some(input);
    match compiled {
        Ok(c) => {
            let changes = dp_policy::install(s.datapath.ebpf_mut(), &c.entries)?;
            let pruned = dp_policy::prune_conntrack(s.datapath.ebpf_mut(), &c.entries)?;
            let _ = s.policy_tx.send(Arc::new(c.entries.clone()));
            tracing::info!(
                generation = cluster.policy_generation,
                policies = cluster.policies.len(),
                entries = c.entries.len(),
                changes,
                conntrack_cut = pruned,
                "policy installed"
            );
            s.policy = api::PolicyStatus {
                generation: cluster.policy_generation,
                policies: cluster
                    .policies
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect(),
                entries: c.entries.len(),
                conntrack_cut: pruned,
                last_error: None,
            };
        }
        Err(e) => {
            tracing::error!(generation = cluster.policy_generation, error = %e, "policy does not compile; previous policy stays in force");
            s.policy.last_error = Some(format!("generation {}: {e}", cluster.policy_generation));
        }
    }
    Ok(())
}

/// Names the failed handshake behind `no-key` / `auth-required` drops: the workload handshake
/// of the pair, else the node handshake with the remote node.
fn auth_error_annotator(
    mesh: Arc<Mutex<MeshStatus>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
) -> crate::flows::Annotator {
    Box::new(move |f| {
        if !matches!(
            f.drop_reason.as_deref(),
            Some("no-key" | "auth-required" | "peer-unauthenticated")
        ) {
            return;
        }
        let (local, remote) = if f.direction == "egress" {
            (&f.src, &f.dst)
        } else {
            (&f.dst, &f.src)
        };
        let ip = match remote.ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => ip,
            Ok(std::net::IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => ip,
                None => return,
            },
            Err(_) => return,
        };
        let cluster = cluster_rx.borrow().clone();
        let Some(node) = cluster.nodes.iter().find(|n| {
            cluster::parse_cidr_v4(&n.pod_cidr).is_some_and(|(net, len)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            })
        }) else {
            return;
        };
        let st = mesh.lock().expect("mesh status lock");
        if let Some(e) = st.failure_for(local.identity, remote.identity, node.id) {
            f.auth_error = Some(e.to_string());
        }
    })
}

/// Drains the datapath's flow events into the flow store.
async fn read_events(
    events: RingBuf<aya::maps::MapData>,
    shared: Arc<Mutex<Shared>>,
    flows: Arc<Mutex<FlowStore>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
) -> std::io::Result<()> {
    let node = shared.lock().expect("agent state lock").cfg.node.clone();
    let offset = crate::flows::boot_offset_ns();
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it; nothing else
    // closes or reuses that descriptor.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let state = cluster_rx.borrow().clone();
        let rb = guard.get_inner_mut();
        // A bounded batch per wake-up: a flood cannot monopolize the agent.
        let mut batch = Vec::new();
        while batch.len() < 4096 {
            let Some(item) = rb.next() else { break };
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent (repr(C), any bit pattern valid) here.
                let ev: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                batch.push(ev);
            }
        }
        if batch.len() < 4096 {
            guard.clear_ready();
        }
        drop(guard);
        {
            let mut store = flows.lock().expect("flow store lock");
            for ev in &batch {
                store.push(crate::flows::from_event(ev, &node, &state, offset));
            }
        }
        tokio::task::yield_now().await;
    }
}

/// The ipcache and node table this node should have for a cluster state.
pub fn desired_maps(
    cluster: &ClusterState,
    me: &str,
    with_key: &std::collections::BTreeSet<String>,
) -> (BTreeMap<Prefix, IpInfo>, BTreeMap<u32, NodeInfo>) {
    let mut ipcache = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for n in &cluster.nodes {
        if let Some((ip, len)) = cluster::parse_cidr_v4(&n.pod_cidr) {
            ipcache.insert(
                Prefix::v4(ip, len),
                IpInfo {
                    identity: 0,
                    node_id: n.id,
                    flags: ip_flags::POD_CIDR,
                    ifindex: 0,
                },
            );
        }
        if n.name == me {
            // This node's own addresses: its underlay address and its pod-network gateway
            // (the first address of its pod CIDR, the source of its traffic to local pods).
            let host = IpInfo {
                identity: veil_common::maps::identity::HOST,
                node_id: n.id,
                flags: ip_flags::HOST,
                ifindex: 0,
            };
            ipcache.insert(Prefix::v4(n.underlay_ip, 32), host);
            if let Some((net, _)) = cluster::parse_cidr_v4(&n.pod_cidr) {
                let gw = std::net::Ipv4Addr::from(u32::from(net).wrapping_add(1));
                ipcache.insert(Prefix::v4(gw, 32), host);
            }
        }
        let mut flags = if n.name == me { node_flags::SELF } else { 0 };
        if with_key.contains(&n.name) {
            flags |= node_flags::HAS_KEY;
        }
        nodes.insert(n.id, NodeInfo { flags, _pad: 0 });
    }
    for p in &cluster.pods {
        let Some(node) = cluster.node(&p.node) else {
            continue;
        };
        let local = p.node == me;
        let ifindex = if local {
            nix::net::if_::if_nametoindex(p.host_veth.as_str()).unwrap_or(0)
        } else {
            0
        };
        let flags = ip_flags::POD | if local { ip_flags::LOCAL_POD } else { 0 };
        let identity = if p.identity != 0 {
            p.identity
        } else {
            veil_common::maps::identity::UNKNOWN
        };
        ipcache.insert(
            Prefix::v4(p.ip, 32),
            IpInfo {
                identity,
                node_id: node.id,
                flags,
                ifindex,
            },
        );
    }
    (ipcache, nodes)
}

struct AdminHandler {
    shared: Arc<Mutex<Shared>>,
    flows: Arc<Mutex<FlowStore>>,
}

impl admin::Handler for AdminHandler {
    fn handle(&self, req: AdminRequest) -> BoxFuture {
        let shared = self.shared.clone();
        let flows = self.flows.clone();
        Box::pin(async move {
            match (req.method.clone(), req.path.as_str()) {
                (Method::GET, "/v1/flows") => match flow_filter(&req) {
                    Ok(f) => AdminResponse::json(&flows.lock().expect("flow store lock").query(&f)),
                    Err(e) => AdminResponse::error(StatusCode::BAD_REQUEST, &e),
                },
                (Method::POST, "/v1/audit") => set_audit(
                    &mut shared.lock().expect("agent state lock"),
                    req.query("on"),
                ),
                (Method::GET, "/v1/status") => {
                    match status(&mut shared.lock().expect("agent state lock")) {
                        Ok(st) => AdminResponse::json(&st),
                        Err(e) => {
                            AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                        }
                    }
                }
                (Method::GET, "/metrics") => {
                    let totals = flows.lock().expect("flow store lock").totals().clone();
                    match metrics(&mut shared.lock().expect("agent state lock"), &totals) {
                        Ok(text) => AdminResponse::text(StatusCode::OK, text),
                        Err(e) => {
                            AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                        }
                    }
                }
                (Method::POST, path) if path.starts_with("/v1/peers/") => {
                    peer_switch(&mut shared.lock().expect("agent state lock"), path)
                }
                (_, path) => {
                    AdminResponse::error(StatusCode::NOT_FOUND, &format!("no route {path}"))
                }
            }
        })
    }
}

fn flow_filter(req: &AdminRequest) -> Result<crate::flows::Filter, String> {
    let num = |k: &str| -> Result<Option<u64>, String> {
        req.query(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            })
            .transpose()
    };
    let verdict = req.query("verdict").map(str::to_ascii_uppercase);
    if let Some(v) = &verdict {
        if !["FORWARDED", "DROPPED", "AUDIT"].contains(&v.as_str()) {
            return Err(format!("verdict: {v:?} is not FORWARDED, DROPPED or AUDIT"));
        }
    }
    Ok(crate::flows::Filter {
        verdict,
        pod: req.query("pod").map(str::to_string),
        namespace: req.query("namespace").map(str::to_string),
        protocol: req.query("protocol").map(str::to_string),
        since_unix_ns: num("since_unix_ns")?,
        after_seq: num("after_seq")?,
        limit: num("limit")?.map(|l| l as usize),
    })
}

/// `POST /v1/audit?on=true|false`: node-wide audit mode.
fn set_audit(s: &mut Shared, on: Option<&str>) -> AdminResponse {
    let on = match on {
        Some("true" | "1" | "on") => true,
        Some("false" | "0" | "off") => false,
        other => {
            return AdminResponse::error(
                StatusCode::BAD_REQUEST,
                &format!("on: expected true or false, got {other:?}"),
            )
        }
    };
    let r = s.datapath.config_map().and_then(|mut cm| {
        let mut c = cm.get()?;
        if on {
            c.flags |= config_flags::AUDIT;
        } else {
            c.flags &= !config_flags::AUDIT;
        }
        cm.set(c)
    });
    match r {
        Ok(()) => {
            s.audit = on;
            tracing::info!(audit = on, "node audit mode changed");
            AdminResponse::json(&serde_json::json!({ "node": s.cfg.node, "audit": on }))
        }
        Err(e) => AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    }
}

/// `POST /v1/peers/<node>/disable|enable`: take a peer off the tunnel (and out of HAS_KEY) or put
/// it back. For operators and for the strict-mode test.
fn peer_switch(s: &mut Shared, path: &str) -> AdminResponse {
    let rest = &path["/v1/peers/".len()..];
    let Some((node, action)) = rest.split_once('/') else {
        return AdminResponse::error(
            StatusCode::NOT_FOUND,
            "expected /v1/peers/<node>/disable|enable",
        );
    };
    if s.cluster.node(node).is_none() || node == s.cfg.node {
        return AdminResponse::error(StatusCode::NOT_FOUND, &format!("no peer node {node:?}"));
    }
    let Some(t) = s.tunnel.as_mut() else {
        return AdminResponse::error(
            StatusCode::CONFLICT,
            "encryption is off: there are no tunnel peers",
        );
    };
    match action {
        "disable" => t.disable_peer(node),
        "enable" => t.enable_peer(node),
        other => {
            return AdminResponse::error(
                StatusCode::NOT_FOUND,
                &format!("unknown action {other:?}"),
            )
        }
    }
    match reconcile(s) {
        Ok(()) => {
            AdminResponse::json(&serde_json::json!({ "node": node, "action": action, "ok": true }))
        }
        Err(e) => AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    }
}

fn pod_names_by_veth(s: &Shared) -> BTreeMap<String, String> {
    s.cluster
        .pods_on(&s.cfg.node)
        .map(|p| (p.host_veth.clone(), format!("{}/{}", p.namespace, p.name)))
        .collect()
}

fn status(s: &mut Shared) -> Result<api::Status, datapath::Error> {
    let pods = pod_names_by_veth(s);
    let stats = datapath::maps::interface_stats(s.datapath.ebpf())?;
    let ifnames: BTreeMap<u32, String> = s
        .datapath
        .attachments()
        .map(|a| (a.ifindex, a.interface.clone()))
        .collect();
    let interfaces = stats
        .iter()
        .map(|(ifindex, st)| {
            let interface = ifnames
                .get(ifindex)
                .cloned()
                .unwrap_or_else(|| format!("if{ifindex}"));
            api::InterfaceCounters {
                pod: pods.get(&interface).cloned(),
                interface,
                ifindex: *ifindex,
                packets: st.packets,
                bytes: st.bytes,
            }
        })
        .collect();
    let programs = s
        .datapath
        .attachments()
        .map(|a| api::Program {
            name: a.program.to_string(),
            interface: a.interface.clone(),
            hook: a.hook.as_str().to_string(),
            program_id: a.program_id,
            link_id: a.link_id,
            pod: pods.get(&a.interface).cloned(),
            adopted: a.adopted,
        })
        .collect();
    let drops = datapath::maps::drops(s.datapath.ebpf())?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let (svids, bundles) = identity_status(s);
    let mesh = s
        .mesh_status
        .as_ref()
        .map(|m| m.lock().expect("mesh status lock").clone())
        .unwrap_or_default();
    let cluster = s.cluster.clone();
    let (backend, public_key, peers, tunnel_restarts) = match s.tunnel.as_mut() {
        Some(t) => {
            let peers = t.peers(&cluster).unwrap_or_else(|e| {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read tunnel peers");
                Vec::new()
            });
            let r = t.restarts();
            let restarts = api::TunnelRestarts {
                total: r.total,
                recent: r
                    .recent
                    .iter()
                    .map(|(t, why)| api::TunnelRestart {
                        time_unix: *t,
                        reason: why.to_string(),
                    })
                    .collect(),
            };
            (
                t.backend().as_str().to_string(),
                Some(t.public_key().to_base64()),
                peers,
                restarts,
            )
        }
        None => (
            "none".to_string(),
            None,
            Vec::new(),
            api::TunnelRestarts::default(),
        ),
    };
    Ok(api::Status {
        node: s.cfg.node.clone(),
        cluster: s.cfg.cluster.clone(),
        ready: s.ready,
        backend,
        interface: s.cfg.interface.clone(),
        listen_port: s.cfg.listen_port,
        public_key,
        encryption: s.cfg.encryption,
        strict: s.cfg.strict,
        peers,
        svids,
        bundles,
        auth: mesh.auth.clone(),
        policy: s.policy.clone(),
        audit: s.audit,
        maps: map_fill(&s.datapath),
        channels: mesh.channels,
        auth_failures: mesh.failures,
        hold: {
            let h = *s.hold_stats.lock().expect("hold stats lock");
            api::HoldStatus {
                held: h.held,
                released: h.released,
                timed_out: h.timed_out,
                overflow: h.overflow,
                unclassified: h.unclassified,
            }
        },
        drops,
        programs,
        interfaces,
        agent: api::AgentInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix: s.started_unix,
            restarts: s.restarts,
            pin_dir: s.cfg.pin_dir.display().to_string(),
        },
        tunnel_restarts,
    })
}

/// SVIDs (node first, then pods) and bundles as `veil status` shows them.
fn identity_status(s: &Shared) -> (Vec<api::Svid>, Vec<api::Bundle>) {
    let Some(ids) = &s.identities else {
        return (Vec::new(), Vec::new());
    };
    let snap = ids.current();
    let owner_of = |key: &SvidKey| match key {
        SvidKey::Node => "node".to_string(),
        SvidKey::Workload(sel) => {
            let get = |k: &str| {
                sel.iter()
                    .filter(|x| x.kind() == "k8s")
                    .find_map(|x| x.value().strip_prefix(&format!("{k}:")).map(str::to_string))
            };
            match (get("ns"), get("pod-name")) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                _ => "workload".to_string(),
            }
        }
    };
    let unix = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let svids = snap
        .svids()
        .map(|(key, svid)| {
            let (issuer, authority_id) = issuer_of(svid.leaf());
            let (nb, na) = (unix(svid.not_before()), unix(svid.not_after()));
            api::Svid {
                spiffe_id: svid.spiffe_id().to_string(),
                owner: owner_of(&key),
                serial: svid.serial().to_string(),
                not_after_unix: na,
                issuer,
                authority_id,
                not_before_unix: nb,
                rotates_at_unix: nb + na.saturating_sub(nb) / 2,
            }
        })
        .collect();
    let bundles = snap
        .bundles
        .iter()
        .map(|(td, roots)| api::Bundle {
            trust_domain: td.to_string(),
            roots: roots.len(),
        })
        .collect();
    (svids, bundles)
}

/// The leaf's issuer name and authority key identifier (lowercase hex, as SPIRE prints an
/// authority ID).
fn issuer_of(leaf: &[u8]) -> (Option<String>, Option<String>) {
    use x509_parser::extensions::ParsedExtension;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return (None, None);
    };
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| {
                k.0.iter().fold(String::new(), |mut s, b| {
                    use std::fmt::Write as _;
                    let _ = write!(s, "{b:02x}");
                    s
                })
            }),
            _ => None,
        });
    (Some(cert.issuer().to_string()), aki)
}

/// Prometheus text exposition.
/// Entries and capacity of the maps that grow with the cluster.
fn map_fill(dp: &Datapath) -> Vec<api::MapFill> {
    use veil_common::maps::{
        AuthEntry, AuthKey, CtEntry, CtKey, PolicyEntry, PolicyKey, AUTH_MAX, CT_MAX, IPCACHE_MAX,
        POLICY_MAX,
    };
    let e = dp.ebpf();
    vec![
        api::MapFill {
            name: map_names::IPCACHE.into(),
            entries: datapath::maps::ipcache_len(e),
            capacity: IPCACHE_MAX,
        },
        api::MapFill {
            name: map_names::POLICY_A.into(),
            entries: dp_policy::count::<PolicyKey, PolicyEntry>(e, map_names::POLICY_A),
            capacity: POLICY_MAX,
        },
        api::MapFill {
            name: map_names::POLICY_B.into(),
            entries: dp_policy::count::<PolicyKey, PolicyEntry>(e, map_names::POLICY_B),
            capacity: POLICY_MAX,
        },
        api::MapFill {
            name: map_names::CT.into(),
            entries: dp_policy::count::<CtKey, CtEntry>(e, map_names::CT),
            capacity: CT_MAX,
        },
        api::MapFill {
            name: map_names::AUTH.into(),
            entries: dp_policy::count::<AuthKey, AuthEntry>(e, map_names::AUTH),
            capacity: AUTH_MAX,
        },
    ]
}

fn metrics(
    s: &mut Shared,
    flow_totals: &BTreeMap<(String, String), u64>,
) -> Result<String, datapath::Error> {
    use std::fmt::Write as _;
    let st = status(s)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP veil_interface_packets_total Packets seen by veil's TC programs per interface."
    );
    let _ = writeln!(out, "# TYPE veil_interface_packets_total counter");
    for i in &st.interfaces {
        let _ = writeln!(
            out,
            "veil_interface_packets_total{{interface=\"{}\"}} {}",
            i.interface, i.packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP veil_interface_bytes_total Bytes seen by veil's TC programs per interface."
    );
    let _ = writeln!(out, "# TYPE veil_interface_bytes_total counter");
    for i in &st.interfaces {
        let _ = writeln!(
            out,
            "veil_interface_bytes_total{{interface=\"{}\"}} {}",
            i.interface, i.bytes
        );
    }
    let _ = writeln!(
        out,
        "# HELP veil_drops_total Packets dropped by the datapath by reason."
    );
    let _ = writeln!(out, "# TYPE veil_drops_total counter");
    for (reason, n) in &st.drops {
        let _ = writeln!(out, "veil_drops_total{{reason=\"{reason}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP veil_tunnel_restarts_total Restarts of the userspace tunnel (veil-wg) by reason."
    );
    let _ = writeln!(out, "# TYPE veil_tunnel_restarts_total counter");
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::from([("exited", 0), ("unresponsive", 0)]);
    for r in &st.tunnel_restarts.recent {
        *by_reason.entry(r.reason.as_str()).or_default() += 1;
    }
    // `recent` is bounded; the total is exact, so any restarts beyond it count as `exited`.
    let listed: u64 = by_reason.values().sum();
    *by_reason.entry("exited").or_default() += st.tunnel_restarts.total.saturating_sub(listed);
    for (reason, n) in &by_reason {
        let _ = writeln!(out, "veil_tunnel_restarts_total{{reason=\"{reason}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP veil_programs_attached eBPF programs veil has attached."
    );
    let _ = writeln!(out, "# TYPE veil_programs_attached gauge");
    let _ = writeln!(out, "veil_programs_attached {}", st.programs.len());
    let _ = writeln!(
        out,
        "# HELP veil_flows_total Flow records by verdict and reason (packets folded in)."
    );
    let _ = writeln!(out, "# TYPE veil_flows_total counter");
    for ((verdict, reason), n) in flow_totals {
        let _ = writeln!(
            out,
            "veil_flows_total{{verdict=\"{verdict}\",reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP veil_policies Policies in force on this node.");
    let _ = writeln!(out, "# TYPE veil_policies gauge");
    let _ = writeln!(out, "veil_policies {}", st.policy.policies.len());
    let _ = writeln!(
        out,
        "# HELP veil_policy_entries Entries of the live policy map."
    );
    let _ = writeln!(out, "# TYPE veil_policy_entries gauge");
    let _ = writeln!(out, "veil_policy_entries {}", st.policy.entries);
    let _ = writeln!(out, "# HELP veil_map_entries Entries in a datapath map.");
    let _ = writeln!(out, "# TYPE veil_map_entries gauge");
    for m in &st.maps {
        let _ = writeln!(out, "veil_map_entries{{map=\"{}\"}} {}", m.name, m.entries);
    }
    let _ = writeln!(out, "# HELP veil_map_capacity Capacity of a datapath map.");
    let _ = writeln!(out, "# TYPE veil_map_capacity gauge");
    for m in &st.maps {
        let _ = writeln!(
            out,
            "veil_map_capacity{{map=\"{}\"}} {}",
            m.name, m.capacity
        );
    }
    let _ = writeln!(
        out,
        "# HELP veil_svid_expiry_seconds Seconds until each held SVID expires."
    );
    let _ = writeln!(out, "# TYPE veil_svid_expiry_seconds gauge");
    let now = unix_now() as i64;
    for v in &st.svids {
        let _ = writeln!(
            out,
            "veil_svid_expiry_seconds{{spiffe_id=\"{}\",owner=\"{}\"}} {}",
            v.spiffe_id,
            v.owner,
            v.not_after_unix as i64 - now
        );
    }
    let _ = writeln!(
        out,
        "# HELP veil_agent_ready 1 once the agent has reconciled the datapath."
    );
    let _ = writeln!(out, "# TYPE veil_agent_ready gauge");
    let _ = writeln!(out, "veil_agent_ready {}", u8::from(st.ready));
    let _ = writeln!(
        out,
        "# HELP veil_auth_failures_total Failed node and workload handshakes by reason."
    );
    let _ = writeln!(out, "# TYPE veil_auth_failures_total counter");
    for (reason, n) in &st.auth_failures {
        let _ = writeln!(out, "veil_auth_failures_total{{reason=\"{reason}\"}} {n}");
    }
    let now_u = unix_now();
    let _ = writeln!(
        out,
        "# HELP veil_auth_pairs Authenticated identity pairs (auth entries) currently valid."
    );
    let _ = writeln!(out, "# TYPE veil_auth_pairs gauge");
    let _ = writeln!(
        out,
        "veil_auth_pairs {}",
        st.auth.iter().filter(|p| p.expires_unix > now_u).count()
    );
    let _ = writeln!(
        out,
        "# HELP veil_control_channels Authenticated control channels to peer agents."
    );
    let _ = writeln!(out, "# TYPE veil_control_channels gauge");
    let _ = writeln!(out, "veil_control_channels {}", st.channels.len());
    let _ = writeln!(
        out,
        "# HELP veil_hold_packets_total Packets held for authentication, by outcome."
    );
    let _ = writeln!(out, "# TYPE veil_hold_packets_total counter");
    for (outcome, n) in [
        ("held", st.hold.held),
        ("released", st.hold.released),
        ("timed-out", st.hold.timed_out),
        ("overflow", st.hold.overflow),
        ("unclassified", st.hold.unclassified),
    ] {
        let _ = writeln!(out, "veil_hold_packets_total{{outcome=\"{outcome}\"}} {n}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::cluster::{Node, Pod};
    use veil_common::maps::identity;

    fn state() -> ClusterState {
        let node = |name: &str, id: u32| Node {
            name: name.into(),
            id,
            underlay_ip: Ipv4Addr::new(198, 18, 0, id as u8),
            pod_cidr: format!("198.19.{id}.0/24"),
            wg_public_key: None,
            wg_next_public_key: None,
        };
        let pod = |name: &str, node: &str, ip: [u8; 4]| Pod {
            name: name.into(),
            namespace: "shop".into(),
            node: node.into(),
            ip: Ipv4Addr::from(ip),
            labels: BTreeMap::new(),
            service_account: name.into(),
            host_veth: "lxc-does-not-exist".into(),
            identity: 256,
        };
        ClusterState {
            generation: 1,
            cluster: "t".into(),
            trust_domain: "lab.veil".into(),
            nodes: vec![node("a", 1), node("b", 2)],
            pods: vec![
                pod("fe", "a", [198, 19, 1, 10]),
                pod("be", "b", [198, 19, 2, 10]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn desired_maps_cover_cidrs_pods_and_nodes() {
        let (ipcache, nodes) = desired_maps(&state(), "a", &["b".to_string()].into());
        // Two pod CIDRs, two pods, and this node's own underlay address and gateway.
        assert_eq!(ipcache.len(), 6);
        for own in [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 19, 1, 1)] {
            let h = ipcache[&Prefix::v4(own, 32)];
            assert_eq!(
                (h.flags, h.identity),
                (ip_flags::HOST, identity::HOST),
                "{own}"
            );
        }
        assert!(!ipcache.contains_key(&Prefix::v4(Ipv4Addr::new(198, 18, 0, 2), 32)));
        let fe = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 1, 10), 32)];
        assert_eq!(fe.flags, ip_flags::POD | ip_flags::LOCAL_POD);
        let be = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 2, 10), 32)];
        assert_eq!((be.flags, be.node_id), (ip_flags::POD, 2));
        let cidr = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 2, 0), 24)];
        assert_eq!((cidr.flags, cidr.node_id), (ip_flags::POD_CIDR, 2));
        assert_eq!(nodes[&1].flags, node_flags::SELF);
        assert_eq!(nodes[&2].flags, node_flags::HAS_KEY);
        let (_, nodes) = desired_maps(&state(), "a", &Default::default());
        assert_eq!(nodes[&2].flags, 0, "no peer, no key: strict mode drops");
    }
}
