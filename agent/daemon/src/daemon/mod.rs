//! daemon: the node agent, composed. `Agent::new` builds each component from the config (the
//! tunnel and node key in `keys`, the datapath in `load`, identities in `identity`, the mesh
//! and hold device in `mutual_auth`, the flow store and event reader in `events`); `Agent::run`
//! spawns them, serves the admin `routes` and runs the loop that drives `reconcile` and key
//! rotation. What a route answers is built in `status` and `metrics`.

mod events;
mod identity;
mod keys;
mod load;
mod metrics;
mod mutual_auth;
mod reconcile;
mod routes;
mod state;
mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tracing::Instrument as _;
use veil_common::{
    config_flags,
    maps::{PolicyEntry, PolicyKey},
};
use veil_identity::SvidSource as _;
use veil_spire::IdentityClient;

pub use mutual_auth::HOLD_DEVICE;
pub use reconcile::{desired_maps, ReconcileError};

use self::{
    keys::PendingKey,
    mutual_auth::{HoldParts, MutualAuth},
    reconcile::reconcile,
    routes::Routes,
    state::Shared,
};
use crate::{
    admin, api,
    cluster::{self, ClusterState},
    config::Config,
    datapath,
    flows::FlowStore,
    mesh::Mesh,
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
    #[error(transparent)]
    Fatal(#[from] reconcile::ReconcileError),
    #[error("cannot prepare state dir {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Agent {
    shared: Arc<Mutex<Shared>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
    identity_client: Option<IdentityClient>,
    flows: Arc<Mutex<FlowStore>>,
    events: Option<datapath::events::EventRing>,
    mesh: Option<Mesh>,
    policy_rx: watch::Receiver<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
    hold: Option<HoldParts>,
    proxy_rx: watch::Receiver<Arc<crate::l7::ProxyConfig>>,
}

impl Agent {
    pub async fn new(cfg: Config) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| Error::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let restarts = state::bump_start_count(&cfg.state_dir);
        let source = cluster::open(&cfg);
        let cluster_rx = source.watch().await?;
        let cluster = cluster_rx.borrow().clone();
        let me = cluster
            .node(&cfg.node)
            .ok_or_else(|| Error::UnknownNode(cfg.node.clone()))?
            .clone();
        let tunnel = keys::open_tunnel(&cfg, source.as_ref())?;
        let mut datapath = load::open_datapath(&cfg, &me, tunnel.as_ref(), restarts)?;
        let (identity_client, identities) = identity::open_client(&cfg)?;
        let started_unix = state::unix_now();
        let events = datapath::events::EventRing::take(&mut datapath)?;
        let flows = events::open_store(&cfg);
        let audit = datapath.config_map()?.get()?.flags & config_flags::AUDIT != 0;
        let (policy_tx, policy_rx) = watch::channel(Arc::new(BTreeMap::new()));
        let (proxy_tx, proxy_rx) = watch::channel(Arc::new(crate::l7::ProxyConfig::default()));
        l7_routes(&cfg);
        let mutual_auth = MutualAuth::new(
            &cfg,
            &mut datapath,
            &cluster,
            &me,
            tunnel.as_ref(),
            identities.as_ref(),
        )?;
        let (mesh, mesh_keys, mesh_status, mesh_queries, hold, key_rotation) = match mutual_auth {
            Some(m) => (
                Some(m.mesh),
                Some(m.keys),
                Some(m.status),
                Some(m.queries),
                m.hold,
                Some(m.key_rotation),
            ),
            None => (None, None, None, None, None, None),
        };
        if let Some(ms) = &mesh_status {
            flows
                .lock()
                .expect("flow store lock")
                .set_annotator(events::auth_error_annotator(ms.clone(), cluster_rx.clone()));
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
            events_lost_logged: false,
            policy_input: None,
            services_input: None,
            maps_input: None,
            proxy_pods: None,
            ipcache_written: Default::default(),
            nodes_written: Default::default(),
            policy: api::PolicyStatus::default(),
            underlay_if: None,
            audit,
            mesh_keys,
            mesh_status,
            mesh_queries,
            key_rotation,
            policy_tx,
            hold_stats: Default::default(),
            l7_rules: Vec::new(),
            proxy_tx,
            proxy_status: Default::default(),
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
            proxy_rx,
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
        let handler: Arc<dyn admin::Handler> =
            Arc::new(Routes::new(self.shared.clone(), self.flows.clone()));
        if let Some(ring) = self.events {
            let mut stop_events = stop_rx.clone();
            let node = self
                .shared
                .lock()
                .expect("agent state lock")
                .cfg
                .node
                .clone();
            let (flows, cluster_rx) = (self.flows.clone(), self.cluster_rx.clone());
            tokio::spawn(
                async move {
                    tokio::select! {
                        _ = stop_events.wait_for(|s| *s) => {}
                        r = events::read_events(ring, node, flows, cluster_rx) => {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "flow event reader stopped");
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("flows")),
            );
        }
        let health_addr = self
            .shared
            .lock()
            .expect("agent state lock")
            .cfg
            .health_addr;
        if let Some(addr) = health_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| admin::Error::Listen {
                    path: addr.to_string(),
                    source,
                })?;
            tracing::info!(%addr, "health port: /healthz /readyz /metrics");
            let (h, mut stop_health) = (handler.clone(), stop_rx.clone());
            tokio::spawn(async move {
                admin::serve_health(listener, h, async move {
                    let _ = stop_health.wait_for(|s| *s).await;
                })
                .await
            });
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
        let proxy = {
            let s = self.shared.lock().expect("agent state lock");
            (s.cfg.proxy_port != 0).then(|| {
                (
                    proxy_launch(&s.cfg),
                    s.proxy_status.clone(),
                    s.cfg.node.clone(),
                )
            })
        };
        if let Some((launch, status, node)) = proxy {
            let (flows, crx) = (self.flows.clone(), self.cluster_rx.clone());
            let on_record = move |r: crate::l7::L7Record| {
                let f = crate::flows::from_l7(&r, &node, &crx.borrow());
                flows.lock().expect("flow store lock").push(f);
            };
            let mut stop_proxy = stop_rx.clone();
            tokio::spawn(
                crate::l7::supervisor::run(launch, self.proxy_rx, on_record, status, async move {
                    let _ = stop_proxy.wait_for(|s| *s).await;
                })
                .instrument(tracing::info_span!("proxy")),
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
                            // The end of a failure the warning below announced.
                            if let Some(was) = s.last_error.take() {
                                tracing::info!(was = %was, "reconcile recovered");
                            }
                        }
                        Err(e @ reconcile::ReconcileError::NodeIdChanged { .. }) => {
                            tracing::error!(error = %e, "cannot go on");
                            return Some(e);
                        }
                        Err(e) => {
                            // Once per distinct failure: a full map fails every pass (5 s),
                            // with counts that move as the cluster does.
                            let msg = crate::error_chain(&e);
                            if !s
                                .last_error
                                .as_deref()
                                .is_some_and(|l| same_failure(l, &msg))
                            {
                                tracing::warn!(error = %msg, "reconcile failed; retrying (the same failure again is logged at debug)");
                            } else {
                                tracing::debug!(error = %msg, "reconcile failed again");
                            }
                            s.last_error = Some(msg);
                        }
                    }
                    reconcile::log_events_lost(&mut s);
                    // Old snapshots (once every holder moved on) and each pass's scratch.
                    crate::sys::release_free_memory();
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
                    _ = stop_loop.wait_for(|s| *s) => return None,
                    r = cluster_rx.changed() => if r.is_err() { return None },
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
                        pending_key = keys::rotate_node_key(&mut s);
                    }
                    // The new key was published a lead ago: every peer has read it by now, so
                    // its node handshake claiming that key is admitted (`unpublished-wg-key`).
                    _ = tokio::time::sleep_until(commit_at.unwrap_or_else(tokio::time::Instant::now)), if commit_at.is_some() => {
                        if let Some((_, key)) = pending_key.take() {
                            let mut s = shared.lock().expect("agent state lock");
                            keys::commit_node_key(&mut s, key);
                        }
                    }
                }
            }
        });

        let mut reconcile_task = reconcile_task;
        // A reconcile loop that ended without an error (its cluster watch closed) leaves the
        // rest running until `shutdown`, as before; one that ended on a fatal error stops all.
        let fatal = tokio::select! {
            () = shutdown => None,
            Ok(Some(e)) = &mut reconcile_task => Some(e),
        };
        tracing::info!("shutting down (programs stay attached, maps stay pinned)");
        let _ = stop_tx.send(true);
        if !reconcile_task.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reconcile_task).await;
        }
        match tokio::time::timeout(Duration::from_secs(5), admin_task).await {
            Ok(Ok(r)) => r?,
            _ => tracing::warn!("admin server did not stop within 5s"),
        }
        fatal.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// How to start this node's veil-proxy.
