//! The WireGuard cross-platform userspace API (UAPI), sans-IO: parsing and formatting `get=1`
//! and `set=1` exchanges, and applying a parsed `set` to a device configuration.
//!
//! See <https://www.wireguard.com/xplatform/>. Keys are hex on this wire. A `set` is parsed and
//! validated completely before anything is applied, so a bad request leaves the device exactly
//! as it was. Texts that carry private or preshared keys are built in a [`SecretText`], which
//! zeroizes every buffer it held, and handed out as `Zeroizing<String>`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::{self, BufRead},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use zeroize::Zeroizing;

use crate::{
    allowed_ips::IpPrefix,
    key::{KeyError, PresharedKey},
    tunnel::{DeviceState, PeerConfig, PeerState},
    PrivateKey, PublicKey,
};

pub const E2BIG: i32 = 7;
pub const EINVAL: i32 = 22;
pub const ENOSPC: i32 = 28;
pub const EPROTO: i32 = 71;

/// Longest line of a request. The longest a client needs is an `endpoint=` with a scoped IPv6
/// address (under 80 bytes); a key line is 75.
pub const MAX_LINE_LEN: usize = 256;
/// Most peers a device holds, and so the most one `set` may name. Kubernetes supports clusters
/// of 5000 nodes and veil has one peer per other node; past this bound a `set` is refused
/// rather than growing per-peer state (noise state, timers, routing entries) without end.
pub const MAX_PEERS: usize = 8192;
/// Most allowed IPs a device holds in all, and so the most one `set` may name: veil gives each
/// peer its pod CIDR; this leaves eight per peer at the peer bound for other clients.
pub const MAX_ALLOWED_IPS: usize = 65536;
/// Largest request in bytes: a `set` naming [`MAX_PEERS`] peers, each with a preshared key, an
/// endpoint and a keepalive (about 350 bytes), plus [`MAX_ALLOWED_IPS`] `allowed_ip` lines of
/// an IPv6 prefix (under 60 bytes) fits.
pub const MAX_REQUEST_LEN: usize = 8 << 20;
/// How long a client has to send a whole request once the device waits for one; a connection
/// idle that long is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A malformed UAPI exchange, naming the line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("line {line}: expected key=value, got {text:?}")]
    Syntax { line: usize, text: String },
    #[error("line {line}: unknown key {key:?}")]
    UnknownKey { line: usize, key: String },
    #[error("line {line}: {key}: {message}")]
    BadValue {
        line: usize,
        key: String,
        message: String,
    },
    #[error("line {line}: {key} before any public_key")]
    NoPeer { line: usize, key: String },
    #[error("request must start with get=1, set=1 or veil-drops=1")]
    NoOperation,
    #[error("device answered errno={0}")]
    Errno(i32),
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong { line: usize, max: usize },
    #[error("request is longer than {max} bytes")]
    RequestTooLong { max: usize },
    #[error("request is not utf-8")]
    NotUtf8,
    #[error("line {line}: a set may name at most {max} {what}")]
    RequestTooMany {
        line: usize,
        what: &'static str,
        max: usize,
    },
    #[error("the device would hold more than {max} {what}")]
    DeviceFull { what: &'static str, max: usize },
}

impl UapiError {
    /// The errno a device answers with for this error.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Errno(e) => *e,
            UapiError::NoOperation => EPROTO,
            UapiError::RequestTooLong { .. } | UapiError::RequestTooMany { .. } => E2BIG,
            UapiError::DeviceFull { .. } => ENOSPC,
            _ => EINVAL,
        }
    }
}

/// One peer section of a `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(zero key)` clears the preshared key.
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpPrefix>,
}

impl PeerChange {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }

    /// A peer's own fields (a zero PSK or keepalive clears it); allowed IPs aside.
    fn apply_peer_fields(&self, peer: &mut PeerConfig) {
        if let Some(psk) = &self.preshared_key {
            peer.preshared_key = if psk.is_zero() {
                None
            } else {
                Some(psk.clone())
            };
        }
        if let Some(e) = self.endpoint {
            peer.endpoint = Some(e);
        }
        if let Some(k) = self.persistent_keepalive {
            peer.persistent_keepalive = if k == 0 { None } else { Some(k) };
        }
    }
}

/// A parsed `set=1` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetRequest {
    /// `Some(zero key)` removes the private key.
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    Set(SetRequest),
    /// `veil-drops=1`, veil-wg's own extension (no other implementation has it, `wg` never sends
    /// it): the device's drop counters, one `<reason>=<count>` line each, then `errno=0`.
    Drops,
}

/// A UAPI text that may carry key hex. Zeroized on drop, and on growth: a `String` that
/// reallocates frees its old buffer with the key still in it, so this one copies into a larger
/// zeroizing buffer itself and wipes the old one.
#[derive(Default)]
pub(crate) struct SecretText(Zeroizing<Vec<u8>>);

impl SecretText {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    pub(crate) fn push_bytes(&mut self, b: &[u8]) {
        let need = self.0.len() + b.len();
        if need > self.0.capacity() {
            let mut grown = Zeroizing::new(Vec::with_capacity(
                need.max(self.0.capacity().saturating_mul(2)).max(256),
            ));
            grown.extend_from_slice(&self.0);
            // The old buffer is zeroized as it drops here.
            self.0 = grown;
        }
        // Within capacity: never reallocates.
        self.0.extend_from_slice(b);
    }

    fn push_fmt(&mut self, args: fmt::Arguments<'_>) {
        // Writing to memory cannot fail.
        let _ = fmt::Write::write_fmt(self, args);
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// The text as a `String` in the same (zeroizing) buffer, not a copy.
    pub(crate) fn into_string(mut self) -> Result<Zeroizing<String>, std::str::Utf8Error> {
        match String::from_utf8(std::mem::take(&mut *self.0)) {
            Ok(s) => Ok(Zeroizing::new(s)),
            Err(e) => {
                let err = e.utf8_error();
                drop(Zeroizing::new(e.into_bytes()));
                Err(err)
            }
        }
    }
}

impl fmt::Write for SecretText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// A line without `=`: named in the error, unless it may hold a key.
fn syntax(line: usize, text: &str) -> UapiError {
    let text = if text.starts_with("private_key") || text.starts_with("preshared_key") {
        "<redacted key line>".to_string()
    } else {
        text.to_string()
    };
    UapiError::Syntax { line, text }
}

fn bad(line: usize, key: &str, e: impl std::fmt::Display) -> UapiError {
    UapiError::BadValue {
        line,
        key: key.to_string(),
        message: e.to_string(),
    }
}

fn key_err(line: usize, key: &str) -> impl Fn(KeyError) -> UapiError + '_ {
    move |e| bad(line, key, e)
}

fn parse_bool(line: usize, key: &str, v: &str) -> Result<bool, UapiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(line, key, "expected true or false")),
    }
}

