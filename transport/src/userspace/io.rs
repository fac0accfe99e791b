//! The packet threads of `veil-wg` and its UAPI server.
//!
//! Throughput comes from doing per-packet work without per-packet syscalls: the TUN device runs
//! with virtio-net headers so the kernel hands over TSO super-packets (split here, up to 64 KB a
//! read) and takes GRO-coalesced ones back; the UDP side sends with UDP GSO (one `sendmsg` per
//! run of equal-sized datagrams) and receives with UDP GRO and `recvmmsg` (quinn-udp); socket
//! buffers are sized so bursts are not dropped by the kernel.

use std::{
    io::{self, BufRead as _, BufReader, IoSliceMut, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::device::{Device, Drops, Peer};
use crate::uapi::{self, Request};

/// Room in front of each TUN packet: the virtio-net header on writes.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// WireGuard data overhead: 16-byte header + 16-byte tag (payload padded to 16).
const WG_OVERHEAD: usize = 32;
const SOCKET_BUFFER: usize = 8 << 20;
const MAX_DATAGRAM: usize = 65535;
const HANDSHAKE_INIT_LEN: usize = 148;

/// Options of the device.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub mtu: u16,
    /// TUN queues, each with its own encrypting thread.
    pub queues: usize,
    pub uapi_dir: PathBuf,
}

/// The UDP side: socket plus quinn-udp state, replaced when the listen port changes.
pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    pub port: u16,
}

impl Udp {
    fn bind(port: u16) -> io::Result<Self> {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        force_buffers(&sock);
        let socket: UdpSocket = sock.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let port = socket.local_addr()?.port();
        Ok(Self {
            socket,
            state,
            port,
        })
    }

    fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            match self.state.try_send(UdpSockRef::from(&self.socket), &t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(self.socket.as_raw_fd(), libc::POLLOUT, 100)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE: root may exceed net.core.{r,w}mem_max, and an encrypted
/// 64 KB burst is ~45 datagrams that must not overflow a 208 KB default buffer.
fn force_buffers(sock: &socket2::Socket) {
    let v = SOCKET_BUFFER as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a valid fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn wait_fd(fd: i32, events: i16, timeout_ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
}

/// The running device: config, TUN queues, UDP socket.
pub struct Running {
    pub device: Arc<Device>,
    pub udp: Arc<RwLock<Option<Arc<Udp>>>>,
    pub stop: Arc<AtomicBool>,
}

impl Running {
    pub fn udp(&self) -> Option<Arc<Udp>> {
        self.udp.read().expect("udp lock").clone()
    }
}

/// Creates the TUN device and starts every thread. Returns once the UAPI socket is listening.
pub fn start(opts: &Options) -> io::Result<Running> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(&opts.name)
        .mtu(opts.mtu)
        .offload(true)
        .multi_queue(opts.queues > 1)
        .enable(true)
        .build_sync()?;
    let device = Arc::new(Device::new(&opts.name));
    let udp: Arc<RwLock<Option<Arc<Udp>>>> = Arc::new(RwLock::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let tun = Arc::new(tun);
    let mut queues = vec![tun.clone()];
    for _ in 1..opts.queues.max(1) {
        queues.push(Arc::new(tun.try_clone()?));
    }
    for (i, q) in queues.into_iter().enumerate() {
        let (d, u, s) = (device.clone(), udp.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("tun-rx-{i}"))
            .spawn(move || tun_to_udp(&q, &d, &u, &s))?;
    }
    {
        let (d, u, s, t) = (device.clone(), udp.clone(), stop.clone(), tun.clone());
        std::thread::Builder::new()
            .name("udp-rx".into())
            .spawn(move || udp_to_tun(&t, &d, &u, &s))?;
    }
    {
        let (d, u, s) = (device.clone(), udp.clone(), stop.clone());
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || timers(&d, &u, &s))?;
    }
    let listener = bind_uapi(&opts.uapi_dir, &opts.name)?;
    {
        let (d, u) = (device.clone(), udp.clone());
        std::thread::Builder::new()
            .name("uapi".into())
            .spawn(move || serve_uapi(listener, &d, &u))?;
    }
    Ok(Running { device, udp, stop })
}

pub fn uapi_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

fn bind_uapi(dir: &Path, name: &str) -> io::Result<UnixListener> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let path = uapi_path(dir, name);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn serve_uapi(listener: UnixListener, device: &Arc<Device>, udp: &Arc<RwLock<Option<Arc<Udp>>>>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(&conn);
        let mut writer = &conn;
        loop {
            let mut text = String::new();
            let mut line = String::new();
            let mut ended = false;
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line == "\n" => {
                        ended = true;
                        break;
                    }
                    Ok(_) => text.push_str(&line),
                    Err(_) => break,
                }
                if text.len() > (1 << 20) {
                    break;
                }
            }
            if !ended {
                break;
            }
            let answer = match uapi::parse_request(&text) {
                Ok(Request::Get) => {
                    let port = udp
                        .read()
                        .expect("udp lock")
                        .as_ref()
                        .map(|u| u.port)
                        .unwrap_or(0);
                    let (cfg, st) = device.state(port);
                    uapi::format_get(&cfg, &st)
                }
                Ok(Request::Set(req)) => {
                    let inits = device.apply(&req);
                    match rebind(device, udp) {
                        Ok(()) => {
                            if let Some(u) = udp.read().expect("udp lock").clone() {
                                for (ep, d) in inits {
                                    let _ = u.send(ep, &d, None);
                                }
                            }
                            "errno=0\n\n".to_string()
                        }
                        Err(e) => {
                            eprintln!("veil-wg: cannot bind udp port: {e}");
                            format!("errno={}\n\n", e.raw_os_error().unwrap_or(uapi::EINVAL))
                        }
                    }
                }
                Err(e) => {
                    eprintln!("veil-wg: uapi: {e}");
                    format!("errno={}\n\n", e.errno())
                }
            };
            if writer.write_all(answer.as_bytes()).is_err() {
                break;
            }
        }
    }
}

