//! l7::proxy: the `veil-proxy` process. Accepts the connections the datapath hands it, decides
//! every request on the HTTP rules (HTTP/1.1 with keep-alive, or h2c), answers a denied one with
//! 403 itself and forwards an allowed one over an upstream connection that carries the client's
//! own address and port.
//!
//! Refused before any rule is consulted (never forwarded): a request whose framing is ambiguous
//! (`Content-Length` beside `Transfer-Encoding`, or several different `Content-Length`s, seen
//! on the raw bytes by [`framing`] because hyper's parsed headers no longer show them: 400,
//! and the connection is closed),
//! a header section over [`MAX_HEADER_BYTES`] or [`MAX_HEADERS`] headers (431, by hyper), a
//! header section not complete within [`HEADER_TIMEOUT`] (slowloris: the connection is closed),
//! malformed requests (400, by hyper).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpSocket, TcpStream, UnixListener, UnixStream},
    sync::{broadcast, Mutex},
};
use veil_common::{maps::identity, marks};

use super::{
    framing,
    rules::{self, HttpMatcher},
    L7Record, ProxyConfig, ProxyMessage,
};
use crate::flows::Verdict;

/// Largest request header section (hyper's read buffer; beyond it: 431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most headers in one request (beyond: 431).
pub const MAX_HEADERS: usize = 100;
/// A request's header section must be complete within this (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to the backend.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Request records are sent to the agent in batches: those that come within this of the first,
/// at most [`RECORD_BATCH`] of them.
const RECORD_LINGER: Duration = Duration::from_millis(2);
const RECORD_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct Options {
    /// Listener port on 127.0.0.1 (the datapath's `proxy_port`).
    pub listen_port: u16,
    /// The control socket the agent connects to.
    pub control: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on 127.0.0.1:{port}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The compiled configuration: endpoint table and rules by (local identity, direction).
pub struct Policy {
    generation: u64,
    endpoints: HashMap<IpAddr, (u32, bool)>,
    subjects: HashMap<(u32, &'static str), Vec<Rule>>,
}

struct Rule {
    remotes: Vec<u32>,
    ports: Vec<(u16, u8)>,
    /// `None`: every request.
    http: Option<Vec<HttpMatcher>>,
    audit: bool,
}

/// A request's fate under the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub direction: &'static str,
    pub src_identity: u32,
    pub dst_identity: u32,
}

impl Policy {
    /// Compiles a configuration; an HTTP rule that does not compile is an error (the agent
    /// validated it already, so this is a version skew: the old policy stays).
    pub fn compile(cfg: &ProxyConfig) -> Result<Self, String> {
        let mut subjects: HashMap<(u32, &'static str), Vec<Rule>> = HashMap::new();
        for r in &cfg.rules {
            let dir = match r.direction.as_str() {
                "egress" => "egress",
                "ingress" => "ingress",
                other => return Err(format!("rule direction {other:?}")),
            };
            let http = r
                .http
                .as_ref()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            HttpMatcher::compile(h)
                                .map_err(|e| format!("{}: {}", e.field, e.reason))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            subjects.entry((r.local, dir)).or_default().push(Rule {
                remotes: r.remotes.clone(),
                ports: r.ports.clone(),
                http,
                audit: r.audit,
            });
        }
        Ok(Self {
            generation: cfg.generation,
            endpoints: cfg
                .endpoints
                .iter()
                .map(|e| (e.ip, (e.identity, e.local)))
                .collect(),
            subjects,
        })
    }

    /// Decides one request from `src` to `dst` (the connection's original destination). Every
    /// direction that applies here and has HTTP rules must admit it; a direction without them
    /// was decided at L4 by the datapath, which admitted the connection.
    pub fn decide(&self, src: SocketAddr, dst: SocketAddr, req: &rules::Request<'_>) -> Decision {
        let (src_id, src_local) = self
            .endpoints
            .get(&src.ip())
            .copied()
            .unwrap_or((identity::WORLD, false));
        let (dst_id, dst_local) = self
            .endpoints
            .get(&dst.ip())
            .copied()
            .unwrap_or((identity::WORLD, false));
        let mut d = Decision {
            verdict: Verdict::Forwarded,
            direction: if src_local { "egress" } else { "ingress" },
            src_identity: src_id,
            dst_identity: dst_id,
        };
        for (local, remote, dir, applies) in [
            (src_id, dst_id, "egress", src_local),
            (dst_id, src_id, "ingress", dst_local),
        ] {
            let Some(rules) = self.subjects.get(&(local, dir)).filter(|_| applies) else {
                continue;
            };
            let mut candidates = rules.iter().filter(|r| {
                r.ports.iter().any(|&(p, proto)| {
                    (p == 0 || p == dst.port())
                        && (proto == 0 || proto == veil_common::ipproto::TCP)
                }) && r
                    .remotes
                    .iter()
                    .any(|&id| id == identity::ANY || id == remote)
            });
            let admitted = candidates.clone().any(|r| {
                r.http
                    .as_ref()
                    .is_none_or(|h| h.iter().any(|m| m.matches(req)))
            });
            if !admitted {
                let audit = rules.first().is_some_and(|r| r.audit) && candidates.all(|r| r.audit);
                d.direction = dir;
                d.verdict = if audit {
                    Verdict::Audit
                } else {
                    Verdict::Dropped
                };
                if !audit {
                    return d;
                }
            }
        }
        d
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

struct State {
    policy: ArcSwapOption<Policy>,
    records: broadcast::Sender<L7Record>,
    listen_port: u16,
    requests: AtomicU64,
}

/// Runs the proxy until the process is killed.
pub async fn run(opts: Options) -> Result<(), Error> {
    let listener = listen(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        opts.listen_port,
    ))
    .map_err(|source| Error::Listen {
        port: opts.listen_port,
        source,
    })?;
    // IPv6 connections are assigned to [::1]:port. A namespace without IPv6 has no such
    // address: then there is no v6 listener, and such connections drop `proxy-unavailable`.
    let listener6 = match listen(SocketAddr::new(
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        opts.listen_port,
    )) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 listener on [::1] (IPv6 is off here?): IPv6 connections for the proxy drop proxy-unavailable");
            None
        }
    };
    let _ = std::fs::remove_file(&opts.control);
    if let Some(dir) = opts.control.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let control = UnixListener::bind(&opts.control).map_err(|source| Error::Control {
        path: opts.control.clone(),
        source,
    })?;
    let (records, _) = broadcast::channel(4096);
    let state = Arc::new(State {
        policy: ArcSwapOption::empty(),
        records,
        listen_port: opts.listen_port,
        requests: AtomicU64::new(0),
    });
    tracing::info!(port = opts.listen_port, control = %opts.control.display(), "veil-proxy listening");
    loop {
        tokio::select! {
            r = listener.accept() => accepted(r, &state).await,
            r = accept_if_any(listener6.as_ref()) => accepted(r, &state).await,
            r = control.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(control_session(stream, state.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "control accept failed"),
            },
        }
    }
}

/// Serves an accepted connection, or pauses after a failed accept (a full fd table).
async fn accepted(r: std::io::Result<(TcpStream, SocketAddr)>, state: &Arc<State>) {
    match r {
        Ok((stream, _)) => {
            tokio::spawn(serve_connection(stream, state.clone()));
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The next connection on `listener`; never, without one.
async fn accept_if_any(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A listener on `addr`: transparent (its accepted sockets answer from the original
/// destination) and marked (the datapath admits the proxy's packets into the tunnel only for
/// proxied connections).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let s = socket2::SockRef::from(&sock);
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    }
    s.set_mark(marks::FROM_PROXY)?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// One control connection: hello, then configurations in and records out, until it closes.
async fn control_session(stream: UnixStream, state: Arc<State>) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut records = state.records.subscribe();
    let hello = ProxyMessage::Hello {
        pid: std::process::id(),
        listen_port: state.listen_port,
    };
    if write_line(&mut wr, &hello).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match serde_json::from_str::<ProxyConfig>(&line)
                    .map_err(|e| e.to_string())
                    .and_then(|c| Policy::compile(&c))
                {
                    Ok(p) => {
                        tracing::info!(generation = p.generation(), "configuration applied");
                        state.policy.store(Some(Arc::new(p)));
                    }
                    Err(e) => tracing::warn!(error = %e, "configuration refused; the previous one stays"),
                },
                _ => return,
            },
            r = records.recv() => match r {
                Ok(rec) => {
                    // This record and those that come within RECORD_LINGER (up to
                    // RECORD_BATCH), in one write: one wake-up of the agent per batch, not per
                    // request, which on two cores is what records cost the requests' latency.
                    let mut batch = Vec::new();
                    let mut n = 0;
                    let deadline = tokio::time::Instant::now() + RECORD_LINGER;
                    let mut next = Some(rec);
                    while let Some(rec) = next.take() {
                        serde_json::to_writer(&mut batch, &ProxyMessage::Request(Box::new(rec)))
                            .expect("message serializes");
                        batch.push(b'\n');
                        n += 1;
                        if n == RECORD_BATCH {
                            break;
                        }
                        next = match records.try_recv() {
                            Ok(r) => Some(r),
                            Err(_) => match tokio::time::timeout_at(deadline, records.recv()).await {
                                Ok(Ok(r)) => Some(r),
                                Ok(Err(broadcast::error::RecvError::Lagged(lost))) => {
                                    tracing::warn!(lost, "request records lost (the agent reads too slowly)");
                                    None
                                }
                                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => None,
                            },
                        };
                    }
                    if wr.write_all(&batch).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "request records lost (the agent reads too slowly)");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn write_line(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    msg: &ProxyMessage,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).expect("message serializes");
    line.push(b'\n');
    wr.write_all(&line).await
}

/// One accepted connection and its (lazily opened) upstream connection.
struct Conn {
    src: SocketAddr,
    dst: SocketAddr,
    /// Set by the connection's [`framing::Watched`] once a request head on it had both
    /// Transfer-Encoding and Content-Length.
    ambiguous: Arc<AtomicBool>,
    upstream: Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let (Ok(src), Ok(dst)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    // Only connections the datapath redirected carry a foreign destination; one made to the
    // listener itself has nothing to be forwarded to.
    if dst.ip().is_loopback() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let ambiguous = Arc::new(AtomicBool::new(false));
    let stream = framing::Watched::new(stream, ambiguous.clone());
    let conn = Arc::new(Conn {
        src,
        dst,
        ambiguous,
        upstream: Mutex::new(None),
    });
    let svc = hyper::service::service_fn(move |req| {
        let (state, conn) = (state.clone(), conn.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(req, &state, &conn).await) }
    });
    if let Err(e) = server_builder()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%src, %dst, error = %e, "connection ended");
    }
}

/// hyper's server as veil-proxy runs it on a client connection: HTTP/1.1 or h2c by the
/// preface, the header limits and the header timeout.
pub(super) fn server_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn handle(req: Request<Incoming>, state: &State, conn: &Conn) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let mut record = L7Record {
        time_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        src: conn.src,
        dst: conn.dst,
        src_identity: identity::WORLD,
        dst_identity: identity::WORLD,
        direction: "egress".into(),
        verdict: Verdict::Dropped,
        drop_reason: None,
        method,
        path,
        host,
        status: 0,
    };
    let resp = decide_and_forward(req, state, conn, &mut record).await;
    record.status = resp.status().as_u16();
    let _ = state.records.send(record);
    resp
}

async fn decide_and_forward(
    req: Request<Incoming>,
    state: &State,
    conn: &Conn,
    record: &mut L7Record,
) -> Response<Body> {
    // Framing a proxy and a backend could read differently (request smuggling), as seen on the
    // raw bytes: hyper's parsed headers no longer show it.
    if conn.ambiguous.load(Ordering::Relaxed) {
        record.drop_reason = Some("bad-request".into());
        let mut r = text(
            StatusCode::BAD_REQUEST,
            "Bad request: conflicting Content-Length / Transfer-Encoding\n",
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let Some(policy) = state.policy.load_full() else {
        record.drop_reason = Some("proxy-unconfigured".into());
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "veil-proxy has no policy yet\n",
        );
    };
    let headers: Vec<(&str, &str)> = req
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
        .collect();
    let d = policy.decide(
        conn.src,
        conn.dst,
        &rules::Request {
            method: &record.method,
            path: &record.path,
            host: record.host.as_deref(),
            headers: &headers,
        },
    );
    drop(headers);
    record.src_identity = d.src_identity;
    record.dst_identity = d.dst_identity;
    record.direction = d.direction.into();
    record.verdict = d.verdict;
    if d.verdict == Verdict::Dropped {
        record.drop_reason = Some("policy-denied".into());
        return text(StatusCode::FORBIDDEN, "Access denied\n");
    }
    if d.verdict == Verdict::Audit {
        record.drop_reason = Some("policy-denied".into());
    }
    match forward(req, conn).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(src = %conn.src, dst = %conn.dst, error = %e, "upstream failed");
            record.verdict = Verdict::Dropped;
            record.drop_reason = Some("upstream-unavailable".into());
            text(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
        }
    }
}

/// Headers of one hop only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(&named) {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

async fn forward(req: Request<Incoming>, conn: &Conn) -> Result<Response<Body>, String> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    parts.version = hyper::Version::HTTP_11;
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|e| format!("request target: {e}"))?;
    let upstream_req = Request::from_parts(parts, body);
    let fut = {
        let mut guard = conn.upstream.lock().await;
        if guard.as_ref().is_none_or(|s| s.is_closed()) {
            *guard = Some(connect_upstream(conn.src, conn.dst).await?);
        }
        let sender = guard.as_mut().expect("just set");
        sender.ready().await.map_err(|e| e.to_string())?;
        sender.send_request(upstream_req)
    };
    let resp = fut.await.map_err(|e| e.to_string())?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The upstream connection: from the client's own address and port (so the reply comes back