/// Why reading a request stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the request")]
    Io(#[source] io::Error),
    #[error("request not complete within {0:?}")]
    Timeout(Duration),
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// Answer with its errno, then close: the rest of the request was not read.
    #[error(transparent)]
    Refused(UapiError),
}

/// Reads one request (its lines, up to the blank line that ends it) from `r`, bounded: a line
/// over [`MAX_LINE_LEN`] or a request over [`MAX_REQUEST_LEN`] is refused as soon as the bound
/// is crossed, without reading on, and the whole request must arrive within `timeout` (not
/// each read: a client trickling bytes cannot hold the server). `set_timeout` is called with
/// the time left before every read that may block (a socket's read timeout). `Ok(None)`: the
/// client closed, or sent nothing within `timeout`. The text is zeroized on drop (a `set`
/// carries keys).
pub fn read_request<R: BufRead>(
    r: &mut R,
    timeout: Duration,
    mut set_timeout: impl FnMut(Duration) -> io::Result<()>,
) -> Result<Option<Zeroizing<String>>, ReadError> {
    let deadline = Instant::now() + timeout;
    let mut text = SecretText::with_capacity(1024);
    let mut line_start = 0;
    let mut line = 1;
    loop {
        let idle = text.as_bytes().is_empty();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if idle {
                Ok(None)
            } else {
                Err(ReadError::Timeout(timeout))
            };
        }
        set_timeout(left).map_err(ReadError::Io)?;
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return if idle {
                    Ok(None)
                } else {
                    Err(ReadError::Timeout(timeout))
                };
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        if buf.is_empty() {
            return if idle {
                Ok(None)
            } else {
                Err(ReadError::Truncated)
            };
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.map_or(buf.len(), |i| i + 1)];
        let line_len =
            text.as_bytes().len() - line_start + chunk.len() - usize::from(newline.is_some());
        if line_len > MAX_LINE_LEN {
            return Err(ReadError::Refused(UapiError::LineTooLong {
                line,
                max: MAX_LINE_LEN,
            }));
        }
        if text.as_bytes().len() + chunk.len() > MAX_REQUEST_LEN {
            return Err(ReadError::Refused(UapiError::RequestTooLong {
                max: MAX_REQUEST_LEN,
            }));
        }
        text.push_bytes(chunk);
        let used = chunk.len();
        r.consume(used);
        if newline.is_some() {
            if line_len == 0 {
                // The blank line ends the request; it is not part of it.
                text.truncate(line_start);
                return text
                    .into_string()
                    .map(Some)
                    .map_err(|_| ReadError::Refused(UapiError::NotUtf8));
            }
            line += 1;
            line_start = text.as_bytes().len();
        }
    }
}

/// Parses one request (the lines up to, not including, the blank line that ends it).
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    if text.len() > MAX_REQUEST_LEN {
        return Err(UapiError::RequestTooLong {
            max: MAX_REQUEST_LEN,
        });
    }
    if let Some(line) = text.lines().position(|l| l.len() > MAX_LINE_LEN) {
        return Err(UapiError::LineTooLong {
            line: line + 1,
            max: MAX_LINE_LEN,
        });
    }
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.is_empty());
    match lines.next() {
        Some((_, "get=1")) => Ok(Request::Get),
        Some((_, "set=1")) => parse_set_lines(lines).map(Request::Set),
        Some((_, "veil-drops=1")) => Ok(Request::Drops),
        _ => Err(UapiError::NoOperation),
    }
}

fn parse_set_lines<'a>(
    lines: impl Iterator<Item = (usize, &'a str)>,
) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    let mut allowed_ips = 0usize;
    for (n, line) in lines {
        let Some((k, v)) = line.split_once('=') else {
            return Err(syntax(n, line));
        };
        if k == "public_key" {
            if req.peers.len() == MAX_PEERS {
                return Err(UapiError::RequestTooMany {
                    line: n,
                    what: "peers",
                    max: MAX_PEERS,
                });
            }
            req.peers.push(PeerChange::new(
                PublicKey::from_hex(v).map_err(key_err(n, k))?,
            ));
            continue;
        }
        if let Some(peer) = req.peers.last_mut() {
            match k {
                "remove" => peer.remove = parse_bool(n, k, v)?,
                "update_only" => peer.update_only = parse_bool(n, k, v)?,
                "preshared_key" => {
                    peer.preshared_key = Some(PresharedKey::from_hex(v).map_err(key_err(n, k))?)
                }
                "endpoint" => peer.endpoint = Some(parse_endpoint(v).map_err(|e| bad(n, k, e))?),
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(v.parse().map_err(|e| bad(n, k, e))?)
                }
                "replace_allowed_ips" => peer.replace_allowed_ips = parse_bool(n, k, v)?,
                "allowed_ip" => {
                    if allowed_ips == MAX_ALLOWED_IPS {
                        return Err(UapiError::RequestTooMany {
                            line: n,
                            what: "allowed ips",
                            max: MAX_ALLOWED_IPS,
                        });
                    }
                    allowed_ips += 1;
                    peer.allowed_ips.push(v.parse().map_err(|e| bad(n, k, e))?)
                }
                "protocol_version" => {
                    if v != "1" {
                        return Err(bad(n, k, "only protocol version 1 exists"));
                    }
                }
                _ => {
                    return Err(UapiError::UnknownKey {
                        line: n,
                        key: k.to_string(),
                    })
                }
            }
            continue;
        }
        match k {
            "private_key" => {
                req.private_key = Some(PrivateKey::from_hex(v).map_err(key_err(n, k))?)
            }
            "listen_port" => req.listen_port = Some(v.parse().map_err(|e| bad(n, k, e))?),
            "fwmark" => req.fwmark = Some(v.parse().map_err(|e| bad(n, k, e))?),
            "replace_peers" => req.replace_peers = parse_bool(n, k, v)?,
            "remove"
            | "update_only"
            | "preshared_key"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "protocol_version" => {
                return Err(UapiError::NoPeer {
                    line: n,
                    key: k.to_string(),
                })
            }
            _ => {
                return Err(UapiError::UnknownKey {
                    line: n,
                    key: k.to_string(),
                })
            }
        }
    }
    Ok(req)
}

/// `[v6]:port` or `v4:port`.
fn parse_endpoint(v: &str) -> Result<SocketAddr, String> {
    v.parse().map_err(|_| format!("{v:?} is not ip:port"))
}

/// A device's configuration as UAPI sees it (no runtime statistics).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceConfig {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    /// In insertion order, like the kernel's list.
    pub peers: Vec<PeerConfig>,
}

impl DeviceConfig {
    /// The device-wide fields of a `set` (a zero private key removes it); peers aside.
    fn apply_device_fields(&mut self, req: &SetRequest) {
        if let Some(k) = &req.private_key {
            self.private_key = if k.is_zero() { None } else { Some(k.clone()) };
        }
        if let Some(p) = req.listen_port {
            self.listen_port = p;
        }
        if let Some(m) = req.fwmark {
            self.fwmark = m;
        }
        if req.replace_peers {
            self.peers.clear();
        }
    }

