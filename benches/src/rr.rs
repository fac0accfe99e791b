//! TCP request/response latency, netperf TCP_RR style: one connection, one outstanding request
//! of `size` bytes, the server echoes `size` bytes back, the client times every round trip.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What one client run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrResult {
    pub size: usize,
    pub transactions: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// Serves echo connections until the process is killed (one thread per connection).
pub fn serve(port: u16) -> anyhow::Result<()> {
    // Both families where the namespace has IPv6 (an IPv6-only lab's pods), IPv4 where it is off.
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = vec![0u8; 65536];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Runs transactions for `warmup` (not recorded) then `duration`, and reports percentiles.
pub fn client(
    addr: SocketAddr,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RrResult> {
    let mut conn = connect_retrying(addr)?;
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    measure(size, warmup, duration, || {
        let t = Instant::now();
        conn.write_all(&req)?;
        conn.read_exact(&mut resp)?;
        Ok(t.elapsed())
    })
}

/// netperf TCP_CRR style: every transaction is a new connection (connect, one request of
/// `size` bytes, the echo, close), so what a connection's setup costs (a Service's translation,
/// an iptables rule walk) is in every sample.
pub fn crr_client(
    addr: SocketAddr,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RrResult> {
    drop(connect_retrying(addr)?);
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    measure(size, warmup, duration, || {
        let t = Instant::now();
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(&req)?;
        conn.read_exact(&mut resp)?;
        // RST instead of FIN: no TIME_WAIT pile-up exhausting the client's ports.
        set_linger_zero(&conn)?;
        drop(conn);
        Ok(t.elapsed())
    })
}

/// HTTP/1.1 request/response on one keep-alive connection: `GET path`, the whole response
/// (headers, then a `Content-Length` body) read before the next request. `size` in the result is
/// the response body's length.
pub fn http_client(
    addr: SocketAddr,
    path: &str,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RrResult> {
    let mut conn = connect_retrying(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
    let mut buf = Vec::with_capacity(4096);
    let mut body_len = 0;
    let r = measure(0, warmup, duration, || {
        let t = Instant::now();
        conn.write_all(&req)?;
        body_len = read_http_response(&mut conn, &mut buf)?;
        Ok(t.elapsed())
    })?;
    Ok(RrResult {
        size: body_len,
        ..r
    })
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; fails on any status but 200.
fn read_http_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("connection closed mid-response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(bad(format!(
            "status: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("no content-length".into()))?;
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("connection closed mid-body".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(len)
}

/// SO_LINGER with a zero timeout: close() sends RST and leaves no TIME_WAIT.
fn set_linger_zero(conn: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized linger value.
    let r = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn connect_retrying(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(anyhow::anyhow!("connect {addr}: {e}")),
        }
    };
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// Times `one` for `warmup` (not recorded), then for `duration`.
fn measure(
    size: usize,
    warmup: Duration,
    duration: Duration,
    mut one: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<RrResult> {
    let warm_end = Instant::now() + warmup;
    while Instant::now() < warm_end {
        one()?;
    }
    let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < duration {
        let d = one()?;
        samples.push(d.as_nanos().min(u32::MAX as u128) as u32);
    }
    let seconds = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        f64::from(samples[i]) / 1000.0
    };
    let mean = samples.iter().map(|&s| f64::from(s)).sum::<f64>() / samples.len().max(1) as f64;
    Ok(RrResult {
        size,
        transactions: samples.len() as u64,
        seconds,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        mean_us: mean / 1000.0,
    })
}

/// What one flood run sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodResult {
    pub datagrams: u64,
    pub send_errors: u64,
    pub seconds: f64,
}

/// New UDP flows, `ports` a second for `seconds`: second k sends one 16-byte datagram to each
/// of `ports` consecutive ports of `to`, from `first_port` in even seconds and from
/// `first_port + ports` in odd ones, from a socket of its own (a new source port each second,
/// so every datagram opens a new 5-tuple, and a destination port recurs every 2 s, past the
/// datapath's one-event-per-second throttle). Paced in 100 steps a second. Nothing needs to
/// listen: the datapath sees the flows on the way out.
pub fn flood(
    to: std::net::IpAddr,
    first_port: u16,
    ports: u16,
    seconds: u32,
) -> anyhow::Result<FloodResult> {
    const STEPS: u32 = 100;
    let start = Instant::now();
    let (mut datagrams, mut send_errors) = (0u64, 0u64);
    for k in 0..seconds {
        let sock = std::net::UdpSocket::bind(SocketAddr::new(
            if to.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        ))?;
        for step in 0..STEPS {
            let due =
                start + Duration::from_secs(u64::from(k)) + Duration::from_secs(1) * step / STEPS;
            // Pacing of the load, not a wait for a condition.
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let lo = u32::from(ports) * step / STEPS;
            let hi = u32::from(ports) * (step + 1) / STEPS;
            for p in lo..hi {
                let port = first_port
                    .wrapping_add((k % 2) as u16 * ports)
                    .wrapping_add(p as u16);
                match sock.send_to(b"veil-flow-bench\n", SocketAddr::new(to, port)) {
                    Ok(_) => datagrams += 1,
                    Err(_) => send_errors += 1,
                }
            }
        }
    }
    Ok(FloodResult {
        datagrams,
        send_errors,
        seconds: start.elapsed().as_secs_f64(),
    })
}
