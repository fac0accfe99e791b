//! The dev server's I/O shell: one tonic server per node on that node's unix socket, serving
//! the SPIFFE Workload API and the SPIRE Delegated Identity API from the core's per-node view,
//! and a driver task that rotates SVIDs when their time comes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};
use veil_identity::{CertificateDer, Selector, SelectorSet, SpiffeId, Svid, TrustDomain};

use super::core::{
    CaPhase, Core, DevNodeConfig, DevServerConfig, DevSvidStatus, IssuedSvid, NodeView,
    PodRegistration, RotateTarget,
};
use crate::proto::delegated::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use crate::proto::delegated::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse, X509svidWithKey,
};
use crate::proto::types;
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use crate::proto::WORKLOAD_SECURITY_HEADER;
use crate::Error;

/// How long `shutdown` waits for a node server to drain before aborting it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3);
/// Pause after a failed rotation before the driver tries again (never busy-loop).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

struct Inner {
    core: Core,
    views: BTreeMap<String, watch::Sender<Arc<NodeView>>>,
}

impl Inner {
    /// Pushes each node's current view to its streams when it differs.
    fn publish(&self) {
        for (node, tx) in &self.views {
            let Some(view) = self.core.view(node) else {
                continue;
            };
            tx.send_if_modified(|cur| {
                if same_view(cur, &view) {
                    false
                } else {
                    *cur = Arc::new(view);
                    true
                }
            });
        }
    }
}

fn same_view(a: &NodeView, b: &NodeView) -> bool {
    Arc::ptr_eq(&a.node_svid, &b.node_svid)
        && a.bundle == b.bundle
        && a.federated == b.federated
        && a.pods.len() == b.pods.len()
        && a.pods
            .iter()
            .zip(&b.pods)
            .all(|((sa, va), (sb, vb))| sa == sb && Arc::ptr_eq(va, vb))
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the core consistent enough to serve: every
        // mutation replaces whole entries.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running dev server. Dropping it stops it (without draining); prefer
/// [`DevServer::shutdown`].
pub struct DevServer {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<BTreeMap<String, PathBuf>>,
}

impl std::fmt::Debug for DevServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevServer")
            .field(
                "sockets",
                &*self.sockets.lock().unwrap_or_else(|p| p.into_inner()),
            )
            .finish_non_exhaustive()
    }
}

