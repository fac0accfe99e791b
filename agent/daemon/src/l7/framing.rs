//! Request framing watched on the client's raw bytes, for the one smuggling shape hyper hides.
//!
//! hyper reads a request with both `Transfer-Encoding` and `Content-Length` as RFC 9112 §6.3
//! says an intermediary may: Transfer-Encoding wins, Content-Length is removed from the parsed
//! headers, and the connection closes after the response. Nothing hidden behind the body is ever
//! parsed, but the proxy cannot see that the request was ambiguous, so it could not refuse it.
//! [`Scanner`] follows the same bytes hyper reads, head by head and body by body (fixed length or
//! chunked, with hyper's own rules for chunk-size lines and trailers), and remembers a head that
//! carried both; the request handler then answers 400.
//!
//! The scanner only adds refusals, so it must keep up with hyper wherever hyper goes on reading
//! requests: it stops watching only where hyper stops too (HTTP/2, which has no such framing; a
//! head, chunk-size line or trailer hyper refuses, after which hyper closes the connection). An
//! `Upgrade` or `CONNECT` request is followed like any other: veil-proxy never upgrades a
//! connection (it strips `Upgrade`, and hyper ends a connection whose upgrade nobody takes), so
//! after one hyper reads the next request as HTTP/1. [`requests_hyper_reads`] runs hyper as
//! veil-proxy configures it over a stream, for the tests and the `l7_framing` fuzz target that
//! hold the scanner to hyper's reading of the same bytes.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::proxy::{MAX_HEADERS, MAX_HEADER_BYTES};

/// Where in a chunk-size line (RFC 9112 §7.1, as hyper reads it: hex digits, optional spaces or
/// tabs, an optional `;` extension of any length, CRLF).
#[derive(Clone, Copy)]
enum Line {
    /// Before the first digit.
    Start,
    /// In the digits.
    Size,
    /// Spaces or tabs after the digits.
    Space,
    /// In the extension, up to its CR.
    Extension,
    /// After the CR.
    Lf,
}

/// Where in the trailer section after the last chunk (hyper: CRLF-terminated lines up to an
/// empty one).
#[derive(Clone, Copy)]
enum Trailer {
    /// At the start of a line.
    LineStart,
    /// In a trailer line.
    InLine,
    /// After a trailer line's CR.
    LineLf,
    /// After the CR of the empty line that ends the section.
    EndLf,
}

enum State {
    /// Accumulating a request head, up to its blank line.
    Head(Vec<u8>),
    /// Skipping a body of known length.
    Body(u64),
    /// A chunk-size line: the size so far and where in the line.
    ChunkSize(u64, Line),
    /// Chunk data and the CRLF after it.
    ChunkData(u64),
    /// The trailer section: where, and its bytes so far.
    Trailers(Trailer, usize),
    /// Not followed any more.
    Off,
}

/// Follows HTTP/1 request framing over the bytes of one connection.
pub struct Scanner {
    state: State,
    ambiguous: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Head(Vec::new()),
            ambiguous: false,
        }
    }
}

impl Scanner {
    /// Feeds the next bytes from the client; true once any request head on the connection had
    /// both Transfer-Encoding and Content-Length.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() && !matches!(self.state, State::Off) {
            let used = self.step(bytes);
            bytes = &bytes[used..];
        }
        self.ambiguous
    }

    /// Consumes a prefix of `bytes` in the current state; how many bytes it used.
    fn step(&mut self, bytes: &[u8]) -> usize {
        match &mut self.state {
            State::Head(buf) => {
                // A read that holds a whole head (the usual case) is parsed where it is; only
                // a head split across reads is gathered.
                let old = buf.len();
                if old > 0 {
                    buf.extend_from_slice(bytes);
                    // A head is only complete at an LF: until one comes, more of it is not
                    // parsed again (a head sent a byte per segment costs one parse a line, not
                    // one a byte). A malformed start is still refused at the next LF, where
                    // hyper's own parse refuses it too.
                    if !bytes.contains(&b'\n') && buf.len() < MAX_HEADER_BYTES {
                        return bytes.len();
                    }
                }
                let data: &[u8] = if old > 0 { buf } else { bytes };
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(data) {
                    // hyper parses after every read and refuses (431) a head still incomplete
                    // once it holds MAX_HEADER_BYTES; one that completes in the bytes it holds
                    // is read whatever its length. The scanner sees the same reads.
                    Ok(httparse::Status::Complete(end)) => {
                        let (next, ambiguous) = after_head(&req);
                        self.ambiguous |= ambiguous;
                        self.state = next;
                        end.saturating_sub(old).min(bytes.len())
                    }
                    Ok(httparse::Status::Partial) if data.len() < MAX_HEADER_BYTES => {
                        if old == 0 {
                            buf.extend_from_slice(bytes);
                        }
                        bytes.len()
                    }
                    // Too large, too many headers or malformed: hyper answers it itself.
                    _ => {
                        self.state = State::Off;
                        bytes.len()
                    }
                }
            }
            State::Body(left) => {
                let n = (*left).min(bytes.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.state = State::Head(Vec::new());
                }
                n as usize
            }
            State::ChunkData(left) => {
                let n = (*left).min(bytes.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.state = State::ChunkSize(0, Line::Start);
                }
                n as usize
            }
            State::ChunkSize(size, at) => {
                let (size, at) = (*size, *at);
                let (next, used) = chunk_line(size, at, bytes);
                self.state = next;
                used
            }
            State::Trailers(at, len) => {
                let (at, len) = (*at, *len);
                let (next, used) = trailers(at, len, bytes);
                self.state = next;
                used
            }
            State::Off => bytes.len(),
        }
    }
}

