//! The established control channel (tokio shell around the sans-IO handshakes): one
//! long-lived TLS connection per node pair, node handshake first, then any number of workload
//! handshakes multiplexed by request id in both directions, plus revocations, re-key requests
//! and keepalives. Shared by [`super::server`] and [`super::client`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use veil_identity::{BundleSet, SpiffeId, TrustDomain, ValidatedSvid};
use veil_transport::PublicKey;

use super::node_handshake::{EpochBook, NodeHandshake, NodeKeys, Progress};
use super::tls::{Exporter, KxGroup, NodeCredentials};
use super::wire::{self, Message};
use super::workload::{self, Authenticated, Context, Initiator, SessionBinding, SigningKeys};
use super::{AuthFailure, AuthTriple, Error, LocalWorkloads, NodeInfo, PeerDirectory};

/// Timeouts and limits of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// TCP connect + TLS handshake + node handshake, for a connection that has not
    /// authenticated yet (slowloris bound).
    pub handshake_timeout: Duration,
    /// Once a frame's length arrived, its body must arrive within this.
    pub frame_timeout: Duration,
    /// No frame at all for this long closes the channel (keepalives flow every `ping_interval`).
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    /// One workload handshake, request to verified response.
    pub request_timeout: Duration,
    /// Outstanding workload handshakes we initiated on one channel.
    pub max_in_flight: usize,
    /// Workload requests a peer may send per second on one channel (token bucket, refill
    /// rate); more are answered `rate-limited` before any certificate is parsed.
    pub inbound_rate: u32,
    /// The bucket's depth: a burst a peer may send at once (a policy change that makes
    /// thousands of pairs need authentication at one instant).
    pub inbound_burst: u32,
    /// At most one re-key request per this interval is acted on; more are ignored.
    pub rekey_request_interval: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(45),
            ping_interval: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            inbound_rate: 2000,
            inbound_burst: 4096,
            rekey_request_interval: Duration::from_secs(1),
        }
    }
}

/// This node as the channel presents it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub id: u32,
}

/// What both shells share: identity, cluster view, keys, and where events go.
#[derive(Clone)]
pub struct Deps {
    pub local: LocalNode,
    pub trust_domain: TrustDomain,
    pub creds: NodeCredentials,
    pub bundles: BundleSet,
    pub directory: Arc<dyn PeerDirectory>,
    pub workloads: Arc<dyn LocalWorkloads>,
    /// This node's current WireGuard public key (static-key rotation swaps it).
    pub wg_key: Arc<ArcSwap<PublicKey>>,
    pub epochs: Arc<EpochBook>,
    pub signing_keys: Arc<SigningKeys>,
    pub events: mpsc::Sender<ChannelEvent>,
    /// Each node's WireGuard public key as this node has read it from cluster state.
    pub published: watch::Receiver<PublishedKeys>,
}

/// Node name → the WireGuard public keys that node published: the one in use and, ahead of a
/// static key rotation, the next one. A node handshake may claim either.
pub type PublishedKeys = std::collections::BTreeMap<String, Vec<PublicKey>>;

/// How long a completed node handshake whose claimed key this node has not read yet waits for
/// the publication before it is refused (`unpublished-wg-key`).
pub const PUBLICATION_WAIT: Duration = Duration::from_secs(5);

/// Waits, at most `within`, until `claimed` is among `node`'s published keys (or the node has
/// published none yet). A node that rotates its static key publishes the new key before it
/// uses it, but cluster state reaches this node on its own schedule: the handshake that
/// announces the key can arrive first. Returns whether the publication was seen; the caller
/// still makes the final check.
pub async fn await_publication(
    published: &watch::Receiver<PublishedKeys>,
    node: &str,
    claimed: &PublicKey,
    within: Duration,
) -> bool {
    let mut rx = published.clone();
    let seen = timeout(
        within,
        rx.wait_for(|m| m.get(node).is_none_or(|p| p.contains(claimed))),
    )
    .await;
    matches!(seen, Ok(Ok(_)))
}