impl DevServer {
    /// Validates `config`, creates the CA, binds every node's socket and starts serving.
    pub async fn start(config: DevServerConfig) -> Result<DevServer, Error> {
        config.validate()?;
        let mut core_cfg = config.clone();
        core_cfg.nodes.clear();
        let core = Core::new(&core_cfg, SystemTime::now())?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core,
                views: BTreeMap::new(),
            }),
            wake: Notify::new(),
        });
        let (shutdown, _) = watch::channel(false);
        let server = DevServer {
            shared: shared.clone(),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            sockets: Mutex::new(BTreeMap::new()),
        };
        let driver = tokio::spawn(
            drive(shared, server.shutdown.subscribe())
                .instrument(info_span!("dev_spire", trust_domain = %config.trust_domain)),
        );
        server.tasks.lock().expect("fresh").push(driver);
        for node in &config.nodes {
            server.add_node(node.clone())?;
        }
        info!(trust_domain = %config.trust_domain, ttl = ?config.svid_ttl,
              nodes = config.nodes.len(), "dev spire server started");
        Ok(server)
    }

    /// Adds a node: issues its SVID and serves its socket.
    pub fn add_node(&self, node: DevNodeConfig) -> Result<(), Error> {
        let listener = bind(&node.socket)?;
        let view_rx = {
            let mut inner = self.shared.lock();
            if let Err(e) = inner.core.add_node(&node.name, SystemTime::now()) {
                drop(inner);
                let _ = std::fs::remove_file(&node.socket);
                return Err(e);
            }
            let view = inner.core.view(&node.name).expect("just added");
            let (tx, rx) = watch::channel(Arc::new(view));
            inner.views.insert(node.name.clone(), tx);
            rx
        };
        self.shared.wake.notify_one();
        let api = NodeApi {
            views: view_rx,
            shutdown: self.shutdown.subscribe(),
        };
        let mut sd = self.shutdown.subscribe();
        let span = info_span!("dev_spire_node", node = %node.name);
        let task = tokio::spawn(
            async move {
                let res = tonic::transport::Server::builder()
                    .add_service(SpiffeWorkloadApiServer::new(api.clone()))
                    .add_service(DelegatedIdentityServer::new(api))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                        until_true(&mut sd).await;
                    })
                    .await;
                if let Err(e) = res {
                    warn!(error = %e, "dev spire node server failed");
                }
            }
            .instrument(span),
        );
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.name.clone(), node.socket.clone());
        info!(node = %node.name, socket = %node.socket.display(), "dev spire node serving");
        Ok(())
    }

    fn mutate<R>(
        &self,
        f: impl FnOnce(&mut Core, SystemTime) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut inner = self.shared.lock();
        let r = f(&mut inner.core, SystemTime::now());
        // Publish even on error: a failed multi-step change may have applied some steps.
        inner.publish();
        drop(inner);
        self.shared.wake.notify_one();
        r
    }

    fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        f(&self.shared.lock().core)
    }

    /// Registers a pod (selectors → SPIFFE ID) on its node and pushes its SVID to subscribers.
    pub fn register_pod(&self, reg: PodRegistration) -> Result<SpiffeId, Error> {
        let (node, pod) = (reg.node.clone(), format!("{}/{}", reg.namespace, reg.name));
        let id = self.mutate(|c, now| c.register_pod(reg, now))?;
        info!(%node, %pod, spiffe_id = %id, "pod registered");
        Ok(id)
    }

    /// Stops issuing for a pod and pushes the removal to its subscribers.
    pub fn revoke_pod(&self, namespace: &str, name: &str) -> Result<SpiffeId, Error> {
        let id = self.mutate(|c, _| c.revoke_pod(namespace, name))?;
        info!(pod = %format!("{namespace}/{name}"), spiffe_id = %id, "pod revoked");
        Ok(id)
    }

    /// Re-issues the targeted SVIDs now and pushes them; returns how many.
    pub fn rotate(&self, target: RotateTarget) -> Result<usize, Error> {
        let n = self.mutate(|c, now| c.rotate(&target, now))?;
        info!(?target, rotated = n, "forced rotation");
        Ok(n)
    }

    /// CA rotation step 1: a new root joins the bundle; the old CA still issues.
    pub fn ca_prepare(&self) -> Result<(), Error> {
        self.mutate(|c, _| c.ca_prepare())?;
        info!("ca rotation: new root prepared and added to the bundle");
        Ok(())
    }

    /// CA rotation step 2: the new CA issues; every SVID is re-issued from it.
    pub fn ca_activate(&self) -> Result<(), Error> {
        self.mutate(|c, now| c.ca_activate(now))?;
        info!("ca rotation: new root activated, svids re-issued");
        Ok(())
    }

    /// CA rotation step 3: the old root leaves the bundle.
    pub fn ca_revoke(&self) -> Result<(), Error> {
        self.mutate(|c, _| c.ca_revoke())?;
        info!("ca rotation: old root revoked");
        Ok(())
    }

    /// Federates with another trust domain: every node's Workload API and Delegated Identity
    /// API serve `roots` as that trust domain's bundle from now on (SPIRE federation, without a
    /// bundle endpoint: the caller hands the roots over).
    pub fn federate_with(
        &self,
        td: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), Error> {
        self.mutate(|c, _| c.federate(td.clone(), roots))?;
        info!(federated = %td, "federating with another trust domain");
        Ok(())
    }

    pub fn ca_phase(&self) -> CaPhase {
        self.read(Core::ca_phase)
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.read(|c| c.trust_domain().clone())
    }

    /// The roots currently served as the trust domain's bundle.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.read(|c| c.bundle().to_vec())
    }

    /// The issuing CA's root.
    pub fn active_root(&self) -> CertificateDer<'static> {
        self.read(Core::active_root)
    }

    pub fn node_svid(&self, node: &str) -> Option<Arc<Svid>> {
        self.read(|c| c.node_svid(node))
    }

    pub fn pod_svid(&self, namespace: &str, name: &str) -> Option<Arc<Svid>> {
        self.read(|c| c.pod_svid(namespace, name))
    }

    /// A pod's current SVID with its issue and rotation times.
    pub fn pod_issued(&self, namespace: &str, name: &str) -> Option<IssuedSvid> {
        self.read(|c| c.issued(namespace, name))
    }

    /// Every SVID held: node, pod, SPIFFE ID, serial, not-after, next rotation.
    pub fn status(&self) -> Vec<DevSvidStatus> {
        self.read(Core::status)
    }

    pub fn socket_path(&self, node: &str) -> Option<PathBuf> {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// Ends every stream (clients see the end and reconnect), stops serving, removes the
    /// sockets.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for mut t in tasks {
            if tokio::time::timeout(DRAIN_DEADLINE, &mut t).await.is_err() {
                warn!("dev spire task did not drain in time; aborting");
                t.abort();
            }
        }
        self.remove_sockets();
        info!("dev spire server stopped");
    }

    fn remove_sockets(&self) {
        for path in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.remove_sockets();
    }
}

fn bind(path: &Path) -> Result<UnixListener, Error> {
    let err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail with EADDRINUSE.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

async fn drive(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let next = shared.lock().core.next_rotation();
        let wait = next
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let res = {
                    let mut inner = shared.lock();
                    let res = inner.core.tick(SystemTime::now());
                    inner.publish();
                    res
                };
                match res {
                    Ok(0) => {}
                    Ok(n) => info!(rotated = n, "svids rotated"),
                    Err(e) => {
                        warn!(error = %e, "svid rotation failed; retrying");
                        tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                    }
                }
            }
            _ = shared.wake.notified() => {}
            _ = until_true(&mut shutdown) => return,
        }
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = rx.wait_for(|v| *v).await;
}