    /// The configuration after a validated `set`. Pure: the caller swaps it in whole.
    pub fn apply(&self, req: &SetRequest) -> DeviceConfig {
        let mut next = self.clone();
        next.apply_device_fields(req);
        // Linear in the request and the device, however many peers and prefixes a set names
        // (a scan of every list per change is quadratic: seconds of CPU on the UAPI thread for
        // a set of a few megabytes). Peers are found by key; removed peers and prefixes taken
        // from a peer are holes until the end, so nothing is shifted or searched.
        let mut peers: Vec<Option<(PeerConfig, Vec<Option<IpPrefix>>)>> =
            std::mem::take(&mut next.peers)
                .into_iter()
                .map(|mut p| {
                    let ips = std::mem::take(&mut p.allowed_ips)
                        .into_iter()
                        .map(Some)
                        .collect();
                    Some((p, ips))
                })
                .collect();
        let mut index: HashMap<PublicKey, usize> = HashMap::with_capacity(peers.len());
        // Cryptokey routing: a prefix belongs to exactly one peer: (peer, position in its list).
        let mut owner: HashMap<IpPrefix, (usize, usize)> = HashMap::new();
        for (i, (p, ips)) in peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.as_ref()?)))
        {
            index.entry(p.public_key).or_insert(i);
            for (at, a) in ips.iter().enumerate() {
                if let Some(a) = a {
                    owner.insert(*a, (i, at));
                }
            }
        }
        let forget = |ips: &mut Vec<Option<IpPrefix>>,
                      owner: &mut HashMap<IpPrefix, (usize, usize)>,
                      i: usize| {
            for a in ips.drain(..).flatten() {
                if owner.get(&a).is_some_and(|(o, _)| *o == i) {
                    owner.remove(&a);
                }
            }
        };
        for change in &req.peers {
            let pos = index.get(&change.public_key).copied();
            if change.remove {
                if let Some(i) = pos {
                    if let Some((_, mut ips)) = peers.get_mut(i).and_then(Option::take) {
                        forget(&mut ips, &mut owner, i);
                    }
                    index.remove(&change.public_key);
                }
                continue;
            }
            let i = match pos {
                Some(i) => i,
                None if change.update_only => continue,
                None => {
                    peers.push(Some((
                        PeerConfig {
                            public_key: change.public_key,
                            preshared_key: None,
                            endpoint: None,
                            allowed_ips: Vec::new(),
                            persistent_keepalive: None,
                        },
                        Vec::new(),
                    )));
                    index.insert(change.public_key, peers.len() - 1);
                    peers.len() - 1
                }
            };
            let Some((peer, ips)) = peers.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            change.apply_peer_fields(peer);
            if change.replace_allowed_ips {
                forget(ips, &mut owner, i);
            }
            for a in &change.allowed_ips {
                match owner.get(a).copied() {
                    Some((o, _)) if o == i => continue,
                    // The last set wins: the prefix leaves its previous peer.
                    Some((o, at)) => {
                        if let Some(slot) = peers
                            .get_mut(o)
                            .and_then(Option::as_mut)
                            .and_then(|(_, other)| other.get_mut(at))
                        {
                            *slot = None;
                        }
                    }
                    None => {}
                }
                let Some((_, ips)) = peers.get_mut(i).and_then(Option::as_mut) else {
                    break;
                };
                owner.insert(*a, (i, ips.len()));
                ips.push(Some(*a));
            }
        }
        next.peers = peers
            .into_iter()
            .flatten()
            .map(|(mut p, ips)| {
                p.allowed_ips = ips.into_iter().flatten().collect();
                p
            })
            .collect();
        next
    }

    /// [`Self::apply`], refused whole if the result would hold more than [`MAX_PEERS`] peers
    /// or [`MAX_ALLOWED_IPS`] allowed IPs.
    pub fn try_apply(&self, req: &SetRequest) -> Result<DeviceConfig, UapiError> {
        let next = self.apply(req);
        next.check_limits()?;
        Ok(next)
    }

    /// Whether this configuration is within what one device holds.
    pub fn check_limits(&self) -> Result<(), UapiError> {
        if self.peers.len() > MAX_PEERS {
            return Err(UapiError::DeviceFull {
                what: "peers",
                max: MAX_PEERS,
            });
        }
        let ips: usize = self.peers.iter().map(|p| p.allowed_ips.len()).sum();
        if ips > MAX_ALLOWED_IPS {
            return Err(UapiError::DeviceFull {
                what: "allowed ips",
                max: MAX_ALLOWED_IPS,
            });
        }
        Ok(())
    }
}

/// Formats a `set=1` request (client side). It carries the private and preshared keys in hex:
/// zeroized on drop.
pub fn format_set(req: &SetRequest) -> Zeroizing<String> {
    let mut s = SecretText::with_capacity(256 + 320 * req.peers.len());
    s.push_fmt(format_args!("set=1\n"));
    if let Some(k) = &req.private_key {
        s.push_fmt(format_args!("private_key={}\n", k.hex()));
    }
    if let Some(p) = req.listen_port {
        s.push_fmt(format_args!("listen_port={p}\n"));
    }
    if let Some(m) = req.fwmark {
        s.push_fmt(format_args!("fwmark={m}\n"));
    }
    if req.replace_peers {
        s.push_fmt(format_args!("replace_peers=true\n"));
    }
    for p in &req.peers {
        s.push_fmt(format_args!("public_key={}\n", p.public_key.to_hex()));
        if p.remove {
            s.push_fmt(format_args!("remove=true\n"));
            continue;
        }
        if p.update_only {
            s.push_fmt(format_args!("update_only=true\n"));
        }
        if let Some(k) = &p.preshared_key {
            s.push_fmt(format_args!("preshared_key={}\n", k.hex()));
        }
        if let Some(e) = p.endpoint {
            s.push_fmt(format_args!("endpoint={e}\n"));
        }
        if let Some(k) = p.persistent_keepalive {
            s.push_fmt(format_args!("persistent_keepalive_interval={k}\n"));
        }
        if p.replace_allowed_ips {
            s.push_fmt(format_args!("replace_allowed_ips=true\n"));
        }
        for a in &p.allowed_ips {
            s.push_fmt(format_args!("allowed_ip={a}\n"));
        }
    }
    s.push_fmt(format_args!("\n"));
    s.into_string().expect("formatted from str")
}