fn proxy_launch(cfg: &Config) -> crate::l7::supervisor::Launch {
    crate::l7::supervisor::Launch {
        binary: cfg
            .proxy_binary
            .clone()
            .unwrap_or_else(|| crate::sys::sibling_binary("veil-proxy")),
        log: cfg
            .proxy_log
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("veil-proxy.log")),
        control: cfg.state_dir.join("proxy.sock"),
        listen_port: cfg.proxy_port,
        cgroup: cfg.proxy_cgroup.clone(),
    }
}

/// The policy route that delivers packets the datapath marked `TO_PROXY` locally (to the
/// proxy's sockets, whatever their destination address): `ip rule fwmark … lookup 2004` and
/// `local default dev lo` in that table, for both families (IPv6 only where the node has it).
fn l7_routes(cfg: &Config) {
    use veil_common::marks;
    if cfg.proxy_port == 0 {
        return;
    }
    let mark = format!("{:#x}/{:#x}", marks::TO_PROXY, marks::MASK);
    let (table, pref) = (
        marks::PROXY_ROUTE_TABLE.to_string(),
        marks::PROXY_RULE_PRIORITY.to_string(),
    );
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        // Idempotent: a rule left by an earlier run is replaced, not doubled.
        while crate::sys::run("ip", &[family, "rule", "del", "pref", &pref], None).is_ok() {}
        let r = crate::sys::run(
            "ip",
            &[
                family, "rule", "add", "pref", &pref, "fwmark", &mark, "lookup", &table,
            ],
            None,
        )
        .and_then(|_| {
            crate::sys::run(
                "ip",
                &[
                    family, "route", "replace", "local", default, "dev", "lo", "table", &table,
                ],
                None,
            )
        });
        if let Err(e) = r {
            if family == "-4" {
                tracing::warn!(error = %e, "cannot install the L7 proxy's policy route; L7-policed connections will not reach it");
            }
        }
    }
}

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

/// Two reconcile failures alike but for their counts ("3 of 9 writes failed" and "4 of 9").
fn same_failure(a: &str, b: &str) -> bool {
    let shape = |s: &str| {
        s.chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
    };
    shape(a) == shape(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn failures_differing_only_in_counts_are_the_same() {
        let full = |n: u32| format!("ipcache: {n} of 9 writes failed (the map is full)");
        assert!(super::same_failure(&full(3), &full(4)));
        assert!(!super::same_failure(
            &full(3),
            "node table: 3 of 9 writes failed (the map is full)"
        ));
    }
}
