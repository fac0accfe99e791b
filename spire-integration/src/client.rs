//! The agent's SPIRE client: the node SVID from the SPIFFE Workload API (through the `spiffe`
//! crate's client), the SVIDs of the node's pods from the SPIRE Delegated Identity API (one
//! subscription per selector set, through this crate's generated client), and bundles.
//! Each stream reconnects with jittered capped backoff; everything received is parsed here
//! and validated by the sans-IO [`IdentityCache`] before it reaches a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tracing::{debug, info, info_span, warn, Instrument};
use veil_identity::{
    split_der_certs, Bundles, CertificateDer, IdentityChange, IdentitySnapshot, SelectorSet, Svid,
    SvidKey, SvidPrivateKey, SvidSource, TrustDomain,
};

use crate::backoff::{Backoff, BackoffConfig};
use crate::cache::{same_content, IdentityCache, Update};
use crate::proto::delegated::delegated_identity_client::DelegatedIdentityClient;
use crate::proto::delegated::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use crate::proto::types;
use crate::{uds, Error};

/// The longest the client goes without checking its SVIDs' validity against the wall clock:
/// how long a node whose clock was stepped (back before an SVID's `notBefore`, forward past its
/// `notAfter`, or back to the right time) keeps publishing what it published before. Each
/// check is a comparison of the cached SVIDs' validity windows, nothing sent.
const CLOCK_RECHECK: Duration = Duration::from_secs(5);

/// Where the client connects and how it retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// SPIFFE Workload API socket (the node SVID is the caller's SVID there).
    pub workload_socket: PathBuf,
    /// SPIRE Delegated Identity API socket (SPIRE's admin socket; the dev server serves both
    /// APIs on one socket per node).
    pub delegated_socket: PathBuf,
    pub backoff: BackoffConfig,
}

impl ClientConfig {
    /// Both APIs on one socket, as the dev server serves them.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        Self {
            workload_socket: socket.clone(),
            delegated_socket: socket,
            backoff: BackoffConfig::default(),
        }
    }

    /// A real spire-agent: the Workload API on its `socket_path`, the Delegated Identity API
    /// on its `admin_socket_path` (two sockets; spire-agent refuses an admin socket in the
    /// Workload API socket's directory).
    pub fn spire_agent(
        workload_socket: impl Into<PathBuf>,
        admin_socket: impl Into<PathBuf>,
    ) -> Self {
        Self {
            workload_socket: workload_socket.into(),
            delegated_socket: admin_socket.into(),
            backoff: BackoffConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        for (what, p) in [
            ("workload_socket", &self.workload_socket),
            ("delegated_socket", &self.delegated_socket),
        ] {
            if p.as_os_str().is_empty() {
                return Err(Error::Config(format!("{what} is empty")));
            }
        }
        if self.backoff.initial.is_zero() || self.backoff.initial > self.backoff.max {
            return Err(Error::Config(format!(
                "backoff initial {:?} must be non-zero and at most max {:?}",
                self.backoff.initial, self.backoff.max
            )));
        }
        Ok(())
    }
}

/// Which stream an update came from; workload subscriptions carry their generation so a
/// message from a cancelled subscription is never applied.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Node,
    Bundles,
    Workload(SelectorSet, u64),
}

type Tx = mpsc::Sender<(Origin, Update)>;

/// The handle the agent keeps: subscribe to snapshots, say which pods to fetch SVIDs for.
#[derive(Clone)]
pub struct IdentityClientHandle {
    snapshots: Arc<watch::Sender<IdentitySnapshot>>,
    watched: Arc<watch::Sender<BTreeSet<SelectorSet>>>,
}

impl std::fmt::Debug for IdentityClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityClientHandle")
            .field("generation", &self.snapshots.borrow().generation)
            .finish()
    }
}

impl IdentityClientHandle {
    /// The current snapshot.
    pub fn current(&self) -> IdentitySnapshot {
        self.snapshots.borrow().clone()
    }
}

impl SvidSource for IdentityClientHandle {
    fn subscribe(&self) -> watch::Receiver<IdentitySnapshot> {
        self.snapshots.subscribe()
    }

    fn watch_workload(&self, selectors: SelectorSet) {
        self.watched.send_if_modified(|w| w.insert(selectors));
    }

    fn unwatch_workload(&self, selectors: &SelectorSet) {
        self.watched.send_if_modified(|w| w.remove(selectors));
    }
}

/// The client component: `new` then `run` (spawned by the agent in one place).
pub struct IdentityClient {
    cfg: ClientConfig,
    snapshots: Arc<watch::Sender<IdentitySnapshot>>,
    watched: watch::Receiver<BTreeSet<SelectorSet>>,
}