/// Formats a `get=1` answer (device side). `private_key` is included as the protocol requires
/// (the socket is root-only), as are preshared keys: the text is built without stray copies
/// and zeroized on drop.
pub fn format_get_zeroizing(cfg: &DeviceConfig, state: &DeviceState) -> Zeroizing<String> {
    let mut s = SecretText::with_capacity(256 + 512 * cfg.peers.len());
    if let Some(k) = &cfg.private_key {
        s.push_fmt(format_args!("private_key={}\n", k.hex()));
    }
    s.push_fmt(format_args!("listen_port={}\n", state.listen_port));
    if cfg.fwmark != 0 {
        s.push_fmt(format_args!("fwmark={}\n", cfg.fwmark));
    }
    for (p, st) in cfg.peers.iter().zip(&state.peers) {
        s.push_fmt(format_args!("public_key={}\n", p.public_key.to_hex()));
        if let Some(k) = &p.preshared_key {
            s.push_fmt(format_args!("preshared_key={}\n", k.hex()));
        }
        s.push_fmt(format_args!("protocol_version=1\n"));
        if let Some(e) = st.endpoint.or(p.endpoint) {
            s.push_fmt(format_args!("endpoint={e}\n"));
        }
        let (sec, nsec) = st
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| (d.as_secs(), d.subsec_nanos()))
            .unwrap_or((0, 0));
        s.push_fmt(format_args!(
            "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n"
        ));
        s.push_fmt(format_args!(
            "tx_bytes={}\nrx_bytes={}\n",
            st.tx_bytes, st.rx_bytes
        ));
        s.push_fmt(format_args!(
            "persistent_keepalive_interval={}\n",
            p.persistent_keepalive.unwrap_or(0)
        ));
        for a in &p.allowed_ips {
            s.push_fmt(format_args!("allowed_ip={a}\n"));
        }
    }
    s.push_fmt(format_args!("errno=0\n\n"));
    s.into_string().expect("formatted from str")
}

/// [`format_get_zeroizing`] as a plain `String`: the one buffer that holds the keys, moved out
/// (no copy); the caller owns wiping it. Prefer [`format_get_zeroizing`].
pub fn format_get(cfg: &DeviceConfig, state: &DeviceState) -> String {
    std::mem::take(&mut *format_get_zeroizing(cfg, state))
}

/// Parses a `get=1` answer (client side).
pub fn parse_get(text: &str) -> Result<DeviceState, UapiError> {
    let mut st = DeviceState::default();
    let mut errno = None;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let n = i + 1;
        let Some((k, v)) = line.split_once('=') else {
            return Err(syntax(n, line));
        };
        if k == "public_key" {
            st.peers.push(PeerState {
                public_key: Some(PublicKey::from_hex(v).map_err(key_err(n, k))?),
                ..Default::default()
            });
            continue;
        }
        let num = |v: &str| v.parse::<u64>().map_err(|e| bad(n, k, e));
        match (k, st.peers.last_mut()) {
            ("errno", _) => errno = Some(v.parse::<i32>().map_err(|e| bad(n, k, e))?),
            ("private_key", None) => {
                st.public_key = Some(PrivateKey::from_hex(v).map_err(key_err(n, k))?.public_key())
            }
            ("listen_port", None) => st.listen_port = v.parse().map_err(|e| bad(n, k, e))?,
            ("fwmark", None) => st.fwmark = v.parse().map_err(|e| bad(n, k, e))?,
            ("preshared_key", Some(p)) => {
                p.has_preshared_key = PresharedKey::from_hex(v)
                    .map(|k| !k.is_zero())
                    .map_err(key_err(n, k))?
            }
            ("protocol_version", Some(_)) => {}
            ("endpoint", Some(p)) => {
                p.endpoint = Some(parse_endpoint(v).map_err(|e| bad(n, k, e))?)
            }
            ("last_handshake_time_sec", Some(p)) => {
                let secs = num(v)?;
                p.last_handshake = match secs {
                    0 => None,
                    s => Some(
                        system_time_from_unix(s)
                            .ok_or_else(|| bad(n, k, "not a representable time"))?,
                    ),
                };
            }
            ("last_handshake_time_nsec", Some(p)) => {
                let nsec = num(v)?;
                if nsec >= 1_000_000_000 {
                    return Err(bad(n, k, "must be below one second"));
                }
                if let Some(t) = p.last_handshake.as_mut() {
                    *t = t
                        .checked_add(Duration::from_nanos(nsec))
                        .ok_or_else(|| bad(n, k, "not a representable time"))?;
                }
            }
            ("tx_bytes", Some(p)) => p.tx_bytes = num(v)?,
            ("rx_bytes", Some(p)) => p.rx_bytes = num(v)?,
            ("persistent_keepalive_interval", Some(p)) => {
                let k = v.parse::<u16>().map_err(|e| bad(n, k, e))?;
                p.persistent_keepalive = (k > 0).then_some(k);
            }
            ("allowed_ip", Some(p)) => p.allowed_ips.push(v.parse().map_err(|e| bad(n, k, e))?),
            _ => {
                return Err(UapiError::UnknownKey {
                    line: n,
                    key: k.to_string(),
                })
            }
        }
    }
    match errno {
        Some(0) => Ok(st),
        Some(e) => Err(UapiError::Errno(e)),
        None => Err(UapiError::Syntax {
            line: 0,
            text: "missing errno".into(),
        }),
    }
}

/// Formats the answer to `veil-drops=1` (device side).
pub fn format_drops(counts: &[(&str, u64)]) -> String {
    let mut s: String = counts
        .iter()
        .map(|(reason, n)| format!("{reason}={n}\n"))
        .collect();
    s.push_str("errno=0\n\n");
    s
}

/// Parses the answer to `veil-drops=1` (client side): drop counters by reason.
pub fn parse_drops(text: &str) -> Result<BTreeMap<String, u64>, UapiError> {
    parse_errno(text)?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (reason, n) = line.split_once('=').ok_or_else(|| UapiError::Syntax {
            line: i + 1,
            text: line.to_string(),
        })?;
        if reason == "errno" {
            continue;
        }
        let n: u64 = n.parse().map_err(|e| bad(i + 1, reason, e))?;
        out.insert(reason.to_string(), n);
    }
    Ok(out)
}

/// Parses the `errno=N` answer to a `set`.
pub fn parse_errno(text: &str) -> Result<(), UapiError> {
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("errno=") {
            let e: i32 = v.trim().parse().map_err(|e| bad(1, "errno", e))?;
            return if e == 0 {
                Ok(())
            } else {
                Err(UapiError::Errno(e))
            };
        }
    }
    Err(UapiError::Syntax {
        line: 0,
        text: "missing errno".into(),
    })
}