/// Binds (or rebinds) the UDP socket to the configured listen port.
fn rebind(device: &Device, udp: &RwLock<Option<Arc<Udp>>>) -> io::Result<()> {
    let want = device.listen_port.load(Ordering::Relaxed) as u16;
    let current = udp.read().expect("udp lock").as_ref().map(|u| u.port);
    if current.is_some() && (want == 0 || current == Some(want)) {
        return Ok(());
    }
    let u = Udp::bind(want)?;
    eprintln!("veil-wg: {} listening on udp port {}", device.name, u.port);
    *udp.write().expect("udp lock") = Some(Arc::new(u));
    Ok(())
}

/// Destination address of an IP packet.
fn dst_addr(p: &[u8]) -> Option<IpAddr> {
    Tunn::dst_address(p)
}

/// Encrypted datagrams waiting to go out, grouped so a run of equal-sized datagrams to one
/// endpoint (the last may be shorter) leaves in one GSO `sendmsg`.
struct Outbox {
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    dst: Option<SocketAddr>,
    max_segments: usize,
}

impl Outbox {
    fn new(max_segments: usize) -> Self {
        Self {
            buf: Vec::with_capacity(MAX_DATAGRAM + 4096),
            seg: 0,
            count: 0,
            dst: None,
            max_segments,
        }
    }

    /// Appends `room` bytes for the next datagram (flushing first if the batch is full) and
    /// returns where it starts.
    fn reserve(&mut self, udp: &Udp, room: usize, drops: &Drops) -> usize {
        if self.count >= self.max_segments || self.buf.len() + room > MAX_DATAGRAM {
            self.flush(udp, drops);
        }
        let start = self.buf.len();
        self.buf.resize(start + room, 0);
        start
    }

    /// Gives back reserved room that was not used.
    fn cancel(&mut self, start: usize) {
        self.buf.truncate(start);
    }

