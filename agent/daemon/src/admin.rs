//! admin: the agent's admin API, HTTP/1.1 over a unix socket (so `curl --unix-socket` works),
//! and the client the CLI uses to reach it; and the health port, the same server on TCP with
//! only `GET /healthz`, `/readyz` and `/metrics` ([`HealthOnly`]) for kubelet probes and
//! Prometheus.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener, UnixStream},
    sync::Semaphore,
};

/// Errors serving or calling the admin API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach agent at {path} (is the agent running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin request to {path} failed")]
    Http {
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("agent at {path} timed out")]
    Timeout { path: String },
    #[error("invalid admin request {target:?}")]
    Request {
        target: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("agent answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// A request as handlers see it.
pub struct AdminRequest {
    pub method: hyper::Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
}

impl AdminRequest {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type and body.
pub struct AdminResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl AdminResponse {
    pub fn json<T: serde::Serialize>(v: &T) -> Self {
        match serde_json::to_vec(v) {
            Ok(body) => Self {
                status: StatusCode::OK,
                content_type: "application/json",
                body: body.into(),
            },
            Err(e) => Self::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    pub fn text(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "text/plain; version=0.0.4",
            body: body.into(),
        }
    }

    pub fn error(status: StatusCode, message: &str) -> Self {
        let body = serde_json::json!({ "error": message });
        Self {
            status,
            content_type: "application/json",
            body: body.to_string().into(),
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = AdminResponse> + Send>>;

/// What serves the routes.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: AdminRequest) -> BoxFuture;
}

/// The health port's routes: `GET /healthz` answered here (the process and its runtime answer),
/// `GET /readyz` and `GET /metrics` passed to the admin routes; everything else, the admin API's
/// writes and its flow and status data included, is refused: the port is on the host network.
pub struct HealthOnly(pub Arc<dyn Handler>);

impl Handler for HealthOnly {
    fn handle(&self, req: AdminRequest) -> BoxFuture {
        match (req.method == hyper::Method::GET, req.path.as_str()) {
            (true, "/healthz") => {
                Box::pin(async { AdminResponse::text(StatusCode::OK, "ok\n".into()) })
            }
            (true, "/readyz" | "/metrics") => self.0.handle(req),
            (true, path) => {
                let m = format!("no route {path} on the health port");
                Box::pin(async move { AdminResponse::error(StatusCode::NOT_FOUND, &m) })
            }
            (false, _) => Box::pin(async {
                AdminResponse::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "the health port takes GET only",
                )
            }),
        }
    }
}

/// What one client of the admin socket may take. The socket is local, but nothing that reaches
/// it may exhaust the agent: connections, bodies, queries and the time they take are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Largest request body (no route takes a body yet): larger is `413`.
    pub max_body_bytes: usize,
    /// Most `key=value` pairs in a query (routes read a handful): more is `400`.
    pub max_query_params: usize,
    /// A request's head must arrive within this, and an idle keep-alive connection is closed
    /// after it.
    pub header_timeout: Duration,
    /// A request's body must arrive within this: `408`.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_body_bytes: 64 * 1024,
            max_query_params: 32,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves the admin API until `shutdown` resolves. Replaces a stale socket file.
pub async fn serve(
    socket: &Path,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_with(socket, handler, shutdown, Limits::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    socket: &Path,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> Result<(), Error> {
    let _ = std::fs::remove_file(socket);
    if let Some(parent) = socket.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = UnixListener::bind(socket).map_err(|source| Error::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    serve_on(Listener::Unix(listener), handler, shutdown, limits).await
}

/// Serves [`HealthOnly`] over `handler` on a bound TCP listener until `shutdown` resolves.
pub async fn serve_health(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let health: Arc<dyn Handler> = Arc::new(HealthOnly(handler));
    serve_on(Listener::Tcp(listener), health, shutdown, Limits::default()).await
}

/// What the server accepts connections on.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A connection of either kind.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Connection>> {
        Ok(match self {
            Self::Unix(l) => Box::new(l.accept().await?.0),
            Self::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

async fn serve_on(
    listener: Listener,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refused = AtomicU64::new(0);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(
                refused = n,
                max = limits.max_connections,
                "admin connection refused: too many open"
            );
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let r = match read_request(req, &limits).await {
                        Ok(req) => handler.handle(req).await,
                        Err(refusal) => refusal,
                    };
                    Ok::<_, std::convert::Infallible>(to_response(r))
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The request as handlers see it, or the answer that refuses it.
async fn read_request(
    req: Request<Incoming>,
    limits: &Limits,
) -> Result<AdminRequest, AdminResponse> {
    let (parts, body) = req.into_parts();
    let query = parse_query(parts.uri.query().unwrap_or(""), limits.max_query_params)
        .map_err(|e| AdminResponse::error(StatusCode::BAD_REQUEST, &e))?;
    let too_large = || {
        AdminResponse::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds {} bytes", limits.max_body_bytes),
        )
    };
    // A declared length over the limit is refused before waiting for any of it.
    if hyper::body::Body::size_hint(&body).lower() > limits.max_body_bytes as u64 {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body_bytes).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => {
            return Err(AdminResponse::error(
                StatusCode::REQUEST_TIMEOUT,
                "request body did not arrive in time",
            ))
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(AdminResponse::error(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            ))
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    Ok(AdminRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        body,
    })
}

fn to_response(r: AdminResponse) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(r.body));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(r.content_type),
    );
    resp
}

/// Splits and decodes a query string; more than `max` pairs is an error. Public only for the
/// fuzz target (`fuzz/fuzz_targets/admin_query.rs`).
#[doc(hidden)]
pub fn parse_query(q: &str, max: usize) -> Result<Vec<(String, String)>, String> {
    // application/x-www-form-urlencoded, as the url crate family decodes it: `+` is a space,
    // `%XX` a byte, a `%` without two hex digits stays as it is, invalid UTF-8 is replaced.
    let pairs = form_urlencoded::parse(q.as_bytes());
    if pairs.clone().nth(max).is_some() {
        return Err(format!("query has more than {max} parameters"));
    }
    Ok(pairs
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

/// Decodes one query component the same way: `+` is a space, then `%XX` a byte.
pub fn percent_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// What a query component leaves unescaped: RFC 3986's unreserved characters.
const QUERY_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Encodes a query component (or a path segment).
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY_COMPONENT).to_string()
}

/// Calls the admin API: `method path` with an optional body; returns the body of a 2xx answer.
pub async fn call(
    socket: &Path,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Bytes, Error> {
    let spath = socket.display().to_string();
    let fut = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::Connect {
                path: spath.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", "veil-agent")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| Error::Request {
                target: path_and_query.to_string(),
                source,
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| Error::Http {
                path: spath.clone(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::Status {
                status: status.as_u16(),
                body: msg,
            });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Timeout {
            path: spath.clone(),
        })?
}

/// GET and decode JSON.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
) -> Result<T, JsonError> {
    let body = call(
        socket,
        hyper::Method::GET,
        path,
        None,
        Duration::from_secs(10),
    )
    .await?;
    serde_json::from_slice(&body).map_err(JsonError::Decode)
}

/// A call that also decodes JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error(transparent)]
    Call(#[from] Error),
    #[error("agent answered with JSON veil cannot read")]
    Decode(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_codec_round_trips() {
        for s in ["plain", "a b", "shop/frontend", "100%", "x=y&z", "ünï"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("a+b%2Fc"), "a b/c");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("tail%4"), "tail%4");
    }

    #[test]
    fn percent_decoding_takes_only_two_hex_digits() {
        // A sign is no hex digit: `%` stays, `+` is a space as anywhere else.
        assert_eq!(percent_decode("%+5"), "% 5");
        assert_eq!(percent_decode("%-1"), "%-1");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_decode("%%41"), "%A");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("ü%"), "ü%");
    }

    #[test]
    fn queries_are_bounded_in_parameters() {
        let q = (0..32)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(parse_query(&q, 32).unwrap().len(), 32);
        let e = parse_query(&format!("{q}&one=more"), 32).unwrap_err();
        assert!(e.contains("more than 32"), "{e}");
        assert_eq!(
            parse_query("&&a=1&&", 32).unwrap(),
            [("a".into(), "1".into())]
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_queries_never_panic(q in "\\PC{0,64}") {
            let _ = parse_query(&q, 8);
            let _ = percent_decode(&q);
        }
    }

    #[tokio::test]
    async fn a_client_target_that_is_no_uri_is_an_error_not_a_panic() {
        let dir = tempdir("client");
        let sock = dir.0.join("admin.sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        let e = call(
            &sock,
            hyper::Method::GET,
            "/v1/flows?pod=a b",
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Request { .. }), "{e:?}");
    }

    /// [`call`] with the tests' 3 s timeout.
    async fn call_3s(
        sock: &Path,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        call(sock, method, path, body, Duration::from_secs(3)).await
    }

    /// Answers 200 with the body length; counts calls.
    struct Echo(std::sync::atomic::AtomicUsize);

    impl Handler for Echo {
        fn handle(&self, req: AdminRequest) -> BoxFuture {
            self.0.fetch_add(1, Ordering::SeqCst);
            let n = req.body.len();
            Box::pin(async move { AdminResponse::json(&serde_json::json!({ "body": n })) })
        }
    }

    /// A fresh directory under the temp dir, removed on drop.
    struct TestDir(std::path::PathBuf);

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!(
            "veil-admin-test-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }

    const TEST_LIMITS: Limits = Limits {
        max_connections: 2,
        max_body_bytes: 1024,
        max_query_params: 4,
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
    };

    /// Serves an [`Echo`] on a fresh socket; returns its directory (removed on drop), the socket
    /// path and the handler.
    async fn server(name: &str) -> (TestDir, std::path::PathBuf, Arc<Echo>) {
        let dir = tempdir(name);
        let sock = dir.0.join("admin.sock");
        let echo = Arc::new(Echo(Default::default()));
        let (s, h) = (sock.clone(), echo.clone());
        tokio::spawn(async move {
            serve_with(&s, h, std::future::pending(), TEST_LIMITS)
                .await
                .unwrap()
        });
        for _ in 0..100 {
            if UnixStream::connect(&sock).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (dir, sock, echo)
    }

    /// Writes raw bytes and reads until the server closes (or 3 s pass).
    async fn raw(sock: &Path, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut c = UnixStream::connect(sock).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn the_health_port_serves_probes_and_metrics_and_nothing_else() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let echo = Arc::new(Echo(Default::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let h: Arc<dyn Handler> = echo.clone();
        tokio::spawn(serve_health(listener, h, std::future::pending()));
        let status_of = |method: &'static str, path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            c.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), c.read_to_string(&mut out)).await;
            out.split(' ').nth(1).unwrap_or_default().to_owned()
        };
        assert_eq!(status_of("GET", "/healthz").await, "200");
        assert_eq!(
            echo.0.load(Ordering::SeqCst),
            0,
            "/healthz is answered by the filter"
        );
        assert_eq!(status_of("GET", "/readyz").await, "200");
        assert_eq!(status_of("GET", "/metrics").await, "200");
        assert_eq!(echo.0.load(Ordering::SeqCst), 2);
        assert_eq!(status_of("GET", "/v1/status").await, "404");
        assert_eq!(status_of("GET", "/v1/flows").await, "404");
        assert_eq!(status_of("POST", "/v1/audit").await, "405");
        assert_eq!(status_of("POST", "/metrics").await, "405");
        assert_eq!(
            echo.0.load(Ordering::SeqCst),
            2,
            "nothing else reaches the admin routes"
        );
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_before_the_handler() {
        let (_dir, sock, echo) = server("body").await;
        let ok = call_3s(&sock, hyper::Method::POST, "/x", Some(vec![0; 1024]))
            .await
            .unwrap();
        assert_eq!(&ok[..], br#"{"body":1024}"#);
        let e = call_3s(&sock, hyper::Method::POST, "/x", Some(vec![0; 1025]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Status { status: 413, body } if body.contains("exceeds 1024")),
            "{e:?}"
        );
        // A declared length far beyond the limit is refused without reading it.
        let answer = raw(
            &sock,
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 10000000000\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert_eq!(echo.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn too_many_query_parameters_are_a_bad_request() {
        let (_dir, sock, echo) = server("query").await;
        let e = call_3s(
            &sock,
            hyper::Method::GET,
            "/v1/flows?a=1&b=2&c=3&d=4&e=5",
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Status { status: 400, .. }), "{e:?}");
        assert_eq!(echo.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn slow_heads_and_bodies_are_cut_off() {
        let (_dir, sock, echo) = server("slow").await;
        // Half a request head, then nothing: closed after the header timeout.
        let t0 = std::time::Instant::now();
        let answer = raw(&sock, b"GET /x HTTP/1.1\r\nhost: a\r\n").await;
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(!answer.contains("200"), "{answer}");
        // A body promised and not sent: 408 after the body timeout.
        let t0 = std::time::Instant::now();
        let answer = raw(
            &sock,
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nabc",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(echo.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_accept() {
        use tokio::io::AsyncReadExt as _;
        let (_dir, sock, _) = server("conns").await;
        // Two idle connections hold both slots (the readiness probe's is gone by now).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _a = UnixStream::connect(&sock).await.unwrap();
        let _b = UnixStream::connect(&sock).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = UnixStream::connect(&sock).await.unwrap();
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_millis(200), c.read(&mut byte))
            .await
            .expect("the third connection is closed, not left waiting")
            .unwrap();
        assert_eq!(n, 0);
        // Once they go (here: the header timeout closes them), new clients are served.
        drop((_a, _b));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ok = call_3s(&sock, hyper::Method::GET, "/x", None)
            .await
            .unwrap();
        assert_eq!(&ok[..], br#"{"body":0}"#);
    }
}