/// Follows a chunk-size line from `at` over `bytes` as hyper's chunked decoder does; the state
/// after it and how many bytes it used. hyper refuses a line that is not digits, spaces, an
/// extension and CRLF, a size over 64 bits, and extensions of 16 KiB and more in one body: the
/// scanner stops where hyper refuses the first two and follows a long extension, which only
/// hyper limits (after it, it closes the connection).
fn chunk_line(mut size: u64, mut at: Line, bytes: &[u8]) -> (State, usize) {
    let mut i = 0;
    while i < bytes.len() {
        if let Line::Extension = at {
            // The rest of the extension at once, up to its CR (or an LF, which hyper refuses).
            let Some(end) = bytes[i..].iter().position(|&c| c == b'\r' || c == b'\n') else {
                return (State::ChunkSize(size, at), bytes.len());
            };
            i += end;
        }
        let b = bytes[i];
        i += 1;
        at = match (at, b) {
            (Line::Start | Line::Size, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                match size.checked_mul(16).and_then(|s| s.checked_add(digit)) {
                    Some(s) => size = s,
                    None => return (State::Off, i),
                }
                Line::Size
            }
            (Line::Size | Line::Space, b' ' | b'\t') => Line::Space,
            (Line::Size | Line::Space, b';') => Line::Extension,
            (Line::Size | Line::Space | Line::Extension, b'\r') => Line::Lf,
            (Line::Lf, b'\n') => {
                let next = if size == 0 {
                    State::Trailers(Trailer::LineStart, 0)
                } else {
                    // The data, then its CRLF.
                    State::ChunkData(size.saturating_add(2))
                };
                return (next, i);
            }
            _ => return (State::Off, i),
        };
    }
    (State::ChunkSize(size, at), bytes.len())
}

/// Follows the trailer section from `at` (with `len` bytes so far) over `bytes` as hyper does;
/// the state after it and how many bytes it used. hyper refuses a section of 16 KiB
/// ([`MAX_HEADER_BYTES`]) or more and a CR without its LF; the scanner stops only after that.
fn trailers(mut at: Trailer, mut len: usize, bytes: &[u8]) -> (State, usize) {
    for (i, &b) in bytes.iter().enumerate() {
        len += 1;
        if len > MAX_HEADER_BYTES {
            return (State::Off, i + 1);
        }
        at = match (at, b) {
            (Trailer::LineStart, b'\r') => Trailer::EndLf,
            (Trailer::EndLf, b'\n') => return (State::Head(Vec::new()), i + 1),
            (Trailer::InLine, b'\r') => Trailer::LineLf,
            (Trailer::LineStart | Trailer::InLine, _) => Trailer::InLine,
            (Trailer::LineLf, b'\n') => Trailer::LineStart,
            (Trailer::LineLf | Trailer::EndLf, _) => return (State::Off, i + 1),
        };
    }
    (State::Trailers(at, len), bytes.len())
}