/// What a channel tells the daemon.
#[derive(Debug)]
pub enum ChannelEvent {
    /// The server side established a channel: install `keys` in the tunnel, keep `channel`.
    Established {
        channel: Channel,
        keys: NodeKeys,
    },
    /// A peer ran a workload handshake with us as responder: on success write the entry
    /// (`AuthTable::on_authenticated`); on failure count the reason.
    Inbound {
        peer_node: u32,
        /// When the request was answered: a revocation after this instant wins over the
        /// result, however late the result reaches the mesh.
        at: Instant,
        triple: AuthTriple,
        result: Result<Authenticated, AuthFailure>,
    },
    /// The peer revoked one of its workloads' SVIDs (`AuthTable::remove_remote_spiffe_id`).
    RemoteRevoked {
        peer_node: u32,
        spiffe_id: SpiffeId,
    },
    /// The peer asks for a new node handshake (its node SVID rotated).
    RekeyRequested {
        peer_node: u32,
    },
    Closed {
        peer_node: u32,
        reason: String,
    },
}

/// The async I/O of an authenticated TLS stream, with its exporter.
pub trait TlsIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn exporter(&self) -> &dyn Exporter;
    fn common(&self) -> &rustls::CommonState;
}

/// [`TlsIo`] for tokio-rustls' client and server streams: two types with no common trait, whose
/// connections both deref to the exporter and the common state.
macro_rules! impl_tls_io {
    ($($side:ident),*) => {$(
        impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsIo
            for tokio_rustls::$side::TlsStream<IO>
        {
            fn exporter(&self) -> &dyn Exporter {
                &**self.get_ref().1
            }
            fn common(&self) -> &rustls::CommonState {
                self.get_ref().1
            }
        }
    )*};
}

impl_tls_io!(client, server);

/// Why reading a frame stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed")]
    Eof,
    #[error("read timed out")]
    Timeout,
    #[error("read failed")]
    Io(#[source] std::io::Error),
    #[error("bad frame")]
    Wire(#[source] wire::Error),
}

/// Reads one frame: the length within `header_deadline`, the body within `frame_timeout`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    header_deadline: Instant,
    frame_timeout: Duration,
    buf: &mut Vec<u8>,
) -> Result<Message, ReadError> {
    let mut header = [0u8; wire::HEADER_LEN];
    read_outcome(timeout_at(header_deadline, r.read_exact(&mut header)).await)?;
    let len = wire::parse_header(header).map_err(ReadError::Wire)?;
    buf.resize(len, 0);
    read_outcome(timeout(frame_timeout, r.read_exact(&mut buf[..len])).await)?;
    wire::decode_body(&buf[..len]).map_err(ReadError::Wire)
}