/// to this socket through the datapath's conntrack entry, and the backend side sees the client),
/// marked as the proxy's.
async fn connect_upstream(
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, String> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    {
        let s = socket2::SockRef::from(&sock);
        if dst.is_ipv4() {
            s.set_ip_transparent_v4(true)
        } else {
            s.set_ip_transparent_v6(true)
        }
        .map_err(|e| format!("IP_TRANSPARENT: {e}"))?;
        s.set_mark(marks::FROM_PROXY)
            .map_err(|e| format!("SO_MARK: {e}"))?;
    }
    sock.set_reuseaddr(true).map_err(|e| e.to_string())?;
    sock.bind(src).map_err(|e| format!("bind {src}: {e}"))?;
    let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| format!("connect {dst}: timed out"))?
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        l7::ProxyEndpoint,
        policy::{compile::L7Rule, parse::HttpRule},
    };

    const FE: u32 = 256;
    const BE: u32 = 257;
    const INTRUDER: u32 = 258;

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn config(rules: Vec<L7Rule>) -> Policy {
        let ep = |ip: [u8; 4], identity, local| ProxyEndpoint {
            ip: IpAddr::from(ip),
            identity,
            local,
        };
        Policy::compile(&ProxyConfig {
            generation: 1,
            endpoints: vec![
                ep([198, 19, 1, 2], FE, true),
                ep([198, 19, 1, 3], INTRUDER, true),
                ep([198, 19, 2, 2], BE, false),
            ],
            rules,
        })
        .unwrap()
    }

    fn get(path: &str) -> rules::Request<'_> {
        rules::Request {
            method: "GET",
            path,
            host: None,
            headers: &[],
        }
    }

    fn egress(http: Option<Vec<HttpRule>>, ports: Vec<(u16, u8)>) -> L7Rule {
        L7Rule {
            local: FE,
            direction: "egress".into(),
            remotes: vec![BE],
            ports,
            http,
            audit: false,
        }
    }

    fn get_products() -> Vec<HttpRule> {
        vec![HttpRule {
            method: Some("GET".into()),
            path: Some("/api/products".into()),
            ..Default::default()
        }]
    }

    #[test]
    fn egress_rules_decide_requests_of_local_clients() {
        let p = config(vec![egress(Some(get_products()), vec![(8080, 6)])]);
        let (fe, be) = (addr([198, 19, 1, 2], 40000), addr([198, 19, 2, 2], 8080));
        let d = p.decide(fe, be, &get("/api/products"));
        assert_eq!(d.verdict, Verdict::Forwarded);
        assert_eq!(
            (d.src_identity, d.dst_identity, d.direction),
            (FE, BE, "egress")
        );
        assert_eq!(p.decide(fe, be, &get("/admin")).verdict, Verdict::Dropped);
        let post = rules::Request {
            method: "POST",
            ..get("/api/products")
        };
        assert_eq!(p.decide(fe, be, &post).verdict, Verdict::Dropped);
        // Another port of the same pair has no candidate rule: denied (the datapath would not
        // have admitted it at L4 anyway).
        assert_eq!(
            p.decide(fe, addr([198, 19, 2, 2], 9090), &get("/api/products"))
                .verdict,
            Verdict::Dropped
        );
        // A client whose identity has no HTTP rules here is not constrained.
        let intruder = addr([198, 19, 1, 3], 40000);
        assert_eq!(
            p.decide(intruder, be, &get("/admin")).verdict,
            Verdict::Forwarded
        );
    }

    #[test]
    fn an_l4_rule_on_the_same_port_admits_every_request() {
        let p = config(vec![
            egress(Some(get_products()), vec![(8080, 6)]),
            egress(None, vec![(8080, 6)]),
        ]);
        let d = p.decide(
            addr([198, 19, 1, 2], 1),
            addr([198, 19, 2, 2], 8080),
            &get("/admin"),
        );
        assert_eq!(d.verdict, Verdict::Forwarded);
    }

    #[test]
    fn ingress_rules_decide_requests_to_local_servers_and_audit_reports() {
        let mut r = egress(Some(get_products()), vec![(0, 0)]);
        r.local = BE;
        r.direction = "ingress".into();
        r.remotes = vec![identity::ANY];
        r.audit = true;
        let ep = ProxyEndpoint {
            ip: IpAddr::from([198, 19, 2, 2]),
            identity: BE,
            local: true,
        };
        let mut cfg = ProxyConfig {
            generation: 2,
            endpoints: vec![ep],
            rules: vec![r],
        };
        let p = Policy::compile(&cfg).unwrap();
        let (cl, be) = (addr([198, 19, 1, 2], 1), addr([198, 19, 2, 2], 8080));
        let d = p.decide(cl, be, &get("/admin"));
        assert_eq!(
            (d.verdict, d.direction, d.src_identity),
            (Verdict::Audit, "ingress", identity::WORLD)
        );
        cfg.rules[0].audit = false;
        let p = Policy::compile(&cfg).unwrap();
        assert_eq!(p.decide(cl, be, &get("/admin")).verdict, Verdict::Dropped);
        assert_eq!(
            p.decide(cl, be, &get("/api/products")).verdict,
            Verdict::Forwarded
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["x-kept"]
        );
    }
}