    /// Keeps the `used` bytes written at `start` as a datagram for `dst`. If it cannot join
    /// the current run (other endpoint, larger than the run's segments, or the run already
    /// ended with a shorter one) the run is sent first and this datagram starts the next.
    fn commit(&mut self, udp: &Udp, dst: SocketAddr, start: usize, used: usize, drops: &Drops) {
        self.buf.truncate(start + used);
        let joins = self.count == 0
            || (self.dst == Some(dst) && used <= self.seg && start == self.seg * self.count);
        if !joins {
            self.send_run(udp, start, drops);
            self.buf.copy_within(start..start + used, 0);
            self.buf.truncate(used);
        }
        if self.count == 0 {
            self.seg = used;
            self.dst = Some(dst);
        }
        self.count += 1;
    }

    fn send_run(&mut self, udp: &Udp, end: usize, drops: &Drops) {
        if self.count == 0 {
            return;
        }
        let dst = self.dst.expect("a run has a destination");
        let seg = (self.count > 1).then_some(self.seg);
        if udp.send(dst, &self.buf[..end], seg).is_err() {
            drops
                .send_error
                .fetch_add(self.count as u64, Ordering::Relaxed);
        }
        self.count = 0;
        self.dst = None;
    }

    fn flush(&mut self, udp: &Udp, drops: &Drops) {
        let end = self.buf.len();
        self.send_run(udp, end, drops);
        self.buf.clear();
    }
}

/// TUN → encrypt → UDP.
fn tun_to_udp(
    tun: &SyncDevice,
    device: &Device,
    udp: &RwLock<Option<Arc<Udp>>>,
    stop: &AtomicBool,
) {
    let batch = tun_rs::IDEAL_BATCH_SIZE;
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; 2048]).collect();
    let mut sizes = vec![0usize; batch];
    let mut outbox: Option<Outbox> = None;
    while !stop.load(Ordering::Relaxed) {
        let n = match tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if e.raw_os_error() == Some(libc::EBADFD) {
                    eprintln!("veil-wg: tun device gone: {e}");
                    std::process::exit(1);
                }
                continue;
            }
        };
        let Some(u) = udp.read().expect("udp lock").clone() else {
            device
                .drops
                .no_endpoint
                .fetch_add(n as u64, Ordering::Relaxed);
            continue;
        };

        let ob = outbox.get_or_insert_with(|| Outbox::new(u.state.max_gso_segments().clamp(1, 64)));
        let routing = device.routing();
        let mut i = 0;
        while i < n {
            let Some(dst) = dst_addr(&bufs[i][..sizes[i]]) else {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            };
            let Some(peer) = routing.by_ip.lookup(dst).cloned() else {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            };
            // The run of consecutive packets for the same peer is encrypted under one lock.
            let mut j = i + 1;
            while j < n
                && dst_addr(&bufs[j][..sizes[j]])
                    .and_then(|d| routing.by_ip.lookup(d))
                    .is_some_and(|p| Arc::ptr_eq(p, &peer))
            {
                j += 1;
            }
            encrypt_run(&peer, &bufs[i..j], &sizes[i..j], &u, ob, device);
            i = j;
        }
        ob.flush(&u, &device.drops);
    }
}