/// A timed `read_exact` as a [`ReadError`]: timed out, closed early or failed.
fn read_outcome(
    read: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
) -> Result<(), ReadError> {
    match read {
        Err(_) => Err(ReadError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Eof),
        Ok(Err(e)) => Err(ReadError::Io(e)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Reads one frame, header and body, before `deadline`: the node handshake's bound. With
/// [`read_frame`] alone the body gets its own `frame_timeout` after the header, so a peer that
/// sends a length just before the deadline would hold its unauthenticated slot a frame timeout
/// longer than the handshake timeout allows.
pub(crate) async fn read_frame_before<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: Instant,
    frame_timeout: Duration,
    buf: &mut Vec<u8>,
) -> Result<Message, ReadError> {
    timeout_at(deadline, read_frame(r, deadline, frame_timeout, buf))
        .await
        .unwrap_or(Err(ReadError::Timeout))
}

fn read_error(peer: &str, e: ReadError, stage: &'static str) -> Error {
    match e {
        ReadError::Eof => Error::Closed {
            peer: peer.to_owned(),
        },
        ReadError::Timeout => Error::Timeout {
            peer: peer.to_owned(),
            stage,
        },
        ReadError::Io(source) => Error::Io {
            peer: peer.to_owned(),
            source,
        },
        ReadError::Wire(source) => Error::Wire {
            peer: peer.to_owned(),
            source,
        },
    }
}

/// Runs the node handshake on a fresh TLS stream, then starts the channel's tasks.
pub(crate) async fn establish<S: TlsIo>(
    mut stream: S,
    peer: NodeInfo,
    peer_svid: ValidatedSvid,
    cfg: &ChannelConfig,
    deps: &Deps,
    deadline: Instant,
) -> Result<(Channel, NodeKeys), Error> {
    let name = peer.name.clone();
    let hs_err = |source| Error::NodeHandshake {
        peer: name.clone(),
        source,
    };
    let (mut hs, hello) = NodeHandshake::start(
        &deps.local.name,
        **deps.wg_key.load(),
        deps.epochs.propose(&peer.name),
        &peer.name,
    )
    .map_err(hs_err)?;
    write_msg(&mut stream, &hello, deadline, &peer.name).await?;
    let mut buf = Vec::new();
    let keys = loop {
        let msg = read_frame_before(&mut stream, deadline, cfg.frame_timeout, &mut buf)
            .await
            .map_err(|e| read_error(&peer.name, e, "node handshake"))?;
        match hs.handle(msg, stream.exporter()).map_err(hs_err)? {
            Progress::Send(m) => write_msg(&mut stream, &m, deadline, &peer.name).await?,
            Progress::Established(keys) => break keys,
        }
    };
    deps.epochs.record(&peer.name, keys.epoch);
    let binding =
        SessionBinding::from_exporter(stream.exporter()).map_err(|e| Error::NodeHandshake {
            peer: peer.name.clone(),
            source: super::node_handshake::Error::Exporter(e),
        })?;
    let group = super::tls::negotiated_group(stream.common());
    let channel = Channel::spawn(
        stream,
        peer,
        peer_svid,
        group,
        keys.epoch,
        binding,
        cfg.clone(),
        deps.clone(),
    );
    Ok((channel, keys))
}

async fn write_msg<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &Message,
    deadline: Instant,
    peer: &str,
) -> Result<(), Error> {
    let frame = wire::encode(msg);
    let res = timeout_at(deadline, async {
        stream.write_all(&frame).await?;
        stream.flush().await
    })
    .await;
    match res {
        Err(_) => Err(Error::Timeout {
            peer: peer.to_owned(),
            stage: "node handshake",
        }),
        Ok(Err(source)) => Err(Error::Io {
            peer: peer.to_owned(),
            source,
        }),
        Ok(Ok(())) => Ok(()),
    }
}

struct Inner {
    peer: NodeInfo,
    peer_svid: ValidatedSvid,
    /// The chain the peer presented in TLS (leaf first), kept to re-validate the channel when
    /// the trust bundles change (`Channel::recheck`).
    peer_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    group: Option<KxGroup>,
    epoch: u64,
    binding: SessionBinding,
    cfg: ChannelConfig,
    deps: Deps,
    out: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u32, oneshot::Sender<wire::AuthResponse>>>,
    next_id: AtomicU32,
    in_flight: Semaphore,
    closed: watch::Sender<bool>,
    is_closed: AtomicBool,
}

impl Inner {
    fn close(&self) {
        self.is_closed.store(true, Ordering::SeqCst);
        self.closed.send_replace(true);
        // Waiters see their sender dropped: PeerUnreachable.
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn context(&self) -> Context<'_> {
        Context {
            trust_domain: &self.deps.trust_domain,
            bundles: &self.deps.bundles,
            directory: &*self.deps.directory,
            local_node: self.deps.local.id,
            peer_node: self.peer.id,
            binding: self.binding,
            now: SystemTime::now(),
        }
    }
}

/// A live, node-authenticated channel to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.inner.peer.name)
            .field("group", &self.inner.group)
            .field("epoch", &self.inner.epoch)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Removes a pending request when its waiter gives up.
struct PendingGuard<'a>(&'a Inner, u32);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl Channel {
    #[allow(clippy::too_many_arguments)]
    fn spawn<S: TlsIo>(
        stream: S,
        peer: NodeInfo,
        peer_svid: ValidatedSvid,
        group: Option<KxGroup>,
        epoch: u64,
        binding: SessionBinding,
        cfg: ChannelConfig,
        deps: Deps,
    ) -> Self {
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (closed, _) = watch::channel(false);
        let peer_chain = stream
            .common()
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            peer,
            peer_svid,
            peer_chain,
            group,
            epoch,
            binding,
            in_flight: Semaphore::new(cfg.max_in_flight),
            cfg,
            deps,
            out: out_tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed,
            is_closed: AtomicBool::new(false),
        });
        let (rd, wr) = tokio::io::split(stream);
        tokio::spawn(write_loop(wr, out_rx, inner.clone()));
        tokio::spawn(read_loop(rd, inner.clone()));
        Self { inner }
    }

    pub fn peer(&self) -> &NodeInfo {
        &self.inner.peer
    }

    /// The TLS key exchange group (X25519MLKEM768 unless classical was allowed and chosen).
    pub fn negotiated_group(&self) -> Option<KxGroup> {
        self.inner.group
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// When the peer node SVID that authenticated this channel stops validating (feed it to
    /// `RekeySchedule::on_established`).
    pub fn peer_valid_until(&self) -> SystemTime {
        self.inner.peer_svid.valid_until
    }

    /// Re-validates the node SVID that authenticated this channel against `bundles` (they
    /// changed: a CA was revoked, a root removed). `Err` says the peer no longer proves its
    /// identity: the caller closes the channel and drops the peer's tunnel keys.
    pub fn recheck(&self, bundles: &BundleSet, now: SystemTime) -> Result<(), AuthFailure> {
        let v = veil_identity::validate_x509_svid(&self.inner.peer_chain, bundles, now)
            .map_err(|e| AuthFailure::from_svid_error(&e))?;
        if v.spiffe_id != self.inner.peer_svid.spiffe_id {
            return Err(AuthFailure::WrongSpiffeId);
        }
        Ok(())
    }

    /// Serial of the peer node SVID that authenticated this channel (for `veil status`).
    pub fn peer_svid_serial(&self) -> &str {
        &self.inner.peer_svid.serial
    }

    pub fn is_closed(&self) -> bool {
        self.inner.is_closed.load(Ordering::SeqCst)
    }

    /// Resolves when the channel is closed (by either side or an error).
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Closes the channel (TLS close_notify, then the socket).
    pub fn close(&self) {
        self.inner.close();
    }

    /// Runs one workload handshake as initiator: proves our workload with numeric identity
    /// `local_identity` to the peer and checks its workload with `remote_identity`.
    pub async fn authenticate(
        &self,
        local_identity: u32,
        remote_identity: u32,
    ) -> Result<Authenticated, AuthFailure> {
        let inner = &*self.inner;
        if self.is_closed() {
            return Err(AuthFailure::PeerUnreachable);
        }
        let svid = inner
            .deps
            .workloads
            .svid_for(local_identity)
            .ok_or(AuthFailure::NoLocalSvid)?;
        let _permit = timeout(inner.cfg.request_timeout, inner.in_flight.acquire())
            .await
            .map_err(|_| AuthFailure::Timeout)?
            .map_err(|_| AuthFailure::PeerUnreachable)?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 32];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| AuthFailure::ProtocolError)?;
        let (init, req) = Initiator::start(
            id,
            nonce,
            local_identity,
            remote_identity,
            svid,
            &inner.deps.signing_keys,
            &inner.context(),
        )?;
        let (tx, rx) = oneshot::channel();
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let _guard = PendingGuard(inner, id);
        inner
            .out
            .send(Message::AuthRequest(req))
            .await
            .map_err(|_| AuthFailure::PeerUnreachable)?;
        let resp = match timeout(inner.cfg.request_timeout, rx).await {
            Err(_) => return Err(AuthFailure::Timeout),
            Ok(Err(_)) => return Err(AuthFailure::PeerUnreachable),
            Ok(Ok(r)) => r,
        };
        init.finish(resp, &inner.context())
    }

    /// Tells the peer one of our workloads' SVIDs was revoked or removed.
    pub async fn send_revoke(&self, spiffe_id: &SpiffeId) -> Result<(), AuthFailure> {
        self.inner
            .out
            .send(Message::Revoke {
                spiffe_id: spiffe_id.to_string(),
            })
            .await
            .map_err(|_| AuthFailure::PeerUnreachable)
    }

    /// Asks the dialling side for a new node handshake (our node SVID rotated).
    pub async fn request_rekey(&self) -> Result<(), AuthFailure> {
        self.inner
            .out
            .send(Message::RekeyRequest)
            .await
            .map_err(|_| AuthFailure::PeerUnreachable)
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Message>,
    inner: Arc<Inner>,
) {
    let mut closed = inner.closed.subscribe();
    let mut ping = tokio::time::interval(inner.cfg.ping_interval);
    ping.tick().await;
    let mut seq = 0u64;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = ping.tick() => { seq += 1; Message::Ping(seq) }
            _ = closed.wait_for(|c| *c) => break,
        };
        buf.clear();
        buf.extend_from_slice(&wire::encode(&first));
        // Batch what is already queued into one TLS write: many small handshake frames per
        // syscall under load.
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(m) => buf.extend_from_slice(&wire::encode(&m)),
                Err(_) => break,
            }
        }
        let res = timeout(inner.cfg.frame_timeout, async {
            wr.write_all(&buf).await?;
            wr.flush().await
        })
        .await;
        if !matches!(res, Ok(Ok(()))) {
            break;
        }
    }
    let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
    inner.close();
}