/// Seconds-precision wall clock for reports; `None` past what `SystemTime` represents.
pub fn system_time_from_unix(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// A test allocator that looks into every heap block as it is freed for a marker (the hex of a
/// test key): proof that a secret was wiped before its memory went back to the allocator, not
/// only that a type says it would be. Blocks are handed out zeroed, so the scan never reads
/// uninitialized memory.
#[cfg(test)]
pub(crate) mod freed_memory {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    struct Scanning;

    thread_local! {
        // Plain `Copy` cells with const initializers: no destructor and no allocation, so the
        // allocator may use them.
        static MARKER: Cell<Option<&'static [u8]>> = const { Cell::new(None) };
        static FOUND: Cell<usize> = const { Cell::new(0) };
    }

    // SAFETY: forwards to the system allocator; `alloc` zeroes each block (so `dealloc` reads
    // only initialized bytes of a block that is still allocated), and the default `realloc`
    // goes through `alloc` and `dealloc`, so a block a `String` outgrew is scanned too.
    unsafe impl GlobalAlloc for Scanning {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: same contract as ours.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if let Ok(Some(marker)) = MARKER.try_with(Cell::get) {
                // SAFETY: `ptr` is a live block of `layout.size()` bytes, all initialized.
                let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                if block.windows(marker.len()).any(|w| w == marker) {
                    let _ = FOUND.try_with(|f| f.set(f.get() + 1));
                }
            }
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Scanning = Scanning;

    /// How many heap blocks this thread freed while `f` ran that still held `marker`.
    pub(crate) fn blocks_freed_holding(marker: &'static [u8], f: impl FnOnce()) -> usize {
        FOUND.with(|c| c.set(0));
        MARKER.with(|c| c.set(Some(marker)));
        f();
        MARKER.with(|c| c.set(None));
        FOUND.with(Cell::get)
    }

    #[test]
    fn the_scan_sees_a_plain_string() {
        let n = blocks_freed_holding(b"0123456789abcdef", || {
            let mut s = String::new();
            for _ in 0..64 {
                // Grows (reallocates) several times, then is freed.
                s.push_str("0123456789abcdef");
            }
            drop(s);
        });
        assert!(n >= 2, "{n}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Hex of half of `[0x5a; 32]` and of `[0xc3; 32]`: what must not outlive the texts.
    const PRIVATE_HEX: &[u8] = b"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
    const PSK_HEX: &[u8] = b"c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

    fn secret_request(peers: u8) -> SetRequest {
        SetRequest {
            private_key: Some(PrivateKey::from_bytes([0x5a; 32])),
            listen_port: Some(51820),
            peers: (0..peers)
                .map(|i| {
                    let mut p = PeerChange::new(key(10 + i));
                    p.preshared_key = Some(PresharedKey::from_bytes([0xc3; 32]));
                    p.allowed_ips = vec![format!("198.19.{i}.0/24").parse().unwrap()];
                    p
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn texts_carrying_keys_leave_no_copy_in_freed_memory() {
        // Enough peers that the text outgrows its first buffer.
        let req = secret_request(40);
        let cfg = DeviceConfig::default().apply(&req);
        let state = DeviceState {
            listen_port: 51820,
            peers: vec![PeerState::default(); cfg.peers.len()],
            ..Default::default()
        };
        for marker in [PRIVATE_HEX, PSK_HEX] {
            let hex = std::str::from_utf8(marker).unwrap();
            let leaked = freed_memory::blocks_freed_holding(marker, || {
                let text = format_set(&req);
                assert!(text.contains(hex));
                assert_eq!(set(&text).unwrap(), req);
                let text = format_get_zeroizing(&cfg, &state);
                assert!(text.contains(hex));
                assert_eq!(parse_get(&text).unwrap().peers.len(), 40);
            });
            assert_eq!(leaked, 0, "{hex}: freed blocks still held key hex");
        }
    }

    #[test]
    fn secret_text_wipes_the_buffers_it_outgrows() {
        let hex = std::str::from_utf8(PRIVATE_HEX).unwrap();
        let leaked = freed_memory::blocks_freed_holding(PRIVATE_HEX, || {
            let mut t = SecretText::with_capacity(8);
            for _ in 0..100 {
                t.push_fmt(format_args!("private_key={hex}\n"));
            }
            let s = t.into_string().unwrap();
            assert_eq!(s.len(), 100 * (hex.len() + 13));
        });
        assert_eq!(leaked, 0);
    }

    #[test]
    fn a_malformed_key_line_is_not_echoed() {
        let e = set(&format!("set=1\nprivate_key {}\n", "5a".repeat(32))).unwrap_err();
        assert!(!e.to_string().contains("5a5a"), "{e}");
        let e = parse_get(&format!("preshared_key:{}\nerrno=0\n", "5a".repeat(32))).unwrap_err();
        assert!(!e.to_string().contains("5a5a"), "{e}");
        // Other lines are still named.
        let e = set("set=1\njust a line\n").unwrap_err();
        assert!(e.to_string().contains("just a line"), "{e}");
    }

    fn key(b: u8) -> PublicKey {
        PrivateKey::from_bytes([b; 32]).public_key()
    }

    fn set(text: &str) -> Result<SetRequest, UapiError> {
        match parse_request(text)? {
            Request::Set(s) => Ok(s),
            other => panic!("expected set, got {other:?}"),
        }
    }

    #[test]
    fn drop_counters_round_trip_and_bad_answers_are_named() {
        assert_eq!(parse_request("veil-drops=1\n"), Ok(Request::Drops));
        let text = format_drops(&[("malformed", 3), ("no-peer", 0), ("replay", 12)]);
        assert_eq!(text, "malformed=3\nno-peer=0\nreplay=12\nerrno=0\n\n");
        let back = parse_drops(&text).unwrap();
        assert_eq!(
            back.into_iter().collect::<Vec<_>>(),
            [
                ("malformed".to_string(), 3),
                ("no-peer".to_string(), 0),
                ("replay".to_string(), 12)
            ]
        );
        // Another implementation refuses the request: its errno, not an empty map.
        assert_eq!(parse_drops("errno=22\n\n"), Err(UapiError::Errno(22)));
        let e = parse_drops("replay=x\nerrno=0\n\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("replay"), "{e}");
        let e = parse_drops("replay\nerrno=0\n\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("\"replay\""), "{e}");
    }

    #[test]
    fn get_and_set_are_recognized() {
        assert_eq!(parse_request("get=1\n"), Ok(Request::Get));
        assert_eq!(parse_request("bogus=1\n"), Err(UapiError::NoOperation));
        assert_eq!(parse_request(""), Err(UapiError::NoOperation));
    }

    /// A `set` naming every field: the private key ([1; 32]), the port, replace_peers, a peer
    /// (key 2) with every field (PSK [3; 32], two prefixes), and a removed peer (key 3).
    pub(crate) fn set_with_every_field() -> SetRequest {
        let mut p = PeerChange::new(key(2));
        p.preshared_key = Some(PresharedKey::from_bytes([3; 32]));
        p.endpoint = Some("198.18.0.2:51820".parse().unwrap());
        p.persistent_keepalive = Some(25);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec![
            "198.19.2.0/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ];
        SetRequest {
            private_key: Some(PrivateKey::from_bytes([1; 32])),
            listen_port: Some(51820),
            fwmark: None,
            replace_peers: true,
            peers: vec![
                p,
                PeerChange {
                    remove: true,
                    ..PeerChange::new(key(3))
                },
            ],
        }
    }

    #[test]
    fn set_round_trips_through_format() {
        let req = set_with_every_field();
        assert_eq!(set(&format_set(&req)).unwrap(), req);
    }

    #[test]
    fn bad_input_is_rejected_and_applies_nothing() {
        let good = format!(
            "set=1\npublic_key={}\nallowed_ip=198.19.2.0/24\n",
            key(2).to_hex()
        );
        let before = DeviceConfig::default().apply(&set(&good).unwrap());
        let cases: Vec<(String, &str)> = vec![
            (format!("{good}colour=blue\n"), "unknown key"),
            ("set=1\nlisten_port=99999\n".to_string(), "listen_port"),
            (
                format!("set=1\nprivate_key=zz{}\n", "0".repeat(62)),
                "not valid hex",
            ),
            (
                format!("set=1\nprivate_key={}\n", "ab".repeat(16)),
                "16 bytes",
            ),
            (
                format!("set=1\npublic_key={}\n", "0".repeat(63)),
                "not valid hex",
            ),
            (format!("{good}allowed_ip=198.19.2.0/40\n"), "allowed_ip"),
            (format!("{good}endpoint=nowhere\n"), "endpoint"),
            (format!("{good}remove=yes\n"), "remove"),
            (
                "set=1\nallowed_ip=1.2.3.4/32\n".to_string(),
                "before any public_key",
            ),
            ("set=1\njust a line\n".to_string(), "key=value"),
            (format!("{good}protocol_version=2\n"), "protocol version"),
        ];
        for (text, want) in cases {
            let e = set(&text).unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
            assert_eq!(e.errno(), EINVAL);
        }
        // Nothing was applied: the config is whatever the last good request made it.
        assert_eq!(before.peers.len(), 1);
    }

    #[test]
    fn apply_semantics() {
        let a = key(2);
        let b = key(3);
        let mut cfg = DeviceConfig::default();
        let mut pa = PeerChange::new(a);
        pa.allowed_ips = vec!["198.19.2.0/24".parse().unwrap()];
        pa.preshared_key = Some(PresharedKey::from_bytes([5; 32]));
        cfg = cfg.apply(&SetRequest {
            peers: vec![pa],
            listen_port: Some(51820),
            ..Default::default()
        });
        assert_eq!(cfg.listen_port, 51820);
        // A prefix moves to the peer that claims it last.
        let mut pb = PeerChange::new(b);
        pb.allowed_ips = vec!["198.19.2.0/24".parse().unwrap()];
        cfg = cfg.apply(&SetRequest {
            peers: vec![pb],
            ..Default::default()
        });
        assert!(cfg.peers[0].allowed_ips.is_empty());
        assert_eq!(cfg.peers[1].allowed_ips.len(), 1);
        // update_only does not create.
        let mut pc = PeerChange::new(key(4));
        pc.update_only = true;
        cfg = cfg.apply(&SetRequest {
            peers: vec![pc],
            ..Default::default()
        });
        assert_eq!(cfg.peers.len(), 2);
        // A zero preshared key clears it; remove removes.
        let mut clear = PeerChange::new(a);
        clear.preshared_key = Some(PresharedKey::from_bytes([0; 32]));
        cfg = cfg.apply(&SetRequest {
            peers: vec![clear],
            ..Default::default()
        });
        assert!(cfg.peers[0].preshared_key.is_none());
        cfg = cfg.apply(&SetRequest {
            peers: vec![PeerChange {
                remove: true,
                ..PeerChange::new(a)
            }],
            ..Default::default()
        });
        assert_eq!(cfg.peers.len(), 1);
        cfg = cfg.apply(&SetRequest {
            replace_peers: true,
            ..Default::default()
        });
        assert!(cfg.peers.is_empty());
    }

    #[test]
    fn get_round_trips() {
        let pk = PrivateKey::from_bytes([1; 32]);
        let cfg = DeviceConfig {
            private_key: Some(pk.clone()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerConfig {
                public_key: key(2),
                preshared_key: Some(PresharedKey::from_bytes([3; 32])),
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                allowed_ips: vec!["198.19.2.0/24".parse().unwrap()],
                persistent_keepalive: None,
            }],
        };
        let state = DeviceState {
            public_key: Some(pk.public_key()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerState {
                public_key: Some(key(2)),
                has_preshared_key: true,
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                allowed_ips: vec!["198.19.2.0/24".parse().unwrap()],
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: None,
            }],
        };
        assert_eq!(parse_get(&format_get(&cfg, &state)).unwrap(), state);
        assert_eq!(parse_get("errno=22\n\n"), Err(UapiError::Errno(22)));
        assert_eq!(parse_errno("errno=0\n\n"), Ok(()));
    }

    // ---- hostile input: bounds, arithmetic, cost ----

    /// A distinct key per index without curve arithmetic (thousands of peers).
    fn nth_key(i: usize) -> PublicKey {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        PublicKey(b)
    }

    fn nth_prefix(i: usize) -> IpPrefix {
        format!("{}.{}.{}.0/24", 10 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
            .parse()
            .unwrap()
    }

    #[test]
    fn a_set_names_at_most_max_peers_and_max_allowed_ips() {
        let mut text = String::from("set=1\n");
        for i in 0..MAX_PEERS {
            text += &format!("public_key={}\n", nth_key(i).to_hex());
        }
        assert_eq!(set(&text).unwrap().peers.len(), MAX_PEERS);
        text += &format!("public_key={}\n", nth_key(MAX_PEERS).to_hex());
        let e = set(&text).unwrap_err();
        assert_eq!(
            e,
            UapiError::RequestTooMany {
                line: MAX_PEERS + 2,
                what: "peers",
                max: MAX_PEERS
            }
        );
        assert_eq!(e.errno(), E2BIG);

        let mut text = format!("set=1\npublic_key={}\n", nth_key(0).to_hex());
        for i in 0..MAX_ALLOWED_IPS {
            text += &format!("allowed_ip={}\n", nth_prefix(i));
        }
        assert_eq!(
            set(&text).unwrap().peers[0].allowed_ips.len(),
            MAX_ALLOWED_IPS
        );
        text += &format!(
            "public_key={}\nallowed_ip=10.0.0.0/8\n",
            nth_key(1).to_hex()
        );
        assert!(matches!(
            set(&text),
            Err(UapiError::RequestTooMany {
                what: "allowed ips",
                ..
            })
        ));
    }

    fn peer_config(i: usize, ips: Vec<IpPrefix>) -> PeerConfig {
        PeerConfig {
            public_key: nth_key(i),
            preshared_key: None,
            endpoint: None,
            allowed_ips: ips,
            persistent_keepalive: None,
        }
    }

    #[test]
    fn a_set_the_device_cannot_hold_is_refused_whole() {
        let full = DeviceConfig {
            peers: (0..MAX_PEERS).map(|i| peer_config(i, Vec::new())).collect(),
            ..Default::default()
        };
        let one_more = SetRequest {
            peers: vec![PeerChange::new(nth_key(MAX_PEERS))],
            ..Default::default()
        };
        let e = full.try_apply(&one_more).unwrap_err();
        assert_eq!(
            e,
            UapiError::DeviceFull {
                what: "peers",
                max: MAX_PEERS
            }
        );
        assert_eq!(e.errno(), ENOSPC);
        // Within the bound: updating a peer, or removing one to make room, is fine.
        let update = SetRequest {
            peers: vec![PeerChange::new(nth_key(0))],
            ..Default::default()
        };
        assert_eq!(full.try_apply(&update).unwrap().peers.len(), MAX_PEERS);
        let swap = SetRequest {
            peers: vec![
                PeerChange {
                    remove: true,
                    ..PeerChange::new(nth_key(0))
                },
                PeerChange::new(nth_key(MAX_PEERS)),
            ],
            ..Default::default()
        };
        assert_eq!(full.try_apply(&swap).unwrap().peers.len(), MAX_PEERS);
        // Allowed IPs count across peers: two sets each within the request bound overflow the
        // device together.
        let half = |peer: usize, from: usize| SetRequest {
            peers: vec![PeerChange {
                allowed_ips: (from..from + MAX_ALLOWED_IPS / 2 + 1)
                    .map(nth_prefix)
                    .collect(),
                ..PeerChange::new(nth_key(peer))
            }],
            ..Default::default()
        };
        let cfg = DeviceConfig::default().try_apply(&half(0, 0)).unwrap();
        assert!(matches!(
            cfg.try_apply(&half(1, MAX_ALLOWED_IPS / 2 + 1)),
            Err(UapiError::DeviceFull {
                what: "allowed ips",
                ..
            })
        ));
    }

    #[test]
    fn the_largest_set_applies() {
        // Every peer and prefix the bounds allow, in one request: accepted, and each prefix
        // owned once.
        let per_peer = MAX_ALLOWED_IPS / MAX_PEERS;
        let req = SetRequest {
            peers: (0..MAX_PEERS)
                .map(|i| PeerChange {
                    allowed_ips: (i * per_peer..(i + 1) * per_peer).map(nth_prefix).collect(),
                    ..PeerChange::new(nth_key(i))
                })
                .collect(),
            ..Default::default()
        };
        let cfg = DeviceConfig::default().try_apply(&req).unwrap();
        assert_eq!(cfg.peers.len(), MAX_PEERS);
        // The same prefixes all moved to one peer.
        let steal = SetRequest {
            peers: vec![PeerChange {
                allowed_ips: (0..MAX_ALLOWED_IPS).map(nth_prefix).collect(),
                ..PeerChange::new(nth_key(0))
            }],
            ..Default::default()
        };
        let cfg = cfg.try_apply(&steal).unwrap();
        assert_eq!(cfg.peers[0].allowed_ips.len(), MAX_ALLOWED_IPS);
        assert!(cfg.peers[1..].iter().all(|p| p.allowed_ips.is_empty()));
    }

    /// `apply` before it was made linear: the model the fast one must agree with.
    fn reference_apply(cfg: &DeviceConfig, req: &SetRequest) -> DeviceConfig {
        let mut next = cfg.clone();
        next.apply_device_fields(req);
        for change in &req.peers {
            let pos = next
                .peers
                .iter()
                .position(|p| p.public_key == change.public_key);
            if change.remove {
                if let Some(i) = pos {
                    next.peers.remove(i);
                }
                continue;
            }
            let i = match pos {
                Some(i) => i,
                None if change.update_only => continue,
                None => {
                    next.peers.push(PeerConfig {
                        public_key: change.public_key,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                    });
                    next.peers.len() - 1
                }
            };
            let peer = &mut next.peers[i];
            change.apply_peer_fields(peer);
            if change.replace_allowed_ips {
                peer.allowed_ips.clear();
            }
            for a in &change.allowed_ips {
                if !peer.allowed_ips.contains(a) {
                    peer.allowed_ips.push(*a);
                }
            }
            // Cryptokey routing: a prefix belongs to exactly one peer; the last set wins.
            let owner = change.public_key;
            for other in next.peers.iter_mut().filter(|p| p.public_key != owner) {
                other
                    .allowed_ips
                    .retain(|a| !change.allowed_ips.contains(a));
            }
        }
        next
    }

    /// Seeded, so a failure comes back with the same inputs.
    struct Rng(fastrand::Rng);

    impl Rng {
        fn seeded(seed: u64) -> Rng {
            Rng(fastrand::Rng::with_seed(seed))
        }

        fn below(&mut self, n: usize) -> usize {
            self.0.usize(..n)
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    fn random_set(rng: &mut Rng) -> SetRequest {
        SetRequest {
            replace_peers: rng.chance(10),
            peers: (0..rng.below(7))
                .map(|_| PeerChange {
                    remove: rng.chance(15),
                    update_only: rng.chance(15),
                    preshared_key: rng
                        .chance(30)
                        .then(|| PresharedKey::from_bytes([rng.below(2) as u8; 32])),
                    endpoint: rng
                        .chance(30)
                        .then(|| SocketAddr::from(([198, 18, 0, 1], 51820))),
                    persistent_keepalive: rng.chance(30).then(|| rng.below(2) as u16 * 25),
                    replace_allowed_ips: rng.chance(30),
                    allowed_ips: (0..rng.below(4))
                        .map(|_| nth_prefix(rng.below(6)))
                        .collect(),
                    ..PeerChange::new(nth_key(rng.below(5)))
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn linear_apply_agrees_with_the_reference_model() {
        let mut rng = Rng::seeded(0x5eed_1234_abcd_ef01);
        for _ in 0..5_000 {
            let mut fast = DeviceConfig::default();
            let mut model = DeviceConfig::default();
            for _ in 0..6 {
                let req = random_set(&mut rng);
                fast = fast.apply(&req);
                model = reference_apply(&model, &req);
                assert_eq!(fast, model, "{req:?}");
            }
        }
    }

    /// Counts what a reader hands out; `read` supplies the bytes.
    struct Source<F> {
        read: F,
        taken: usize,
    }

    impl<F: FnMut(&mut [u8]) -> io::Result<usize>> io::Read for Source<F> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = (self.read)(b)?;
            self.taken += n;
            Ok(n)
        }
    }

    fn source<F: FnMut(&mut [u8]) -> io::Result<usize>>(read: F) -> io::BufReader<Source<F>> {
        io::BufReader::new(Source { read, taken: 0 })
    }

    fn no_timeout(_: Duration) -> io::Result<()> {
        Ok(())
    }

    #[test]
    fn requests_are_read_one_at_a_time() {
        let mut r = io::Cursor::new(b"get=1\n\nset=1\nlisten_port=1\n\n".to_vec());
        let t = Duration::from_secs(5);
        assert_eq!(
            read_request(&mut r, t, no_timeout)
                .unwrap()
                .as_deref()
                .map(String::as_str),
            Some("get=1\n")
        );
        assert_eq!(
            read_request(&mut r, t, no_timeout)
                .unwrap()
                .as_deref()
                .map(String::as_str),
            Some("set=1\nlisten_port=1\n")
        );
        assert!(read_request(&mut r, t, no_timeout).unwrap().is_none());
        // Closed mid-request, or bytes that are not text.
        let mut r = io::Cursor::new(b"set=1\nlisten_port=1\n".to_vec());
        assert!(matches!(
            read_request(&mut r, t, no_timeout),
            Err(ReadError::Truncated)
        ));
        let mut r = io::Cursor::new(b"set=1\n\xff=1\n\n".to_vec());
        assert!(matches!(
            read_request(&mut r, t, no_timeout),
            Err(ReadError::Refused(UapiError::NotUtf8))
        ));
    }

    #[test]
    fn an_endless_line_is_refused_without_reading_it() {
        // 64 MiB of one line (finite, so a reader without the bound ends too).
        let mut left = 64usize << 20;
        let mut r = source(|b: &mut [u8]| {
            let n = b.len().min(left);
            b[..n].fill(b'a');
            left -= n;
            Ok(n)
        });
        let e = read_request(&mut r, Duration::from_secs(5), no_timeout).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::Refused(UapiError::LineTooLong { line: 1, .. })
            ),
            "{e:?}"
        );
        assert!(
            r.get_ref().taken <= MAX_LINE_LEN + 8192,
            "{}",
            r.get_ref().taken
        );
        assert_eq!(
            parse_request(&format!("set=1\nendpoint={}\n", "1".repeat(MAX_LINE_LEN))),
            Err(UapiError::LineTooLong {
                line: 2,
                max: MAX_LINE_LEN
            })
        );
    }

    #[test]
    fn an_endless_request_is_refused_at_the_size_bound() {
        let line = b"listen_port=1\n";
        let mut at = 0;
        let mut r = source(|b: &mut [u8]| {
            let n = b.len().min((64usize << 20).saturating_sub(at));
            for x in &mut b[..n] {
                *x = line[at % line.len()];
                at += 1;
            }
            Ok(n)
        });
        let e = read_request(&mut r, Duration::from_secs(30), no_timeout).unwrap_err();
        assert!(
            matches!(e, ReadError::Refused(UapiError::RequestTooLong { .. })),
            "{e:?}"
        );
        assert!(r.get_ref().taken <= MAX_REQUEST_LEN + 8192);
        assert_eq!(
            ReadError::Refused(UapiError::RequestTooLong { max: 1 }).to_string(),
            "request is longer than 1 bytes"
        );
    }

    #[test]
    fn a_trickling_client_is_cut_off_at_the_request_deadline() {
        // One byte every 2 ms of a long valid request (a second of it): each read is quick, the
        // whole request is not.
        let line = b"listen_port=1\n";
        let mut at = 0;
        let mut r = io::BufReader::with_capacity(
            1,
            Source {
                read: |b: &mut [u8]| {
                    if at == 500 {
                        return Ok(0);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    b[0] = line[at % line.len()];
                    at += 1;
                    Ok(1)
                },
                taken: 0,
            },
        );
        let timeout = Duration::from_millis(150);
        let mut lefts = Vec::new();
        let t0 = Instant::now();
        let e = read_request(&mut r, timeout, |left| {
            lefts.push(left);
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, ReadError::Timeout(t) if t == timeout), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(lefts.windows(2).all(|w| w[1] <= w[0]) && lefts[0] <= timeout);
        // A socket read timeout: nothing sent is an idle close, half a request a timeout.
        let mut idle = source(|_: &mut [u8]| Err(io::ErrorKind::WouldBlock.into()));
        assert!(read_request(&mut idle, timeout, no_timeout)
            .unwrap()
            .is_none());
        let mut sent = false;
        let mut half = source(|b: &mut [u8]| {
            if std::mem::replace(&mut sent, true) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            b[..6].copy_from_slice(b"set=1\n");
            Ok(6)
        });
        assert!(matches!(
            read_request(&mut half, timeout, no_timeout),
            Err(ReadError::Timeout(_))
        ));
    }

    #[test]
    fn handshake_times_past_the_clock_are_errors_not_panics() {
        let peer = format!("public_key={}\n", nth_key(0).to_hex());
        for (sec, nsec) in [
            (u64::MAX.to_string(), "0"),
            ((i64::MAX as u64).to_string(), "999999999"),
            ("1".to_string(), "1000000000"),
            ("1".to_string(), &u64::MAX.to_string()),
        ] {
            let text = format!(
                "{peer}last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\nerrno=0\n"
            );
            let r = std::panic::catch_unwind(|| parse_get(&text));
            assert!(
                matches!(r, Ok(Err(UapiError::BadValue { .. })) | Ok(Ok(_))),
                "{sec} {nsec}: {r:?}"
            );
        }
        let text = format!("{peer}last_handshake_time_sec={}\nerrno=0\n", u64::MAX);
        assert!(matches!(
            parse_get(&text),
            Err(UapiError::BadValue { ref key, .. }) if key == "last_handshake_time_sec"
        ));
        assert_eq!(system_time_from_unix(u64::MAX), None);
        assert_eq!(
            system_time_from_unix(1),
            Some(UNIX_EPOCH + Duration::from_secs(1))
        );
    }

    #[test]
    fn random_requests_and_answers_never_panic() {
        const KEYS: [&str; 20] = [
            "get",
            "set",
            "private_key",
            "listen_port",
            "fwmark",
            "replace_peers",
            "public_key",
            "remove",
            "update_only",
            "preshared_key",
            "endpoint",
            "persistent_keepalive_interval",
            "replace_allowed_ips",
            "allowed_ip",
            "protocol_version",
            "last_handshake_time_sec",
            "last_handshake_time_nsec",
            "tx_bytes",
            "rx_bytes",
            "errno",
        ];
        let values = [
            "1".to_string(),
            "0".to_string(),
            "true".to_string(),
            u64::MAX.to_string(),
            "99999999999999999999999999".to_string(),
            "-1".to_string(),
            nth_key(3).to_hex(),
            "0".repeat(64),
            "zz".repeat(32),
            "[::1]:51820".to_string(),
            "[fe80::1%eth0]:1".to_string(),
            "198.18.0.1:65536".to_string(),
            "10.0.0.0/33".to_string(),
            "::/0".to_string(),
            "ü=ü".to_string(),
            String::new(),
        ];
        let mut rng = Rng::seeded(42);
        for _ in 0..20_000 {
            let mut text = String::new();
            if rng.chance(80) {
                text += ["get=1\n", "set=1\n"][rng.below(2)];
            }
            for _ in 0..rng.below(12) {
                let k = KEYS[rng.below(KEYS.len())];
                let v = &values[rng.below(values.len())];
                text += &match rng.below(10) {
                    0 => format!("{k}{v}\n"),
                    1 => format!("{k}=={v}\n"),
                    _ => format!("{k}={v}\n"),
                };
            }
            if let Ok(Request::Set(req)) = parse_request(&text) {
                let _ = DeviceConfig::default().try_apply(&req);
            }
            let _ = parse_get(&text);
            let _ = parse_errno(&text);
            let mut r = io::Cursor::new(text.into_bytes());
            let _ = read_request(&mut r, Duration::from_secs(1), no_timeout);
        }
    }
}
