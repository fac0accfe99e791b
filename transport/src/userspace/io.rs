//! The packet threads of `veil-wg` and its UAPI server.
//!
//! Throughput comes from doing per-packet work without per-packet syscalls: the TUN device runs
//! with virtio-net headers so the kernel hands over TSO super-packets (split here, up to 64 KB a
//! read) and takes GRO-coalesced ones back; the UDP side sends with UDP GSO (one `sendmsg` per
//! run of equal-sized datagrams) and receives with UDP GRO and `recvmmsg` (quinn-udp); socket
//! buffers are sized so bursts are not dropped by the kernel.

use std::{
    io::{self, BufReader, IoSliceMut, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use boringtun::noise::{errors::WireGuardError, Packet, Tunn, TunnResult};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

use super::{
    device::{Device, Drops, Endpoint, Peer, PeerNoise},
    gro::Coalescer,
    initiation::Opened,
};
use crate::uapi::{self, Request};

/// WireGuard data overhead: 16-byte header + 16-byte tag (payload padded to 16).
const WG_OVERHEAD: usize = crate::DATA_OVERHEAD as usize;
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
    /// One socket for both families, as wireguard-go has two: `[::]` with IPv4 mapped in (IPv4
    /// peers are sent to and heard from as before; addresses come back as IPv4, see
    /// [`canonical`]). A kernel without IPv6 (`ipv6.disable=1`) gets an IPv4 socket.
    fn bind(port: u16) -> io::Result<Self> {
        let any = |ip: IpAddr| SocketAddr::new(ip, port);
        let sock = match unspecified_udp(any(std::net::Ipv6Addr::UNSPECIFIED.into())) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                unspecified_udp(any(Ipv4Addr::UNSPECIFIED.into()))?
            }
            r => r?,
        };
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

    /// Sends to `to.addr` from `to.local`; when that address is no longer this host's (it was
    /// removed: the kernel refuses it as a source), from whatever the route picks. The peer's
    /// next authenticated datagram, which follows by roaming, sets the new local address.
    fn send(&self, to: Endpoint, contents: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        match self.send_from(to.addr, to.local, contents, segment_size) {
            Err(e)
                if to.local.is_some()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
                    ) =>
            {
                self.send_from(to.addr, None, contents, segment_size)
            }
            r => r,
        }
    }

    fn send_from(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size,
            src_ip,
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

/// A UDP socket bound to `addr` (an unspecified address), IPv4 mapped in when it is IPv6.
fn unspecified_udp(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
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

/// How long a packet, timer or UAPI thread may stay inside one piece of work (not waiting in a
/// syscall) before veil-wg counts it as stuck and aborts, so its supervisor restarts it: a
/// process that is alive but moves no packets is worse than a dead one.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Per-thread "busy since" marks (milliseconds since start + 1; 0 = waiting for work).
pub struct Watchdog {
    start: Instant,
    threads: Vec<(String, AtomicU64)>,
}

impl Watchdog {
    fn new(names: Vec<String>) -> Self {
        Self {
            start: Instant::now(),
            threads: names.into_iter().map(|n| (n, AtomicU64::new(0))).collect(),
        }
    }

    fn busy(&self, i: usize) {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        if let Some((_, t)) = self.threads.get(i) {
            // Only the first mark of a piece of work counts.
            let _ = t.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn idle(&self, i: usize) {
        if let Some((_, t)) = self.threads.get(i) {
            t.store(0, Ordering::Relaxed);
        }
    }

    /// The first thread busy for longer than `limit`.
    fn stuck(&self, limit: Duration) -> Option<(&str, Duration)> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        self.threads.iter().find_map(|(name, t)| {
            let since = t.load(Ordering::Relaxed);
            let busy = Duration::from_millis(now.saturating_sub(since));
            (since != 0 && busy > limit).then_some((name.as_str(), busy))
        })
    }

    fn watch(&self) {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if let Some((name, busy)) = self.stuck(STUCK_AFTER) {
                eprintln!(
                    "veil-wg: thread {name} stuck for {} ms; aborting so the agent restarts veil-wg",
                    busy.as_millis()
                );
                std::process::abort();
            }
        }
    }
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
        .enable(false)
        .build_sync()?;
    crate::enable_without_link_local(&tun, &opts.name)?;
    let device = Arc::new(Device::new(&opts.name));
    let udp: Arc<RwLock<Option<Arc<Udp>>>> = Arc::new(RwLock::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let tun = Arc::new(tun);
    let mut queues = vec![tun.clone()];
    for _ in 1..opts.queues.max(1) {
        queues.push(Arc::new(tun.try_clone()?));
    }
    let mtu = usize::from(opts.mtu);
    let nq = queues.len();
    // Watchdog slots: one per TUN queue, then udp-rx, timers, uapi.
    let mut names: Vec<String> = (0..nq).map(|i| format!("tun-rx-{i}")).collect();
    names.extend(["udp-rx", "timers", "uapi"].map(String::from));
    let dog = Arc::new(Watchdog::new(names));
    for (i, q) in queues.into_iter().enumerate() {
        let (d, u, s, w) = (device.clone(), udp.clone(), stop.clone(), dog.clone());
        std::thread::Builder::new()
            .name(format!("tun-rx-{i}"))
            .spawn(move || tun_to_udp(&q, &d, &u, &s, mtu, (&w, i)))?;
    }
    {
        let (d, u, s, t, w) = (
            device.clone(),
            udp.clone(),
            stop.clone(),
            tun.clone(),
            dog.clone(),
        );
        std::thread::Builder::new()
            .name("udp-rx".into())
            .spawn(move || udp_to_tun(&t, &d, &u, &s, (&w, nq)))?;
    }
    {
        let (d, u, s, w) = (device.clone(), udp.clone(), stop.clone(), dog.clone());
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || timers(&d, &u, &s, (&w, nq + 1)))?;
    }
    let listener = bind_uapi(&opts.uapi_dir, &opts.name)?;
    {
        let (d, u, w) = (device.clone(), udp.clone(), dog.clone());
        std::thread::Builder::new()
            .name("uapi".into())
            .spawn(move || serve_uapi(listener, &d, &u, (&w, nq + 2)))?;
    }
    {
        let w = dog.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || w.watch())?;
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

/// UAPI connections served at once. Each has its own thread, so one slow or hostile client
/// (it must be root: the socket is 0600) cannot hold the socket past the agent's 3 s liveness
/// probe and get veil-wg killed as unresponsive; a connection over the cap is closed at once.
const UAPI_MAX_CONNECTIONS: usize = 32;

fn serve_uapi(
    listener: UnixListener,
    device: &Arc<Device>,
    udp: &Arc<RwLock<Option<Arc<Udp>>>>,
    (dog, slot): (&Arc<Watchdog>, usize),
) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A set is checked against the device's limits and applied as one step.
    let apply = Arc::new(std::sync::Mutex::new(()));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if active.fetch_add(1, Ordering::AcqRel) >= UAPI_MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            eprintln!("veil-wg: uapi: {UAPI_MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        }
        let (d, u, w, a, n) = (
            device.clone(),
            udp.clone(),
            dog.clone(),
            apply.clone(),
            active.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("uapi-conn".into())
            .spawn(move || {
                serve_uapi_conn(conn, &d, &u, (&w, slot), &a);
                n.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One UAPI connection: requests until the client closes, errs or is too slow.
fn serve_uapi_conn(
    conn: std::os::unix::net::UnixStream,
    device: &Arc<Device>,
    udp: &Arc<RwLock<Option<Arc<Udp>>>>,
    (dog, slot): (&Watchdog, usize),
    apply: &std::sync::Mutex<()>,
) {
    {
        let mut reader = BufReader::new(&conn);
        let mut writer = &conn;
        loop {
            // Bounded in line length, request size and time (see `uapi::read_request`): one
            // client cannot make this thread buffer without end or hold it past the timeout.
            let text = match uapi::read_request(&mut reader, uapi::REQUEST_TIMEOUT, |left| {
                conn.set_read_timeout(Some(left))
            }) {
                Ok(Some(text)) => text,
                Ok(None) => break,
                Err(uapi::ReadError::Refused(e)) => {
                    // The rest of the request is unread: answer, then close.
                    eprintln!("veil-wg: uapi: {e}");
                    let _ = writer.write_all(format!("errno={}\n\n", e.errno()).as_bytes());
                    break;
                }
                Err(e) => {
                    eprintln!("veil-wg: uapi: {e}");
                    break;
                }
            };
            dog.busy(slot);
            let port = || {
                udp.read()
                    .expect("udp lock")
                    .as_ref()
                    .map(|u| u.port)
                    .unwrap_or(0)
            };
            let answer = match uapi::parse_request(&text) {
                Ok(Request::Get) => {
                    let (cfg, st) = device.state(port());
                    uapi::format_get(&cfg, &st)
                }
                Ok(Request::Drops) => uapi::format_drops(&device.drops.counts()),
                // A set the device could not hold (peers, allowed IPs) is refused whole.
                Ok(Request::Set(req)) => {
                    let _one_at_a_time = apply.lock().unwrap_or_else(|e| e.into_inner());
                    match device.state(port()).0.try_apply(&req) {
                        Err(e) => {
                            eprintln!("veil-wg: uapi: {e}");
                            format!("errno={}\n\n", e.errno())
                        }
                        Ok(_) => {
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
                                    format!(
                                        "errno={}\n\n",
                                        e.raw_os_error().unwrap_or(uapi::EINVAL)
                                    )
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    eprintln!("veil-wg: uapi: {e}");
                    format!("errno={}\n\n", e.errno())
                }
            };
            dog.idle(slot);
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

/// Largest UDP payload of one GSO `sendmsg` (IPv4 total length minus IP and UDP headers).
const MAX_GSO_BYTES: usize = 65535 - 20 - 8;

/// Encrypted datagrams of one TUN batch, back to back in one buffer, sent after encryption
/// (no lock held) as GSO runs: equal-sized datagrams to one endpoint, the last may be shorter.
struct Outbox {
    buf: Vec<u8>,
    /// (endpoint, start, len) per datagram, in order.
    items: Vec<(Endpoint, usize, usize)>,
    cursor: usize,
    max_segments: usize,
}

impl Outbox {
    fn new(max_segments: usize, capacity: usize) -> Self {
        Self {
            // Sized once; never resized or cleared per packet.
            buf: vec![0u8; capacity],
            items: Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE),
            cursor: 0,
            max_segments,
        }
    }

    /// Room for the next datagram (None when the batch filled the buffer: send first).
    fn room(&mut self, need: usize) -> Option<&mut [u8]> {
        (self.cursor + need <= self.buf.len()).then(|| &mut self.buf[self.cursor..])
    }

    fn push(&mut self, dst: Endpoint, len: usize) {
        self.items.push((dst, self.cursor, len));
        self.cursor += len;
    }

    /// Sends everything: one `sendmsg` per run of contiguous equal-sized datagrams to one
    /// endpoint (a shorter one may end a run), capped by the GSO segment and size limits.
    fn send(&mut self, udp: &Udp, drops: &Drops) {
        let mut i = 0;
        while i < self.items.len() {
            let (dst, start, seg) = self.items[i];
            let mut j = i + 1;
            let mut end = start + seg;
            while j < self.items.len() && j - i < self.max_segments {
                let (d, s, l) = self.items[j];
                if d != dst || s != end || l > seg || end + l - start > MAX_GSO_BYTES {
                    break;
                }
                end += l;
                j += 1;
                if l < seg {
                    break;
                }
            }
            let segment_size = (j - i > 1).then_some(seg);
            if udp.send(dst, &self.buf[start..end], segment_size).is_err() {
                drops
                    .send_error
                    .fetch_add((j - i) as u64, Ordering::Relaxed);
            }
            i = j;
        }
        self.items.clear();
        self.cursor = 0;
    }
}

/// TUN → encrypt → UDP.
fn tun_to_udp(
    tun: &SyncDevice,
    device: &Device,
    udp: &RwLock<Option<Arc<Udp>>>,
    stop: &AtomicBool,
    mtu: usize,
    (dog, slot): (&Watchdog, usize),
) {
    let batch = tun_rs::IDEAL_BATCH_SIZE;
    let seg_room = mtu.max(1280) + 64;
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; seg_room]).collect();
    let mut sizes = vec![0usize; batch];
    let mut outbox: Option<Outbox> = None;
    while !stop.load(Ordering::Relaxed) {
        dog.idle(slot);
        let n = tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0);
        dog.busy(slot);
        let n = match n {
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
        let ob = outbox.get_or_insert_with(|| {
            Outbox::new(
                u.state.max_gso_segments().clamp(1, 64),
                batch * (seg_room + WG_OVERHEAD + 16),
            )
        });
        let routing = device.routing();
        // Packets of one read usually share a destination (a split TSO super-packet): look the
        // peer up once per destination address, read its endpoint once.
        let mut last: Option<(IpAddr, Arc<Peer>, Option<Endpoint>, u64)> = None;
        for (b, &len) in bufs.iter_mut().zip(&sizes).take(n) {
            // WireGuard pads the plaintext to a multiple of 16 bytes, never past the MTU
            // (whitepaper §5.4.6, as the kernel does), so packet sizes leak less; boringtun 0.7
            // does not, so the padding is added here. Receivers trim to the IP header's length.
            let padded = len.next_multiple_of(16).min(len.max(mtu)).min(b.len());
            b[len..padded].fill(0);
            let pkt = &b[..padded];
            let Some(dst) = dst_addr(pkt) else {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if last.as_ref().is_none_or(|(ip, ..)| *ip != dst) {
                if let Some((_, p, _, bytes)) = last.take() {
                    p.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                match routing.by_ip.lookup(dst) {
                    Some(p) => last = Some((dst, p.clone(), p.route(), 0)),
                    None => {
                        device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            let Some((_, peer, ep, bytes)) = last.as_mut() else {
                continue;
            };
            let Some(ep) = *ep else {
                device.drops.no_endpoint.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let need = (len + WG_OVERHEAD + 16).max(HANDSHAKE_INIT_LEN);
            if ob.room(need).is_none() {
                ob.send(&u, &device.drops);
            }
            let Some(room) = ob.room(need) else {
                // Cannot happen (an empty outbox holds a whole batch); dropped, not panicked.
                device.drops.send_error.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // Locked per packet, not per batch: the receive thread decrypting this peer's
            // packets waits at most one encryption.
            let mut noise = peer.noise.lock().expect("noise lock");
            match noise.tx().encapsulate(pkt, room) {
                // A handshake initiation (type 1), returned because there is no session yet
                // (boringtun queued the packet). Told apart by its type, not its length: a data
                // message (type 4) can be 148 bytes too.
                TunnResult::WriteToNetwork(d) if d.len() == HANDSHAKE_INIT_LEN && d[0] == 1 => {
                    let init = d.to_vec();
                    drop(noise);
                    ob.send(&u, &device.drops);
                    let _ = u.send(ep, &init, None);
                }
                TunnResult::WriteToNetwork(d) => {
                    let used = d.len();
                    drop(noise);
                    ob.push(ep, used);
                    *bytes += used as u64;
                }
                TunnResult::Done => {}
                _ => {
                    device.drops.send_error.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some((_, p, _, bytes)) = last.take() {
            p.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        ob.send(&u, &device.drops);
    }
}

/// TUN writes are flushed when this many buffers wait (bounds memory, keeps latency low).
const TUN_FLUSH_AT: usize = 64;

/// Per-batch state of the receive thread: the peer of the last data packet (consecutive packets
/// are nearly always from one peer and one address), its plaintext bytes, and whether a packet
/// from that address authenticated — applied once per batch instead of once per packet.
#[derive(Default)]
struct RxPeer {
    current: Option<RxCurrent>,
}

struct RxCurrent {
    index: u32,
    peer: Arc<Peer>,
    from: SocketAddr,
    /// The local address the datagrams were sent to.
    to: Option<IpAddr>,
    bytes: u64,
    authenticated: bool,
}

impl RxPeer {
    fn settle(&mut self) {
        if let Some(c) = self.current.take() {
            c.peer.rx_bytes.fetch_add(c.bytes, Ordering::Relaxed);
            // WireGuard roaming: only an authenticated packet from a new address moves the
            // endpoint.
            if c.authenticated {
                c.peer.roam(c.from, c.to);
            }
        }
    }
}

/// Where the receive path sends its answers (handshake responses, cookie replies): the UDP
/// socket in veil-wg, a recorder in tests and the fuzz target. An answer leaves from the local
/// address its cause was sent to (`to.local`).
pub trait Reply {
    fn reply(&self, to: Endpoint, datagram: &[u8]);
}

impl Reply for Udp {
    fn reply(&self, to: Endpoint, datagram: &[u8]) {
        let _ = self.send(to, datagram, None);
    }
}

/// What `recvmmsg` reported for one receive buffer. Nothing in it is trusted: `len` may be 0
/// (an empty datagram) or larger than the buffer, `stride` (the GRO segment size) may be 0 or
/// larger than `len`.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub stride: usize,
    pub from: SocketAddr,
    /// The local address it was sent to (`IP_PKTINFO`), when the kernel said.
    pub to: Option<IpAddr>,
}

/// The datagrams of one receive buffer: GRO glued `len / stride` datagrams of `stride` bytes
/// (the last may be shorter). Never panics, whatever the metadata says; an empty datagram yields
/// nothing.
pub fn split_datagrams(buf: &[u8], meta: Received) -> impl Iterator<Item = &[u8]> {
    let data = &buf[..meta.len.min(buf.len())];
    let stride = match meta.stride {
        0 => data.len(),
        s => s,
    };
    // `chunks(0)` panics; an empty buffer has no chunks for any positive size.
    data.chunks(stride.max(1))
}

/// Receive-path state kept across batches: the TUN coalescer, the per-batch peer and scratch
/// space for the rate limiter.
pub struct RxState {
    co: Coalescer,
    rx: RxPeer,
    scratch: Vec<u8>,
}

impl Default for RxState {
    fn default() -> Self {
        Self {
            co: Coalescer::new(),
            rx: RxPeer::default(),
            scratch: vec![0u8; MAX_DATAGRAM],
        }
    }
}

/// One batch of received buffers → decrypted packets handed to `tun_write` (virtio header in
/// front), answers to `replies`. Everything from the bytes and metadata `recvmmsg` returned to
/// the TUN write: sans-IO, so tests and the fuzz target drive exactly what veil-wg runs.
pub fn receive_batch<'a, R: Reply>(
    batch: impl IntoIterator<Item = (&'a [u8], Received)>,
    device: &Device,
    replies: &R,
    state: &mut RxState,
    mut tun_write: impl FnMut(&[u8]),
) {
    let routing = device.routing();
    for (buf, meta) in batch {
        if meta.len == 0 {
            // An empty datagram is no WireGuard message: nothing to answer, nothing to change.
            device.drops.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        for datagram in split_datagrams(buf, meta) {
            handle_datagram(
                datagram,
                Endpoint {
                    addr: meta.from,
                    local: meta.to,
                },
                &routing,
                replies,
                device,
                &mut state.co,
                &mut state.rx,
                &mut state.scratch,
            );
            if state.co.len() >= TUN_FLUSH_AT {
                state.co.finish(&mut tun_write);
            }
        }
    }
    state.co.finish(&mut tun_write);
    state.rx.settle();
}

/// UDP → decrypt → TUN.
fn udp_to_tun(
    tun: &SyncDevice,
    device: &Device,
    udp: &RwLock<Option<Arc<Udp>>>,
    stop: &AtomicBool,
    (dog, slot): (&Watchdog, usize),
) {
    let batch = quinn_udp::BATCH_SIZE;
    let mut storage: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; MAX_DATAGRAM]).collect();
    let mut metas = vec![RecvMeta::default(); batch];
    let mut state = RxState::default();
    let fd = tun.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        dog.idle(slot);
        let Some(u) = read_lock(udp).clone() else {
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
        dog.busy(slot);
        let received = metas.iter().zip(&storage).take(n).map(|(m, b)| {
            (
                b.as_slice(),
                Received {
                    len: m.len,
                    stride: m.stride,
                    from: canonical(m.addr),
                    to: m.dst_ip.map(|ip| ip.to_canonical()),
                },
            )
        });
        receive_batch(received, device, &*u, &mut state, |b| write_tun(fd, b));
        if n < batch {
            // recvmmsg stopped short of the batch: the queue was empty. Wait for the next
            // datagram now instead of asking again only to hear EAGAIN: one syscall less per
            // wake-up, i.e. per packet of a request/response exchange.
            dog.idle(slot);
            wait_fd(u.socket.as_raw_fd(), libc::POLLIN, 200);
        }
    }
}

/// An address the dual-stack socket reports, IPv4 peers' as IPv4 (not `::ffff:a.b.c.d`): the
/// form endpoints are configured in, compared in and shown by `wg show`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads a lock whose writers never panic while holding it (and a panic aborts veil-wg anyway).
fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// One `write` per buffer: a GSO super-packet or a single packet, virtio header in front.
fn write_tun(fd: i32, b: &[u8]) {
    // SAFETY: write(2) from a valid slice on the TUN fd this thread owns a handle to.
    let r = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
    if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBADFD) {
        eprintln!("veil-wg: tun device gone");
        std::process::exit(1);
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_datagram<R: Reply>(
    datagram: &[u8],
    sender: Endpoint,
    routing: &super::device::Routing,
    udp: &R,
    device: &Device,
    co: &mut Coalescer,
    rx: &mut RxPeer,
    scratch: &mut [u8],
) {
    // Data packets (type 4, header + tag at least) skip the rate limiter, which only acts on
    // handshake messages; boringtun parses the packet again in `decapsulate`.
    let from = sender.addr;
    if datagram.len() >= 32 && datagram[..4] == [4, 0, 0, 0] {
        let index = u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) >> 8;
        let same = rx
            .current
            .as_ref()
            .is_some_and(|c| c.index == index && c.from == from && c.to == sender.local);
        if !same {
            rx.settle();
            match routing.by_index.get(&index) {
                Some(p) => {
                    rx.current = Some(RxCurrent {
                        index,
                        peer: p.clone(),
                        from,
                        to: sender.local,
                        bytes: 0,
                        authenticated: false,
                    })
                }
                None => {
                    device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let Some(cur) = rx.current.as_mut() else {
            return;
        };
        let peer = &cur.peer;
        let mut noise = peer.noise.lock().expect("noise lock");
        let Some(tunn) = noise.by_index(index) else {
            return;
        };
        let slot = co.slot();
        let (len, src) = match tunn.decapsulate(Some(from.ip()), datagram, slot) {
            TunnResult::WriteToTunnelV4(pkt, src) => (pkt.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(pkt, src) => (pkt.len(), IpAddr::V6(src)),
            // A keepalive: counted like data, as the kernel and wireguard-go count it.
            TunnResult::Done => {
                cur.authenticated = true;
                cur.bytes += datagram.len() as u64;
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                udp.reply(sender, reply);
                return;
            }
            TunnResult::Err(e) => {
                count_error(device, &e);
                return;
            }
        };
        cur.authenticated = true;
        if routing.source_allowed(peer, src) {
            cur.bytes += datagram.len() as u64;
            co.commit(len);
        } else {
            device.drops.bad_source.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    handle_control(datagram, sender, routing, udp, device, scratch);
}

/// Handshake initiations and responses and cookie replies: rare, so no batching here.
fn handle_control<R: Reply>(
    datagram: &[u8],
    sender: Endpoint,
    routing: &super::device::Routing,
    udp: &R,
    device: &Device,
    scratch: &mut [u8],
) {
    let Some(limiter) = &routing.rate_limiter else {
        return;
    };
    let from = sender.addr;
    let packet = match limiter.verify_packet(Some(from.ip()), datagram, scratch) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            device.drops.cookie.fetch_add(1, Ordering::Relaxed);
            udp.reply(sender, cookie);
            return;
        }
        Err(_) => {
            device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if matches!(
        packet,
        Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
    ) && !device.handshakes.allow(from.ip(), Instant::now())
    {
        device.drops.rate_limited.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // An initiation carries no index: its peer is the sender of the static key inside, and its
    // timestamp is read here so the peer's newest one outlives a `Tunn` replacement.
    let (peer, index, stamp) = match &packet {
        Packet::HandshakeInit(_) => {
            let (Some(sk), Some(pk)) = (&routing.static_private, &routing.static_public) else {
                return;
            };
            let Some(opened) = Opened::new(sk, pk, datagram) else {
                device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let Some(p) = routing.by_key.get(&crate::PublicKey(opened.peer_static)) else {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let Some(stamp) = opened.timestamp(&p.static_shared, datagram) else {
                device.drops.decrypt.fetch_add(1, Ordering::Relaxed);
                return;
            };
            (p.clone(), None, Some(stamp))
        }
        Packet::HandshakeResponse(r) => match routing.by_index.get(&(r.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(r.receiver_idx >> 8), None),
            None => return,
        },
        Packet::PacketCookieReply(c) => match routing.by_index.get(&(c.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(c.receiver_idx >> 8), None),
            None => return,
        },
        Packet::PacketData(d) => match routing.by_index.get(&(d.receiver_idx >> 8)) {
            Some(p) => (p.clone(), Some(d.receiver_idx >> 8), None),
            None => {
                device.drops.no_peer.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
    };
    let mut noise = peer.noise.lock().expect("noise lock");
    if stamp.is_some_and(|s| s <= noise.latest_initiation) {
        device.drops.replay.fetch_add(1, Ordering::Relaxed);
        initiate_after_stale(&peer, &mut noise, udp, Instant::now());
        return;
    }
    let mut accepted_initiation = false;
    let tunn = match index {
        // A handshake initiation always goes to the current Tunn (the newest keys).
        None => &mut noise.current.tunn,
        Some(i) => match noise.by_index(i) {
            Some(t) => t,
            None => return,
        },
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // boringtun stamps a new session with its own clock, which moves only in `update_timers`
    // (the timers thread, every 250 ms; a `Tunn` made by a configuration change reads 0 until
    // its first tick). Two sessions made within one tick, as crossing handshakes make them,
    // would tie, and on a tie the older one takes over sending as soon as the peer sends on it
    // (`set_current_session` switches on `>=`). Moving the clock first gives each session its
    // true age, so the newest keeps sending, as in the kernel and wireguard-go. Without it a
    // crossing against wireguard-go (whose response handling races its initiation handling and
    // can leave it unable to receive on the older session) cut veil-wg's sending for 15 s,
    // until boringtun's own rehandshake. Whatever the tick sends is what the timers thread
    // would have sent a moment later.
    if matches!(
        packet,
        Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
    ) {
        if let (TunnResult::WriteToNetwork(d), Some(ep)) =
            (tunn.update_timers(&mut buf), peer.route())
        {
            udp.reply(ep, d);
        }
    }
    match tunn.decapsulate(Some(from.ip()), datagram, &mut buf) {
        TunnResult::WriteToNetwork(reply) => {
            // The answer goes where the initiation came from, but the endpoint does not move:
            // an initiation proves only the static key, not the preshared key, so whoever
            // holds a copy of a peer's private key could otherwise steer that peer's traffic
            // to itself. The endpoint moves on packets of a completed session (which prove
            // the PSK too): the response below (`Done`) or authenticated data (`RxPeer`).
            udp.reply(sender, reply);
            accepted_initiation = index.is_none();
            // Flush packets queued while the handshake was in flight.
            while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], &mut buf) {
                udp.reply(sender, d);
            }
        }
        // A handshake response that completed a session.
        TunnResult::Done => peer.roam(from, sender.local),
        TunnResult::Err(e) => count_error(device, &e),
        _ => {}
    }
    if let (true, Some(s)) = (accepted_initiation, stamp) {
        noise.latest_initiation = s;
    }
    peer.note_handshake(&noise.current.tunn);
}

/// How often at most a stale initiation makes this side start a handshake (REKEY_TIMEOUT).
const INITIATE_AFTER_STALE_EVERY: Duration = Duration::from_secs(5);

/// An authentic initiation whose timestamp is not newer than the peer's newest is a replay, or
/// its sender's clock went back (a peer restarted after its clock was set back stamps from that
/// clock, and the protocol refuses it until its clock passes the old timestamps again, minutes
/// to hours). It gets no answer either way. Instead this side starts a handshake of its own,
/// to the peer's authenticated endpoint (never to where the stale message came from), at most
/// once per [`INITIATE_AFTER_STALE_EVERY`]: a peer whose clock went back has a session again
/// after one round trip, and a replay buys its sender one handshake every 5 s between the two
/// real peers. The kernel and wireguard-go do not do this; they recover only when the side
/// with the good clock initiates for reasons of its own.
fn initiate_after_stale<R: Reply>(peer: &Peer, noise: &mut PeerNoise, udp: &R, now: Instant) {
    if noise
        .initiated_after_stale
        .is_some_and(|t| now.duration_since(t) < INITIATE_AFTER_STALE_EVERY)
    {
        return;
    }
    let Some(endpoint) = peer.route() else {
        return;
    };
    noise.initiated_after_stale = Some(now);
    let mut buf = [0u8; 256];
    if let TunnResult::WriteToNetwork(d) = noise
        .current
        .tunn
        .format_handshake_initiation(&mut buf, false)
    {
        udp.reply(endpoint, d);
    }
}

/// Counts a packet boringtun refused: a replay (a data counter already seen, an initiation with
/// a timestamp not newer than the last) or anything else that failed to decrypt or verify.
fn count_error(device: &Device, e: &WireGuardError) {
    let counter = match e {
        WireGuardError::DuplicateCounter | WireGuardError::WrongTai64nTimestamp => {
            &device.drops.replay
        }
        _ => &device.drops.decrypt,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A keepalive on the wire: a data message with nothing inside (header 16, tag 16).
const KEEPALIVE_LEN: usize = 32;

/// WireGuard timers (handshake retries, keepalives, rekeys), the rate limiter's window, and
/// retiring replaced `Tunn`s.
fn timers(
    device: &Device,
    udp: &RwLock<Option<Arc<Udp>>>,
    stop: &AtomicBool,
    (dog, slot): (&Watchdog, usize),
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_reset = Instant::now();
    let mut last_drops = device.drops.summary();
    while !stop.load(Ordering::Relaxed) {
        dog.idle(slot);
        std::thread::sleep(Duration::from_millis(250));
        dog.busy(slot);
        let routing = device.routing();
        if last_reset.elapsed() >= Duration::from_secs(1) {
            if let Some(rl) = &routing.rate_limiter {
                rl.reset_count();
            }
            last_reset = Instant::now();
            device.handshakes.tick(last_reset);
            // The drop counters reach the log when they change, at most once a second.
            let drops = device.drops.summary();
            if drops != last_drops {
                eprintln!("veil-wg: {} dropped: {drops}", device.name);
                last_drops = drops;
            }
        }
        let u = udp.read().expect("udp lock").clone();
        let now = Instant::now();
        for peer in routing.by_key.values() {
            let mut noise = peer.noise.lock().expect("noise lock");
            noise.retire(now);
            let ep = peer.route();
            let result = noise.current.tunn.update_timers(&mut buf);
            if let (TunnResult::WriteToNetwork(d), Some(u), Some(ep)) = (result, &u, ep) {
                if u.send(ep, d, None).is_ok() && d.len() == KEEPALIVE_LEN {
                    peer.tx_bytes
                        .fetch_add(KEEPALIVE_LEN as u64, Ordering::Relaxed);
                }
            }
            // A handshake configuration started and the peer has not answered: again, sooner
            // than boringtun's 5 s (see `CONFIG_RETRY_AFTER`).
            if let (Some(u), Some(ep)) = (&u, ep) {
                if let Some(d) = noise.config_retry(now, &mut buf) {
                    let _ = u.send(ep, d, None);
                }
            }
            if let Some((old, _)) = &mut noise.retiring {
                // The retiring Tunn still answers keepalives for its sessions but never starts
                // a handshake of its own.
                if let TunnResult::WriteToNetwork(d) = old.tunn.update_timers(&mut buf) {
                    if d.len() == KEEPALIVE_LEN {
                        if let (Some(u), Some(ep)) = (&u, ep) {
                            if u.send(ep, d, None).is_ok() {
                                peer.tx_bytes
                                    .fetch_add(KEEPALIVE_LEN as u64, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            peer.note_handshake(&noise.current.tunn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wg_index(message: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(message[at..at + 4].try_into().unwrap())
    }

    /// Crossing handshakes: both sides initiate at once (the device as soon as its peer is set,
    /// the peer B at the same moment). The device answers B's initiation (session X, the device
    /// the responder), then takes B's answer to its own (session Y, the device the initiator):
    /// Y is the newer. B's keepalive on X must not take sending over from Y: the device's next
    /// data packet goes to B's index from its answer (Y), as the kernel and wireguard-go do.
    /// Seen failing without the clock tick in `handle_control`: both sessions were stamped 0,
    /// and the packet went to B's initiation's index (X).
    #[test]
    fn crossing_handshakes_leave_the_newest_session_sending() {
        use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
        const A_KEY: [u8; 32] = [0x31; 32];
        const B_KEY: [u8; 32] = [0x42; 32];
        let (a_sk, b_sk) = (
            crate::PrivateKey::from_bytes(A_KEY),
            crate::PrivateKey::from_bytes(B_KEY),
        );
        let b_at = SocketAddr::from(([198, 18, 0, 2], 51820));
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\npublic_key={}\nendpoint={b_at}\n\
             allowed_ip=198.19.2.0/24\n",
            a_sk.to_hex(),
            b_sk.public_key().to_hex()
        );
        let Ok(Request::Set(req)) = uapi::parse_request(&text) else {
            panic!("a set request")
        };
        let device = Device::new("cross0");
        let (_, ia) = device
            .apply(&req)
            .pop()
            .expect("the device initiates as soon as its peer is set");
        let mut b = Tunn::new(
            StaticSecret::from(B_KEY),
            XPublic::from(&StaticSecret::from(A_KEY)),
            None,
            None,
            9,
            None,
        );
        let mut out = vec![0u8; 2048];
        let sent = |r: TunnResult<'_>| match r {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("B sent nothing: {other:?}"),
        };
        let ib = sent(b.format_handshake_initiation(&mut out, false));
        let ra = sent(b.decapsulate(None, &ia, &mut out));
        let answers = super::super::fuzzing::Recorder::default();
        let mut state = RxState::default();
        let mut feed = |d: &[u8]| {
            answers.0.borrow_mut().clear();
            let meta = Received {
                len: d.len(),
                stride: 0,
                from: b_at,
                to: None,
            };
            receive_batch([(d, meta)], &device, &answers, &mut state, |_| {});
            answers
                .0
                .take()
                .into_iter()
                .map(|(_, d)| d)
                .collect::<Vec<_>>()
        };
        let rb = feed(&ib)
            .into_iter()
            .find(|m| m[0] == 2)
            .expect("the device answers B's initiation");
        feed(&ra);
        // B completes its own handshake and, as an initiator does, sends on it at once.
        let keepalive_on_x = sent(b.decapsulate(None, &rb, &mut out));
        assert_eq!(wg_index(&keepalive_on_x, 4), wg_index(&rb, 4));
        feed(&keepalive_on_x);
        let peer = device.routing().by_key.values().next().cloned().unwrap();
        let mut noise = peer.noise.lock().unwrap();
        let data = match noise.tx().encapsulate(&[0x45; 40], &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("the device has no session: {other:?}"),
        };
        assert_eq!(
            (data[0], wg_index(&data, 4)),
            (4, wg_index(&ra, 4)),
            "the device sends on the older session X (B's initiation's index {:#x}), not Y",
            wg_index(&ib, 4)
        );
    }

    #[test]
    fn watchdog_names_a_thread_busy_past_the_limit_only() {
        let dog = Watchdog::new(vec!["a".into(), "b".into()]);
        dog.busy(1);
        assert_eq!(dog.stuck(Duration::from_secs(5)), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            dog.stuck(Duration::from_millis(10)).map(|(n, _)| n),
            Some("b")
        );
        // Waiting for work is not being stuck; a new piece of work starts a new clock.
        dog.idle(1);
        assert_eq!(dog.stuck(Duration::from_millis(10)), None);
        dog.busy(0);
        assert_eq!(dog.stuck(Duration::from_millis(10)), None);
        // Out-of-range slots are ignored, not a panic.
        dog.busy(9);
        dog.idle(9);
    }
}