/// Admission of the requests a peer drives on one channel (security issue §6): a token bucket
/// for workload requests, a record of their recent nonces (a repeated nonce is a replayed
/// request), and a floor between re-key requests. Sans-IO; the read loop owns one.
#[derive(Debug)]
pub(crate) struct InboundGuard {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    nonces: std::collections::HashSet<[u8; 32]>,
    nonce_order: std::collections::VecDeque<[u8; 32]>,
    rekey_interval: Duration,
    last_rekey: Option<Instant>,
}

/// Nonces of this many recent workload requests are remembered per channel.
const NONCES_KEPT: usize = 8192;

impl InboundGuard {
    pub(crate) fn new(cfg: &ChannelConfig, now: Instant) -> Self {
        Self {
            rate: f64::from(cfg.inbound_rate.max(1)),
            burst: f64::from(cfg.inbound_burst.max(1)),
            tokens: f64::from(cfg.inbound_burst.max(1)),
            refilled: now,
            nonces: Default::default(),
            nonce_order: Default::default(),
            rekey_interval: cfg.rekey_request_interval,
            last_rekey: None,
        }
    }

    /// A workload request arrived: `Err` says how to refuse it. Cheap: no certificate or
    /// signature is looked at.
    pub(crate) fn admit_request(
        &mut self,
        nonce: &[u8; 32],
        now: Instant,
    ) -> Result<(), AuthFailure> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            return Err(AuthFailure::RateLimited);
        }
        self.tokens -= 1.0;
        if !self.nonces.insert(*nonce) {
            return Err(AuthFailure::ProtocolError);
        }
        self.nonce_order.push_back(*nonce);
        if self.nonce_order.len() > NONCES_KEPT {
            if let Some(old) = self.nonce_order.pop_front() {
                self.nonces.remove(&old);
            }
        }
        Ok(())
    }

    /// A re-key request arrived: act on it only if the last one was long enough ago.
    pub(crate) fn admit_rekey(&mut self, now: Instant) -> bool {
        if self
            .last_rekey
            .is_some_and(|t| now.saturating_duration_since(t) < self.rekey_interval)
        {
            return false;
        }
        self.last_rekey = Some(now);
        true
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, inner: Arc<Inner>) {
    let mut buf = Vec::new();
    let mut guard = InboundGuard::new(&inner.cfg, Instant::now());
    let mut closed = inner.closed.subscribe();
    let peer_node = inner.peer.id;
    let reason = loop {
        let deadline = Instant::now() + inner.cfg.idle_timeout;
        let msg = tokio::select! {
            r = read_frame(&mut rd, deadline, inner.cfg.frame_timeout, &mut buf) => r,
            _ = closed.wait_for(|c| *c) => break "closed locally".to_owned(),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => break crate::error_chain(&e),
        };
        match msg {
            Message::AuthRequest(req) => {
                let triple = AuthTriple {
                    local_identity: req.responder_identity,
                    remote_identity: req.initiator_identity,
                    remote_node: peer_node,
                };
                let at = Instant::now();
                let (resp, result) = match guard.admit_request(&req.nonce, at) {
                    Ok(()) => workload::respond(
                        &req,
                        &*inner.deps.workloads,
                        &inner.deps.signing_keys,
                        &inner.context(),
                    ),
                    Err(refused) => (
                        wire::AuthResponse {
                            id: req.id,
                            result: Err(refused),
                        },
                        Err(refused),
                    ),
                };
                if inner.out.send(Message::AuthResponse(resp)).await.is_err() {
                    break "writer gone".to_owned();
                }
                let _ = inner
                    .deps
                    .events
                    .send(ChannelEvent::Inbound {
                        peer_node,
                        at,
                        triple,
                        result,
                    })
                    .await;
            }
            Message::AuthResponse(resp) => {
                let waiter = inner
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&resp.id);
                // A response nobody waits for (timed out) is dropped.
                if let Some(w) = waiter {
                    let _ = w.send(resp);
                }
            }
            Message::Revoke { spiffe_id } => match SpiffeId::parse(&spiffe_id) {
                Ok(spiffe_id) => {
                    let _ = inner
                        .deps
                        .events
                        .send(ChannelEvent::RemoteRevoked {
                            peer_node,
                            spiffe_id,
                        })
                        .await;
                }
                Err(_) => break "revoke with an invalid spiffe id".to_owned(),
            },
            Message::RekeyRequest => {
                if !guard.admit_rekey(Instant::now()) {
                    tracing::debug!(peer = %inner.peer.name, "re-key request ignored (too soon after the last)");
                    continue;
                }
                let _ = inner
                    .deps
                    .events
                    .send(ChannelEvent::RekeyRequested { peer_node })
                    .await;
            }
            Message::Ping(n) => {
                if inner.out.send(Message::Pong(n)).await.is_err() {
                    break "writer gone".to_owned();
                }
            }
            Message::Pong(_) => {}
            Message::Hello(_) | Message::Confirm(_) => {
                break "node handshake message on an established channel".to_owned()
            }
        }
    };
    inner.close();
    tracing::debug!(peer = %inner.peer.name, %reason, "control channel closed");
    let _ = inner
        .deps
        .events
        .send(ChannelEvent::Closed { peer_node, reason })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn inbound_requests_are_rate_limited_and_replays_refused() {
        let cfg = ChannelConfig {
            inbound_rate: 100,
            inbound_burst: 10,
            ..ChannelConfig::default()
        };
        let t0 = Instant::now();
        let mut g = InboundGuard::new(&cfg, t0);
        let nonce = |i: u32| {
            let mut n = [0u8; 32];
            n[..4].copy_from_slice(&i.to_le_bytes());
            n
        };
        // Requests `nonces` at `t` are admitted, and the one after them is rate limited.
        let burst = |g: &mut InboundGuard, nonces: std::ops::Range<u32>, t: Instant| {
            for i in nonces.clone() {
                assert_eq!(g.admit_request(&nonce(i), t), Ok(()), "request {i}");
            }
            assert_eq!(
                g.admit_request(&nonce(nonces.end), t),
                Err(AuthFailure::RateLimited)
            );
        };
        // The burst is admitted, the next request at the same instant is not.
        burst(&mut g, 0..10, t0);
        // 100 ms at 100/s refills 10.
        let t1 = t0 + Duration::from_millis(100);
        burst(&mut g, 11..21, t1);
        // A nonce seen before is a replay.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            g.admit_request(&nonce(3), t2),
            Err(AuthFailure::ProtocolError)
        );
        // The record is bounded: the oldest nonces are forgotten first.
        let mut g = InboundGuard::new(
            &ChannelConfig {
                inbound_rate: u32::MAX,
                inbound_burst: u32::MAX,
                ..ChannelConfig::default()
            },
            t0,
        );
        for i in 0..(NONCES_KEPT as u32 + 1) {
            assert_eq!(g.admit_request(&nonce(i), t0), Ok(()));
        }
        assert_eq!(g.nonces.len(), NONCES_KEPT);
        assert_eq!(g.admit_request(&nonce(0), t0), Ok(()), "forgotten");
        assert_eq!(
            g.admit_request(&nonce(NONCES_KEPT as u32), t0),
            Err(AuthFailure::ProtocolError)
        );
    }

    #[test]
    fn rekey_requests_are_acted_on_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut g = InboundGuard::new(&ChannelConfig::default(), t0);
        assert!(g.admit_rekey(t0));
        assert!(!g.admit_rekey(t0 + Duration::from_millis(999)));
        assert!(g.admit_rekey(t0 + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn frame_reads_are_bounded_in_size_and_time() {
        let frame_timeout = Duration::from_secs(5);
        let mut buf = Vec::new();

        // A whole frame reads.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&wire::encode(&Message::Ping(7)))
            .await
            .unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            read_frame(&mut rx, far, frame_timeout, &mut buf)
                .await
                .unwrap(),
            Message::Ping(7)
        );

        // An oversized length is refused before any body is read or buffered.
        tx.write_all(&(wire::MAX_FRAME_LEN as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read_frame(&mut rx, far, frame_timeout, &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            ReadError::Wire(wire::Error::FrameTooLarge { .. })
        ));
        assert!(buf.capacity() < wire::MAX_FRAME_LEN);

        // A frame whose body stalls is cut off after the frame timeout.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let frame = wire::encode(&Message::Ping(1));
        tx.write_all(&frame[..frame.len() - 1]).await.unwrap();
        let t0 = Instant::now();
        let e = read_frame(&mut rx, far, frame_timeout, &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Timeout));
        assert_eq!(Instant::now() - t0, frame_timeout);

        // Half a length field: the header deadline applies.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&[0, 0]).await.unwrap();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(2);
        let e = read_frame(&mut rx, deadline, frame_timeout, &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Timeout));
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));

        // A peer that hangs up mid-frame is an EOF, not a hang.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&frame[..3]).await.unwrap();
        drop(tx);
        let e = read_frame(&mut rx, far, frame_timeout, &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Eof));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_frame_must_arrive_whole_before_the_deadline() {
        let frame_timeout = Duration::from_secs(5);
        let mut buf = Vec::new();
        // The length arrives at once, the body never: the handshake deadline (2 s) ends the
        // read, not the deadline plus a frame timeout.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let frame = wire::encode(&Message::Ping(1));
        tx.write_all(&frame[..wire::HEADER_LEN]).await.unwrap();
        let t0 = Instant::now();
        let e = read_frame_before(
            &mut rx,
            t0 + Duration::from_secs(2),
            frame_timeout,
            &mut buf,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ReadError::Timeout));
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
        // A whole frame before the deadline reads.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&frame).await.unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            read_frame_before(&mut rx, far, frame_timeout, &mut buf)
                .await
                .unwrap(),
            Message::Ping(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claimed_key_waits_for_its_publication_and_no_longer() {
        let key = |b: u8| veil_transport::PrivateKey::from_bytes([b; 32]).public_key();
        let (tx, rx) = watch::channel(PublishedKeys::new());
        // Nothing published for the node: nothing to wait for.
        assert!(await_publication(&rx, "b", &key(1), Duration::from_secs(5)).await);
        tx.send_modify(|m| {
            m.insert("b".into(), vec![key(1)]);
        });
        assert!(await_publication(&rx, "b", &key(1), Duration::from_secs(5)).await);
        // A rotated key read 300 ms after the handshake that claims it: admitted then.
        let t0 = Instant::now();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_modify(|m| {
                m.insert("b".into(), vec![key(1), key(2)]);
            });
            tx
        });
        assert!(await_publication(&rx, "b", &key(2), Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::from_millis(300));
        let _tx = later.await.unwrap();
        // A key never published: refused when the wait ends.
        let t0 = Instant::now();
        assert!(!await_publication(&rx, "b", &key(3), Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }
}