/// The state after a complete request head, and whether the head was ambiguous: both
/// Transfer-Encoding and Content-Length, or two different Content-Lengths.
fn after_head(req: &httparse::Request<'_, '_>) -> (State, bool) {
    let (mut te, mut cl, mut cl_seen) = (None, None, false);
    let mut first_cl: Option<&[u8]> = None;
    let mut lengths_differ = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl_seen = true;
            let v = h.value.trim_ascii();
            lengths_differ |= first_cl.is_some_and(|f| f != v);
            first_cl.get_or_insert(v);
            cl = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
        }
    }
    if (te.is_some() && cl_seen) || lengths_differ {
        // hyper closes the connection after this request.
        return (State::Off, true);
    }
    let next = match (te, cl) {
        (Some(v), _) if last_coding_is_chunked(v) => State::ChunkSize(0, Line::Start),
        // Any other Transfer-Encoding is refused by hyper.
        (Some(_), _) => State::Off,
        (None, Some(0)) => State::Head(Vec::new()),
        (None, Some(n)) => State::Body(n),
        (None, None) if cl_seen => State::Off,
        (None, None) => State::Head(Vec::new()),
    };
    (next, false)
}

fn last_coding_is_chunked(v: &[u8]) -> bool {
    v.rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The client's stream, with every byte read fed to a [`Scanner`]; `ambiguous` is set once it
/// finds an ambiguous request head.
pub struct Watched<S> {
    inner: S,
    scanner: Scanner,
    ambiguous: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, ambiguous: Arc<AtomicBool>) -> Self {
        Watched {
            inner,
            scanner: Scanner::default(),
            ambiguous,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if this.scanner.feed(&buf.filled()[before..]) {
                this.ambiguous.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One request as hyper handed it on in [`requests_hyper_reads`].
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub path: String,
    /// HTTP/1.x (the framing the scanner follows), not h2.
    pub http1: bool,
    /// Whether the connection's scanner had found an ambiguous head when hyper handed the
    /// request on: what veil-proxy's handler checks first.
    pub ambiguous: bool,
}

/// Serves `bytes` as one client connection (then end of stream) through hyper configured as
/// veil-proxy's ([`super::proxy::server_builder`]), its reads watched by a [`Scanner`] as the
/// proxy's are: the requests hyper hands on, in order. The stream holds `write` bytes at most,
/// so hyper's reads are at most that long. Each body is read to its end, as the
/// proxy forwards it, and each request answered 404, as a backend might: a status after which
/// hyper reads the next request of any kind (a 2xx to `CONNECT` would end the connection, as
/// no upgrade is taken). No socket: an in-memory stream.
#[doc(hidden)]
pub async fn requests_hyper_reads(bytes: &[u8], write: usize) -> Vec<SeenRequest> {
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // A pipe of `write` bytes: hyper cannot read more at once than the client wrote.
    let write = write.clamp(1, bytes.len() + 1);
    let (client, server) = tokio::io::duplex(write);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let ambiguous = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = ambiguous.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let _ = tx.send(SeenRequest {
            path: req.uri().path().to_owned(),
            http1: req.version() < hyper::Version::HTTP_2,
            ambiguous: flag.load(Ordering::Relaxed),
        });
        async move {
            let _ = req.into_body().collect().await;
            let mut r = hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let builder = super::proxy::server_builder();
    let serve = builder.serve_connection(
        hyper_util::rt::TokioIo::new(Watched::new(server, ambiguous)),
        svc,
    );
    let send = async {
        // Fails once hyper closed the connection.
        let _ = to_server.write_all(bytes).await;
        let _ = to_server.shutdown().await;
    };
    // Responses are read meanwhile, so that a full pipe never stalls hyper.
    let mut answers = Vec::new();
    let receive = from_server.read_to_end(&mut answers);
    let _ = tokio::join!(serve, send, receive);
    let mut seen = Vec::new();
    while let Ok(r) = rx.try_recv() {
        seen.push(r);
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` in order; whether the scanner found an ambiguous head.
    fn scan(parts: &[&[u8]]) -> bool {
        let mut s = Scanner::default();
        parts.iter().fold(false, |_, p| s.feed(p))
    }

    /// Feeds `bytes` one byte at a time.
    fn scan_bytewise(bytes: &[u8]) -> bool {
        let mut s = Scanner::default();
        bytes.iter().fold(false, |_, b| s.feed(&[*b]))
    }

    const BOTH_CL_FIRST: &[u8] =
        b"GET /api HTTP/1.1\r\nHost: b\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    const BOTH_TE_FIRST: &[u8] =
        b"POST /api HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";

    #[test]
    fn a_head_with_both_lengths_is_ambiguous_in_either_order() {
        assert!(scan(&[BOTH_CL_FIRST]));
        assert!(scan(&[BOTH_TE_FIRST]));
        assert!(scan_bytewise(BOTH_CL_FIRST));
        assert!(scan_bytewise(BOTH_TE_FIRST));
        // Header names in any case.
        assert!(scan(&[
            b"GET / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length: 1\r\n\r\n"
        ]));
    }

    #[test]
    fn two_different_content_lengths_are_ambiguous_and_equal_ones_are_not() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nabcde"
        ]));
    }

    #[test]
    fn clean_keep_alive_requests_are_not_ambiguous() {
        let clean: &[u8] = b"GET /a HTTP/1.1\r\nHost: b\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc\
            POST /c HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n\
            GET /d HTTP/1.1\r\nHost: b\r\n\r\n";
        assert!(!scan(&[clean]));
        assert!(!scan_bytewise(clean));
    }

    #[test]
    fn a_head_inside_a_body_is_body_and_the_next_real_head_is_read() {
        // A fixed-length body and a chunked body that each look like an ambiguous head: body.
        let fake = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let fixed = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{fake}",
            fake.len()
        );
        let chunked = format!(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{fake}\r\n0\r\n\r\n",
            fake.len()
        );
        for body in [&fixed, &chunked] {
            assert!(!scan(&[body.as_bytes()]), "{body}");
            assert!(!scan_bytewise(body.as_bytes()), "{body}");
            // … and a real ambiguous head after it is found.
            let then = [body.as_bytes(), BOTH_TE_FIRST].concat();
            assert!(scan(&[&then]), "{body}");
            assert!(scan_bytewise(&then), "{body}");
        }
    }

    #[test]
    fn streams_it_cannot_follow_are_left_to_hyper() {
        // HTTP/2 prior knowledge, a malformed chunk size: no more watching, so an
        // ambiguous-looking head after them is not reported (hyper ends those streams itself).
        let h2 = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" as &[u8], BOTH_TE_FIRST].concat();
        assert!(!scan(&[&h2]));
        for bad in [
            "zz\r\n",
            // A size of more than 64 bits, an LF without its CR, a CR without its LF.
            "10000000000000000\r\n",
            "5\n",
            "5\rx",
            "5;ext\n",
            // A digit after the spaces that end the size.
            "5 5\r\n",
        ] {
            let bad_chunk = [
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                bad.as_bytes(),
                BOTH_TE_FIRST,
            ]
            .concat();
            assert!(!scan(&[&bad_chunk]), "{bad:?}");
            assert!(!scan_bytewise(&bad_chunk), "{bad:?}");
        }
    }

    /// Chunked bodies hyper reads to their end, however odd their size lines and trailers:
    /// the scanner reads them too and finds the ambiguous head after them. The first (a size
    /// with leading zeros) once stopped the watch while hyper went on reading requests.
    const CHUNKED_HYPER_READS: [&str; 6] = [
        // 20 digits, most of them leading zeros.
        "00000000000000000003\r\nabc\r\n0\r\n\r\n",
        // Spaces and tabs after the size, an extension, and both.
        "3 \t \r\nabc\r\n0 \r\n\r\n",
        "3;a=b;c\r\nabc\r\n0;x\r\n\r\n",
        "3  ;a=\"b c\"\r\nabc\r\n0\r\n\r\n",
        // Trailers.
        "3\r\nabc\r\n0\r\nT: 1\r\nU: 2\r\n\r\n",
        // Zero-size chunk straight after the head.
        "0\r\n\r\n",
    ];

    fn chunked(body: &str) -> Vec<u8> {
        [
            b"POST /c HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n" as &[u8],
            body.as_bytes(),
        ]
        .concat()
    }

    #[test]
    fn chunk_size_lines_and_trailers_are_read_as_hyper_reads_them() {
        // An extension of 8 KiB (hyper allows up to 16 KiB of them in a body).
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(8 * 1024));
        let bodies = CHUNKED_HYPER_READS
            .iter()
            .copied()
            .chain([&*long_extension]);
        for body in bodies {
            let then = [&chunked(body), BOTH_TE_FIRST].concat();
            assert!(scan(&[&then]), "{body:?}");
            assert!(scan_bytewise(&then), "{body:?}");
            // The body alone is not ambiguous and leaves the scanner reading heads.
            let mut s = Scanner::default();
            assert!(!s.feed(&chunked(body)), "{body:?}");
            assert!(matches!(s.state, State::Head(_)), "{body:?}");
        }
    }

    #[test]
    fn an_upgrade_or_connect_request_is_followed_like_any_other() {
        // veil-proxy strips Upgrade and never switches protocols, so hyper reads the next
        // request on the connection as HTTP/1.
        for first in [
            "GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n",
            "POST / HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc",
        ] {
            let then = [first.as_bytes(), BOTH_TE_FIRST].concat();
            assert!(scan(&[&then]), "{first:?}");
            assert!(scan_bytewise(&then), "{first:?}");
        }
    }

    /// What [`requests_hyper_reads`] saw of the probe, an ambiguous request after `prefix`,
    /// with the client writing `write` bytes at a time.
    fn probe_after(prefix: &[u8], write: usize) -> Vec<SeenRequest> {
        let probe = b"POST /probe HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
        let bytes = [prefix, probe].concat();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(requests_hyper_reads(&bytes, write))
            .into_iter()
            .filter(|r| r.path == "/probe")
            .collect()
    }

    #[test]
    fn every_ambiguous_request_hyper_hands_on_has_been_flagged() {
        // The streams above, served by hyper as veil-proxy configures it, in one write, in
        // writes of 7 bytes and of one: hyper does read the ambiguous request after each of
        // them, and by then the scanner has flagged it.
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(8 * 1024));
        let mut prefixes: Vec<Vec<u8>> = CHUNKED_HYPER_READS
            .iter()
            .chain([&*long_extension].iter())
            .map(|b| chunked(b))
            .collect();
        prefixes.extend(
            [
                "",
                "GET /a HTTP/1.1\r\nHost: b\r\n\r\n",
                "POST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc",
                "GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                "CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n",
            ]
            .map(|p| p.as_bytes().to_vec()),
        );
        for prefix in &prefixes {
            let shown = String::from_utf8_lossy(&prefix[..prefix.len().min(120)]);
            for write in [usize::MAX, 7, 1] {
                let seen = probe_after(prefix, write);
                assert_eq!(
                    seen.len(),
                    1,
                    "hyper did not read the probe after {shown:?} (writes of {write})"
                );
                assert!(
                    seen[0].ambiguous,
                    "not flagged after {shown:?} (writes of {write})"
                );
            }
        }
        // And hyper stops where the scanner does: after a size line it refuses.
        assert_eq!(probe_after(&chunked("5\n"), usize::MAX), vec![]);
    }

    #[test]
    fn a_head_is_followed_as_far_as_hyper_reads_it() {
        // hyper parses after each read and refuses a head still incomplete once it holds 16
        // KiB, but reads one that completes within the read that crossed that, whatever its
        // length. Found by the l7_framing fuzz target (a 16 KiB method token glued to the
        // probe's, in one write) when the scanner stopped at every head over 16 KiB.
        let long_head = [
            b"POST / HTTP/1.1\r\nUpgrade: h2c\r\n\r\nab" as &[u8],
            &[b'a'; 16320],
            b"c",
        ]
        .concat();
        let seen = probe_after(&long_head, usize::MAX);
        assert_eq!(
            seen.len(),
            1,
            "hyper did not read the long head in one write"
        );
        assert!(
            seen[0].ambiguous,
            "hyper read a long ambiguous head unflagged"
        );
        // In smaller reads hyper reads it, or refuses it (431) once an incomplete head fills
        // its buffer; whatever it reads has been flagged.
        for write in [100, 7] {
            let seen = probe_after(&long_head, write);
            assert!(
                seen.iter().all(|r| r.ambiguous),
                "writes of {write}: {seen:?}"
            );
        }
    }

    #[test]
    fn the_reads_a_stream_comes_in_do_not_change_what_is_found() {
        // Whole, byte by byte, or in reads of any size, where hyper reads them alike: chunked
        // bodies and a head just under the 16 KiB hyper holds.
        let near_limit = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES - 24)
        );
        let mut streams: Vec<Vec<u8>> = CHUNKED_HYPER_READS.iter().map(|b| chunked(b)).collect();
        streams.push(near_limit.into_bytes());
        for stream in &streams {
            let then = [stream, BOTH_TE_FIRST].concat();
            let mut whole = Scanner::default();
            let found = whole.feed(&then);
            for cut in [1, 2, 7, 100, 4096, 16 * 1024] {
                let mut s = Scanner::default();
                let got = then.chunks(cut).fold(false, |_, c| s.feed(c));
                let shown = String::from_utf8_lossy(&stream[..stream.len().min(60)]);
                assert_eq!(got, found, "reads of {cut}: {shown:?}");
                assert_eq!(
                    matches!(s.state, State::Off),
                    matches!(whole.state, State::Off),
                    "reads of {cut}: {shown:?}"
                );
            }
        }
    }

    #[test]
    fn an_oversized_head_stops_the_watch() {
        let mut s = Scanner::default();
        s.feed(b"GET / HTTP/1.1\r\n");
        s.feed(&vec![b'a'; MAX_HEADER_BYTES + 1]);
        assert!(matches!(s.state, State::Off));
    }
}