fn encrypt_run(
    peer: &Arc<Peer>,
    bufs: &[Vec<u8>],
    sizes: &[usize],
    udp: &Udp,
    ob: &mut Outbox,
    device: &Device,
) {
    let Some(ep) = peer.endpoint() else {
        device
            .drops
            .no_endpoint
            .fetch_add(bufs.len() as u64, Ordering::Relaxed);
        return;
    };
    let mut noise = peer.noise.lock().expect("noise lock");
    let tunn = noise.tx();
    let mut bytes = 0u64;
    for (b, &len) in bufs.iter().zip(sizes) {
        let room = (len + WG_OVERHEAD + 16).max(HANDSHAKE_INIT_LEN);
        let start = ob.reserve(udp, room, &device.drops);
        let (used, init) = match tunn.encapsulate(&b[..len], &mut ob.buf[start..]) {
            // Data is 32 + a multiple of 16 bytes, never 148: that is a handshake initiation,
            // returned because there is no session yet (boringtun queued the packet).
            TunnResult::WriteToNetwork(d) if d.len() == HANDSHAKE_INIT_LEN => (0, Some(d.to_vec())),
            TunnResult::WriteToNetwork(d) => (d.len(), None),
            TunnResult::Done => (0, None),
            _ => {
                device.drops.send_error.fetch_add(1, Ordering::Relaxed);
                (0, None)
            }
        };
        if used > 0 {
            bytes += len as u64;
            ob.commit(udp, ep, start, used, &device.drops);
        } else {
            ob.cancel(start);
        }
        if let Some(init) = init {
            ob.flush(udp, &device.drops);
            let _ = udp.send(ep, &init, None);
        }
    }
    peer.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
}

/// UDP → decrypt → TUN.
fn udp_to_tun(
    tun: &SyncDevice,
    device: &Device,
    udp: &RwLock<Option<Arc<Udp>>>,
    stop: &AtomicBool,
) {
    let batch = quinn_udp::BATCH_SIZE;
    let mut storage: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; MAX_DATAGRAM]).collect();
    let mut metas = vec![RecvMeta::default(); batch];
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut gro = GROTable::default();
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        let Some(u) = udp.read().expect("udp lock").clone() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let n = {
            let mut iovs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match u
                .state
                .recv(UdpSockRef::from(&u.socket), &mut iovs, &mut metas)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(u.socket.as_raw_fd(), libc::POLLIN, 200);
                    continue;
                }
                Err(_) => continue,
            }
        };
        let routing = device.routing();
        for (meta, buf) in metas.iter().zip(&storage).take(n) {
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            for datagram in buf[..meta.len].chunks(stride) {
                handle_datagram(
                    datagram,
                    meta.addr,
                    &routing,
                    &u,
                    device,
                    &mut out,
                    &mut pool,
                    &mut scratch,
                );
                if out.len() >= tun_rs::IDEAL_BATCH_SIZE {
                    write_tun(tun, &mut out, &mut pool, &mut gro);
                }
            }
        }
        write_tun(tun, &mut out, &mut pool, &mut gro);
    }
}

fn write_tun(
    tun: &SyncDevice,
    out: &mut Vec<Vec<u8>>,
    pool: &mut Vec<Vec<u8>>,
    gro: &mut GROTable,
) {
    if out.is_empty() {
        return;
    }
    if let Err(e) = tun.send_multiple(gro, out, TUN_OFFSET) {
        if e.raw_os_error() == Some(libc::EBADFD) {
            eprintln!("veil-wg: tun device gone: {e}");
            std::process::exit(1);
        }
    }
    pool.append(out);
}

