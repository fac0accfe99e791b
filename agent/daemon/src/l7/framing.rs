//! Request framing watched on the client's raw bytes, for the one smuggling shape hyper hides.
//!
//! hyper reads a request with both `Transfer-Encoding` and `Content-Length` as RFC 9112 §6.3
//! says an intermediary may: Transfer-Encoding wins, Content-Length is removed from the parsed
//! headers, and the connection closes after the response. Nothing hidden behind the body is ever
//! parsed, but the proxy cannot see that the request was ambiguous, so it could not refuse it.
//! [`Scanner`] follows the same bytes hyper reads, head by head and body by body (fixed length or
//! chunked), and remembers a head that carried both; the request handler then answers 400.
//!
//! The scanner only adds refusals. Where it cannot follow the stream (HTTP/2, an upgrade, a head
//! or chunk line hyper itself refuses), it stops watching and hyper's own handling stands.

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

/// Longest chunk-size line followed (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 4096;

enum State {
    /// Accumulating a request head, up to its blank line.
    Head(Vec<u8>),
    /// Skipping a body of known length.
    Body(u64),
    /// A chunk-size line.
    ChunkSize(Vec<u8>),
    /// Chunk data and the CRLF after it.
    ChunkData(u64),
    /// The trailer section after the last chunk, up to its blank line.
    Trailers(Vec<u8>),
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
                }
                let data: &[u8] = if old > 0 { buf } else { bytes };
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(data) {
                    Ok(httparse::Status::Complete(end)) => {
                        let (next, ambiguous) = after_head(&req);
                        self.ambiguous |= ambiguous;
                        self.state = next;
                        end.saturating_sub(old).min(bytes.len())
                    }
                    Ok(httparse::Status::Partial) if data.len() <= MAX_HEADER_BYTES => {
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
                    self.state = State::ChunkSize(Vec::new());
                }
                n as usize
            }
            State::ChunkSize(line) => {
                let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
                    line.extend_from_slice(bytes);
                    if line.len() > MAX_CHUNK_LINE {
                        self.state = State::Off;
                    }
                    return bytes.len();
                };
                line.extend_from_slice(&bytes[..nl]);
                self.state = match chunk_size(line) {
                    Some(0) => State::Trailers(Vec::new()),
                    // The data, then its CRLF.
                    Some(n) => State::ChunkData(n.saturating_add(2)),
                    None => State::Off,
                };
                nl + 1
            }
            State::Trailers(buf) => {
                // Byte by byte: a trailer section is a few lines at most.
                buf.push(bytes[0]);
                if buf.ends_with(b"\n") {
                    let line = &buf[buf[..buf.len() - 1]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1)..];
                    if line == b"\r\n" || line == b"\n" {
                        self.state = State::Head(Vec::new());
                        return 1;
                    }
                }
                if buf.len() > MAX_HEADER_BYTES {
                    self.state = State::Off;
                }
                1
            }
            State::Off => bytes.len(),
        }
    }
}

/// The state after a complete request head, and whether the head was ambiguous: both
/// Transfer-Encoding and Content-Length, or two different Content-Lengths.
fn after_head(req: &httparse::Request<'_, '_>) -> (State, bool) {
    let (mut te, mut cl, mut cl_seen, mut upgrade) = (None, None, false, false);
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
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if (te.is_some() && cl_seen) || lengths_differ {
        // hyper closes the connection after this request.
        return (State::Off, true);
    }
    if upgrade || req.method == Some("CONNECT") {
        return (State::Off, false);
    }
    let next = match (te, cl) {
        (Some(v), _) if last_coding_is_chunked(v) => State::ChunkSize(Vec::new()),
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

/// The size of a chunk-size line (hex, before any `;` extension), without its LF.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|&b| b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
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
        // HTTP/2 prior knowledge, an upgrade, a malformed chunk size: no more watching, so an
        // ambiguous-looking head after them is not reported (hyper handles those streams).
        let h2 = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" as &[u8], BOTH_TE_FIRST].concat();
        assert!(!scan(&[&h2]));
        let upgrade = [
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n" as &[u8],
            BOTH_TE_FIRST,
        ]
        .concat();
        assert!(!scan(&[&upgrade]));
        let bad_chunk = [
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" as &[u8],
            BOTH_TE_FIRST,
        ]
        .concat();
        assert!(!scan(&[&bad_chunk]));
        assert_eq!(chunk_size(b"1f;ext=1\r"), Some(31));
        assert_eq!(chunk_size(b"\r"), None);
        assert_eq!(chunk_size(b"12345678901234567\r"), None);
    }

    #[test]
    fn an_oversized_head_stops_the_watch() {
        let mut s = Scanner::default();
        s.feed(b"GET / HTTP/1.1\r\n");
        s.feed(&vec![b'a'; MAX_HEADER_BYTES + 1]);
        assert!(matches!(s.state, State::Off));
    }
}