impl IdentityClient {
    pub fn new(cfg: ClientConfig) -> Result<(IdentityClient, IdentityClientHandle), Error> {
        cfg.validate()?;
        let snapshots = Arc::new(watch::Sender::new(IdentitySnapshot::default()));
        let (watched_tx, watched) = watch::channel(BTreeSet::new());
        let handle = IdentityClientHandle {
            snapshots: snapshots.clone(),
            watched: Arc::new(watched_tx),
        };
        Ok((
            IdentityClient {
                cfg,
                snapshots,
                watched,
            },
            handle,
        ))
    }

    /// Runs until `shutdown` completes. Never returns an error: unreachable sockets are
    /// retried forever, and what is held follows the cache's rules meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let IdentityClient {
            cfg,
            snapshots,
            mut watched,
        } = self;
        let (tx, mut rx) = mpsc::channel::<(Origin, Update)>(64);
        let mut fixed = vec![
            tokio::spawn(
                node_stream(cfg.workload_socket.clone(), cfg.backoff.clone(), tx.clone())
                    .instrument(
                        info_span!("workload_api", socket = %cfg.workload_socket.display()),
                    ),
            ),
            tokio::spawn(
                bundle_stream(
                    cfg.delegated_socket.clone(),
                    cfg.backoff.clone(),
                    tx.clone(),
                )
                .instrument(
                    info_span!("delegated_bundles", socket = %cfg.delegated_socket.display()),
                ),
            ),
        ];
        let mut subs = Subscriptions {
            socket: cfg.delegated_socket.clone(),
            backoff: cfg.backoff.clone(),
            tx: tx.clone(),
            running: BTreeMap::new(),
            next_id: 0,
        };
        let mut cache = IdentityCache::new();
        let mut watching = true;
        subs.sync(&watched.borrow_and_update(), &mut cache);
        tokio::pin!(shutdown);

        loop {
            publish(&mut cache, &snapshots);
            let now = SystemTime::now();
            // The deadline is on the wall clock, the sleep on the monotonic one: a wall clock
            // stepped (NTP, by hand) after this point would leave the sleep wrong, so the
            // validity of every SVID is looked at again at least every CLOCK_RECHECK.
            let wait = cache
                .next_deadline(now)
                .map(|d| d.duration_since(now).unwrap_or_default())
                .unwrap_or(CLOCK_RECHECK)
                .min(CLOCK_RECHECK);
            tokio::select! {
                _ = &mut shutdown => break,
                Some((origin, update)) = rx.recv() => {
                    if subs.is_current(&origin) {
                        cache.apply(update);
                    }
                }
                r = watched.changed(), if watching => match r {
                    Ok(()) => subs.sync(&watched.borrow_and_update(), &mut cache),
                    // Every handle is gone: nobody can change the set any more; keep it.
                    Err(_) => watching = false,
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        for t in fixed.drain(..) {
            t.abort();
        }
        for (_, (_, t)) in std::mem::take(&mut subs.running) {
            t.abort();
        }
        info!("spire client stopped");
    }
}

/// The running Delegated Identity subscriptions, one per watched selector set.
struct Subscriptions {
    socket: PathBuf,
    backoff: BackoffConfig,
    tx: Tx,
    running: BTreeMap<SelectorSet, (u64, JoinHandle<()>)>,
    next_id: u64,
}

impl Subscriptions {
    /// Starts subscriptions for new sets, stops those no longer wanted (their SVIDs leave the
    /// cache at once).
    fn sync(&mut self, want: &BTreeSet<SelectorSet>, cache: &mut IdentityCache) {
        let gone: Vec<SelectorSet> = self
            .running
            .keys()
            .filter(|s| !want.contains(*s))
            .cloned()
            .collect();
        for sel in gone {
            if let Some((_, task)) = self.running.remove(&sel) {
                task.abort();
            }
            cache.apply(Update::Unwatched(sel));
        }
        for sel in want {
            if self.running.contains_key(sel) {
                continue;
            }
            self.next_id += 1;
            let task = tokio::spawn(
                workload_stream(
                    self.socket.clone(),
                    sel.clone(),
                    self.next_id,
                    self.backoff.clone(),
                    self.tx.clone(),
                )
                .instrument(info_span!("delegated_svids", selectors = %sel)),
            );
            self.running.insert(sel.clone(), (self.next_id, task));
        }
    }

    /// Whether an update comes from a live stream (not from a cancelled subscription whose
    /// message was already queued).
    fn is_current(&self, origin: &Origin) -> bool {
        match origin {
            Origin::Workload(sel, id) => self.running.get(sel).is_some_and(|(i, _)| i == id),
            Origin::Node | Origin::Bundles => true,
        }
    }
}

/// Publishes the cache's snapshot if its content changed, logging what changed.
fn publish(cache: &mut IdentityCache, snapshots: &watch::Sender<IdentitySnapshot>) {
    let next = cache.snapshot(SystemTime::now());
    snapshots.send_if_modified(|cur| {
        if same_content(cur, &next) {
            return false;
        }
        for change in next.diff(cur) {
            match change {
                IdentityChange::Updated { key, svids } => {
                    for s in svids {
                        info!(slot = %slot_name(&key), spiffe_id = %s.spiffe_id(),
                              serial = s.serial(), "svid published");
                    }
                }
                IdentityChange::Removed { key, spiffe_ids } => {
                    info!(slot = %slot_name(&key), ?spiffe_ids, "svid removed");
                }
                IdentityChange::BundlesChanged => {
                    info!(trust_domains = next.bundles.len(), "bundles updated");
                }
            }
        }
        let generation = cur.generation + 1;
        *cur = IdentitySnapshot { generation, ..next };
        true
    });
}

fn slot_name(key: &SvidKey) -> String {
    match key {
        SvidKey::Node => "node".to_owned(),
        SvidKey::Workload(sel) => sel.to_string(),
    }
}

/// Reconnect state of one stream: backoff, and whether an outage is being reported (warn once
/// per outage, debug while it lasts, info on recovery).
struct Reconnect {
    what: &'static str,
    backoff: Backoff,
    in_outage: bool,
}

type Shared = Arc<std::sync::Mutex<Reconnect>>;

fn on_message(r: &Shared) {
    let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
    r.backoff.reset();
    if r.in_outage {
        info!("{} reachable again", r.what);
        r.in_outage = false;
    }
}

async fn retry_forever<F, Fut>(what: &'static str, backoff: BackoffConfig, mut once: F)
where
    F: FnMut(Shared) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let state: Shared = Arc::new(std::sync::Mutex::new(Reconnect {
        what,
        backoff: Backoff::new(backoff),
        in_outage: false,
    }));
    loop {
        let e = once(state.clone())
            .await
            .err()
            .unwrap_or(Error::StreamEnded);
        let delay = {
            let mut r = state.lock().unwrap_or_else(|p| p.into_inner());
            if r.in_outage {
                debug!(error = %chain(&e), "{what} still unreachable");
            } else {
                warn!(error = %chain(&e), "{what} unreachable; keeping last good identities until they expire");
                r.in_outage = true;
            }
            r.backoff.next_delay(&mut rand::rng())
        };
        tokio::time::sleep(delay).await;
    }
}

/// An error with its sources, so a log line names the cause (the gRPC status SPIRE sent, e.g.
/// permission denied "no identity issued"; a missing socket), not only "grpc call failed".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn node_stream(path: PathBuf, backoff: BackoffConfig, tx: Tx) {
    retry_forever("workload api", backoff, |b| {
        let (path, tx) = (path.clone(), tx.clone());
        async move {
            let client = spiffe::WorkloadApiClient::connect_to(unix_endpoint(&path))
                .await
                .map_err(Error::WorkloadApi)?;
            let stream = client
                .stream_x509_contexts()
                .await
                .map_err(Error::WorkloadApi)?;
            tokio::pin!(stream);
            forward(stream, Error::WorkloadApi, &b, &tx, |ctx| {
                let update = usable(context_update(&ctx), "workload api response")?;
                Some((Origin::Node, update))
            })
            .await
        }
    })
    .await
}