#[allow(clippy::too_many_arguments)]
fn handle_datagram(
    datagram: &[u8],
    from: SocketAddr,
    routing: &super::device::Routing,
    udp: &Udp,
    device: &Device,
    out: &mut Vec<Vec<u8>>,
    pool: &mut Vec<Vec<u8>>,
    scratch: &mut [u8],
) {
    let Some(limiter) = &routing.rate_limiter else {
        return;
    };
    let packet = match limiter.verify_packet(Some(from.ip()), datagram, scratch) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            let _ = udp.send(from, cookie, None);
            return;
        }
        Err(_) => {
            device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (peer, index) = match &packet {
        Packet::HandshakeInit(init) => {
            let (Some(sk), Some(pk)) = (&routing.static_private, &routing.static_public) else {
                return;
            };
            let Ok(half) = parse_handshake_anon(sk, pk, init) else {
                device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
                return;
            };
            match routing
                .by_key
                .get(&crate::PublicKey(half.peer_static_public))
            {
                Some(p) => (p.clone(), None),
                None => {
                    device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        Packet::HandshakeResponse(r) => match routing.by_index.get(&(r.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(r.receiver_idx >> 8)),
            None => return,
        },
        Packet::PacketCookieReply(c) => match routing.by_index.get(&(c.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(c.receiver_idx >> 8)),
            None => return,
        },
        Packet::PacketData(d) => match routing.by_index.get(&(d.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(d.receiver_idx >> 8)),
            None => {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
    };
    let mut noise = peer.noise.lock().expect("noise lock");
    let tunn = match index {
        // A handshake initiation always goes to the current Tunn (the newest keys).
        None => &mut noise.current.tunn,
        Some(i) => match noise.by_index(i) {
            Some(t) => t,
            None => return,
        },
    };
    // tun-rs coalesces later packets of a TCP flow into the first one's buffer only when that
    // buffer can hold a whole 64 KB super-packet: without the capacity every packet is its own
    // TUN write.
    let mut buf = pool
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(2 * TUN_OFFSET + MAX_DATAGRAM));
    buf.resize(TUN_OFFSET + MAX_DATAGRAM.min(datagram.len() + 64), 0);
    match tunn.decapsulate(Some(from.ip()), datagram, &mut buf[TUN_OFFSET..]) {
        TunnResult::WriteToTunnelV4(pkt, src) => {
            let len = pkt.len();
            if routing.source_allowed(&peer, IpAddr::V4(src)) {
                buf.truncate(TUN_OFFSET + len);
                peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                out.push(buf);
            } else {
                device.drops.bad_source.fetch_add(1, Ordering::Relaxed);
                pool.push(buf);
            }
            peer.set_endpoint(from);
        }
        TunnResult::WriteToTunnelV6(pkt, src) => {
            let len = pkt.len();
            if routing.source_allowed(&peer, IpAddr::V6(src)) {
                buf.truncate(TUN_OFFSET + len);
                peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                out.push(buf);
            } else {
                device.drops.bad_source.fetch_add(1, Ordering::Relaxed);
                pool.push(buf);
            }
            peer.set_endpoint(from);
        }
        TunnResult::WriteToNetwork(reply) => {
            let _ = udp.send(from, reply, None);
            peer.set_endpoint(from);
            // Flush packets queued while the handshake was in flight.
            let mut q = vec![0u8; MAX_DATAGRAM];
            while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], &mut q) {
                let _ = udp.send(from, d, None);
            }
            pool.push(buf);
        }
        TunnResult::Done => {
            // A keepalive or a handshake response that completed a session.
            peer.set_endpoint(from);
            pool.push(buf);
        }
        TunnResult::Err(_) => {
            device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
            pool.push(buf);
        }
    }
    peer.note_handshake(&noise.current.tunn);
}

/// WireGuard timers (handshake retries, keepalives, rekeys), the rate limiter's window, and
/// retiring replaced `Tunn`s.
fn timers(device: &Device, udp: &RwLock<Option<Arc<Udp>>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_reset = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let routing = device.routing();
        if last_reset.elapsed() >= Duration::from_secs(1) {
            if let Some(rl) = &routing.rate_limiter {
                rl.reset_count();
            }
            last_reset = Instant::now();
        }
        let u = udp.read().expect("udp lock").clone();
        let now = Instant::now();
        for peer in routing.by_key.values() {
            let mut noise = peer.noise.lock().expect("noise lock");
            noise.retire(now);
            let ep = peer.endpoint();
            let result = noise.current.tunn.update_timers(&mut buf);
            if let (TunnResult::WriteToNetwork(d), Some(u), Some(ep)) = (result, &u, ep) {
                let _ = u.send(ep, d, None);
            }
            if let Some((old, _)) = &mut noise.retiring {
                // The retiring Tunn still answers keepalives for its sessions but never starts
                // a handshake of its own.
                if let TunnResult::WriteToNetwork(d) = old.tunn.update_timers(&mut buf) {
                    if d.len() == 32 {
                        if let (Some(u), Some(ep)) = (&u, ep) {
                            let _ = u.send(ep, d, None);
                        }
                    }
                }
            }
            peer.note_handshake(&noise.current.tunn);
        }
    }
}