/// The gRPC services of one node.
#[derive(Clone)]
struct NodeApi {
    views: watch::Receiver<Arc<NodeView>>,
    shutdown: watch::Receiver<bool>,
}

type MsgStream<T> = ReceiverStream<Result<T, Status>>;

impl NodeApi {
    /// Streams `render(view)` now and after every view change, skipping repeats; ends with
    /// UNAVAILABLE on shutdown or when the node goes away.
    fn stream<T, F>(&self, mut render: F) -> MsgStream<T>
    where
        T: Clone + PartialEq + Send + 'static,
        F: FnMut(&NodeView) -> T + Send + 'static,
    {
        let mut views = self.views.clone();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<T> = None;
            loop {
                let view = views.borrow_and_update().clone();
                let msg = render(&view);
                if last.as_ref() != Some(&msg) {
                    if tx.send(Ok(msg.clone())).await.is_err() {
                        return;
                    }
                    last = Some(msg);
                }
                tokio::select! {
                    r = views.changed() => if r.is_err() {
                        let _ = tx.send(Err(Status::unavailable("node removed"))).await;
                        return;
                    },
                    _ = until_true(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

fn concat_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

fn workload_response(v: &NodeView) -> X509svidResponse {
    let svid = &v.node_svid;
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id().to_string(),
            x509_svid: concat_der(svid.cert_chain()),
            // The key leaves the zeroizing wrapper here: the protobuf message owns a plain
            // copy for the time it takes to encode it.
            x509_svid_key: svid.private_key().pkcs8_der().to_vec(),
            bundle: concat_der(&v.bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated_map(v),
    }
}

/// The federated trust domains' bundles, keyed by trust domain ID (`spiffe://<td>`) as SPIRE
/// does; clients accept bare names too.
fn federated_map(v: &NodeView) -> HashMap<String, Vec<u8>> {
    v.federated
        .iter()
        .map(|(td, roots)| (td.id_string(), concat_der(roots)))
        .collect()
}

/// Every bundle: this trust domain's and the federated ones.
fn bundle_map(v: &NodeView) -> HashMap<String, Vec<u8>> {
    let mut all = federated_map(v);
    all.insert(v.trust_domain.id_string(), concat_der(&v.bundle));
    all
}

fn delegated_response(v: &NodeView, selectors: &SelectorSet) -> SubscribeToX509sviDsResponse {
    SubscribeToX509sviDsResponse {
        x509_svids: v
            .pods
            .iter()
            .filter(|(reg, _)| reg.is_subset_of(selectors))
            .map(|(_, svid)| X509svidWithKey {
                x509_svid: Some(types::X509svid {
                    cert_chain: svid.cert_chain().iter().map(|c| c.to_vec()).collect(),
                    id: Some(types::Spiffeid {
                        trust_domain: svid.spiffe_id().trust_domain_name().to_owned(),
                        path: svid.spiffe_id().path().to_owned(),
                    }),
                    expires_at: svid
                        .not_after()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0),
                    hint: String::new(),
                }),
                x509_svid_key: svid.private_key().pkcs8_der().to_vec(),
            })
            .collect(),
        federates_with: Vec::new(),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for NodeApi {
    type FetchX509SVIDStream = MsgStream<X509svidResponse>;
    type FetchX509BundlesStream = MsgStream<X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(&request)?;
        Ok(Response::new(self.stream(workload_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        Ok(Response::new(self.stream(|v| X509BundlesResponse {
            crl: Vec::new(),
            bundles: bundle_map(v),
        })))
    }
}

fn check_security_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(WORKLOAD_SECURITY_HEADER) {
        Some(v) if v == "true" => Ok(()),
        // SPIRE's own wording and code for this case.
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

#[tonic::async_trait]
impl DelegatedIdentity for NodeApi {
    type SubscribeToX509SVIDsStream = MsgStream<SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = MsgStream<SubscribeToX509BundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let req = request.into_inner();
        if req.pid != 0 {
            return Err(Status::invalid_argument(
                "pid attestation is not supported by the dev server; send selectors",
            ));
        }
        let selectors = req
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value))
            .collect::<Result<Vec<_>, _>>()
            .and_then(SelectorSet::new)
            .map_err(|e| Status::invalid_argument(format!("bad selectors: {e}")))?;
        Ok(Response::new(
            self.stream(move |v| delegated_response(v, &selectors)),
        ))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _request: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        Ok(Response::new(self.stream(|v| {
            SubscribeToX509BundlesResponse {
                ca_certificates: bundle_map(v),
            }
        })))
    }
}