/// Sends what `convert` makes of each message of `stream` (a message it refuses is skipped),
/// reporting the server reachable at each message. Returns at the stream's end or error, or
/// when the receiver is gone.
async fn forward<S, M, E>(
    mut stream: S,
    err: impl Fn(E) -> Error,
    b: &Shared,
    tx: &Tx,
    mut convert: impl FnMut(M) -> Option<(Origin, Update)>,
) -> Result<(), Error>
where
    S: tokio_stream::Stream<Item = Result<M, E>> + Unpin,
{
    while let Some(item) = stream.next().await {
        let message = item.map_err(&err)?;
        on_message(b);
        let Some(update) = convert(message) else {
            continue;
        };
        if tx.send(update).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// A response that cannot be used is skipped with a warning; the stream goes on.
fn usable(update: Result<Update, Error>, what: &str) -> Option<Update> {
    update
        .map_err(|e| warn!(error = %e, "ignoring {what}"))
        .ok()
}

/// A Delegated Identity API client on the admin socket at `path`.
async fn delegated_client(
    path: &Path,
) -> Result<DelegatedIdentityClient<tonic::transport::Channel>, Error> {
    let channel = uds::connect(path).await.map_err(|source| Error::Connect {
        path: path.to_owned(),
        source,
    })?;
    Ok(DelegatedIdentityClient::new(channel))
}

fn rpc_error(s: tonic::Status) -> Error {
    Error::Rpc(Box::new(s))
}

fn unix_endpoint(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// A Workload API response as one update; any unusable SVID or bundle voids the whole
/// response (the first SVID is the node's, so dropping one would promote another).
fn context_update(ctx: &spiffe::X509Context) -> Result<Update, Error> {
    let svids = ctx
        .svids()
        .iter()
        .map(|s| {
            let chain = s
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect();
            let key = SvidPrivateKey::from_pkcs8_der(s.private_key().as_bytes().to_vec());
            Svid::from_der(chain, key).map_err(Error::BadSvid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut bundles = Bundles::new();
    for (td, bundle) in ctx.bundle_set().iter() {
        let td = TrustDomain::new(td.as_str()).map_err(Error::BadTrustDomain)?;
        let roots = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        bundles.insert(td, roots).map_err(Error::BadBundle)?;
    }
    Ok(Update::Node { svids, bundles })
}

async fn bundle_stream(path: PathBuf, backoff: BackoffConfig, tx: Tx) {
    retry_forever("delegated identity api (bundles)", backoff, |b| {
        let (path, tx) = (path.clone(), tx.clone());
        async move {
            let stream = delegated_client(&path)
                .await?
                .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            forward(stream, rpc_error, &b, &tx, |resp| {
                let update = usable(bundles_update(&resp), "bundle update")?;
                Some((Origin::Bundles, update))
            })
            .await
        }
    })
    .await
}

fn bundles_update(resp: &SubscribeToX509BundlesResponse) -> Result<Update, Error> {
    let mut bundles = Bundles::new();
    for (key, der) in &resp.ca_certificates {
        let td = TrustDomain::from_bundle_key(key).map_err(Error::BadTrustDomain)?;
        let roots = split_der_certs(&td, der).map_err(Error::BadBundle)?;
        bundles.insert(td, roots).map_err(Error::BadBundle)?;
    }
    Ok(Update::Bundles(bundles))
}

async fn workload_stream(
    path: PathBuf,
    selectors: SelectorSet,
    id: u64,
    backoff: BackoffConfig,
    tx: Tx,
) {
    retry_forever("delegated identity api (svids)", backoff, |b| {
        let (path, tx, selectors) = (path.clone(), tx.clone(), selectors.clone());
        async move {
            let request = SubscribeToX509sviDsRequest {
                selectors: selectors
                    .iter()
                    .map(|s| types::Selector {
                        r#type: s.kind().to_owned(),
                        value: s.value().to_owned(),
                    })
                    .collect(),
                pid: 0,
            };
            let stream = delegated_client(&path)
                .await?
                .subscribe_to_x509svi_ds(request)
                .await
                .map_err(rpc_error)?
                .into_inner();
            forward(stream, rpc_error, &b, &tx, |resp| {
                let svids = delegated_svids(&resp)?;
                let update = Update::Workload {
                    selectors: selectors.clone(),
                    svids,
                };
                Some((Origin::Workload(selectors.clone(), id), update))
            })
            .await
        }
    })
    .await
}

/// The SVIDs of a Delegated Identity response. An empty list is an explicit removal; a
/// non-empty list none of whose entries is usable is ignored (`None`), so a corrupt message
/// cannot remove a good identity — only the server saying "none" can.
fn delegated_svids(resp: &SubscribeToX509sviDsResponse) -> Option<Vec<Svid>> {
    let mut out = Vec::new();
    for entry in &resp.x509_svids {
        let Some(x) = &entry.x509_svid else {
            warn!("delegated svid without certificate chain; skipped");
            continue;
        };
        let chain = x
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = SvidPrivateKey::from_pkcs8_der(entry.x509_svid_key.clone());
        match Svid::from_der(chain, key) {
            Ok(svid) => out.push(svid),
            Err(e) => warn!(error = %e, "delegated svid unusable; skipped"),
        }
    }
    if out.is_empty() && !resp.x509_svids.is_empty() {
        warn!("no usable svid in delegated identity response; keeping the previous ones");
        return None;
    }
    Some(out)
}
