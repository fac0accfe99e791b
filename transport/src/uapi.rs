//! The WireGuard cross-platform userspace API (UAPI), sans-IO: parsing and formatting `get=1`
//! and `set=1` exchanges, and applying a parsed `set` to a device configuration.
//!
//! See <https://www.wireguard.com/xplatform/>. Keys are hex on this wire. A `set` is parsed and
//! validated completely before anything is applied, so a bad request leaves the device exactly
//! as it was. Texts that carry private or preshared keys are built in a [`SecretText`], which
//! zeroizes every buffer it held, and handed out as `Zeroizing<String>`.

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use zeroize::Zeroizing;

use crate::{
    allowed_ips::IpPrefix,
    key::{KeyError, PresharedKey},
    tunnel::{DeviceState, PeerConfig, PeerState},
    PrivateKey, PublicKey,
};

pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;

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
    #[error("request must start with get=1 or set=1")]
    NoOperation,
    #[error("device answered errno={0}")]
    Errno(i32),
}

impl UapiError {
    /// The errno a device answers with for this error.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Errno(e) => *e,
            UapiError::NoOperation => EPROTO,
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

/// Parses one request (the lines up to, not including, the blank line that ends it).
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.is_empty());
    match lines.next() {
        Some((_, "get=1")) => Ok(Request::Get),
        Some((_, "set=1")) => parse_set_lines(lines).map(Request::Set),
        _ => Err(UapiError::NoOperation),
    }
}

fn parse_set_lines<'a>(
    lines: impl Iterator<Item = (usize, &'a str)>,
) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for (n, line) in lines {
        let Some((k, v)) = line.split_once('=') else {
            return Err(syntax(n, line));
        };
        if k == "public_key" {
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
                "allowed_ip" => peer.allowed_ips.push(v.parse().map_err(|e| bad(n, k, e))?),
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
    /// The configuration after a validated `set`. Pure: the caller swaps it in whole.
    pub fn apply(&self, req: &SetRequest) -> DeviceConfig {
        let mut next = self.clone();
        if let Some(k) = &req.private_key {
            next.private_key = if k.is_zero() { None } else { Some(k.clone()) };
        }
        if let Some(p) = req.listen_port {
            next.listen_port = p;
        }
        if let Some(m) = req.fwmark {
            next.fwmark = m;
        }
        if req.replace_peers {
            next.peers.clear();
        }
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
            if let Some(psk) = &change.preshared_key {
                peer.preshared_key = if psk.is_zero() {
                    None
                } else {
                    Some(psk.clone())
                };
            }
            if let Some(e) = change.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = change.persistent_keepalive {
                peer.persistent_keepalive = if k == 0 { None } else { Some(k) };
            }
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
                p.last_handshake = (secs > 0).then(|| UNIX_EPOCH + Duration::from_secs(secs));
            }
            ("last_handshake_time_nsec", Some(p)) => {
                if let Some(t) = p.last_handshake.as_mut() {
                    *t += Duration::from_nanos(num(v)?);
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

/// Seconds-precision wall clock for reports.
pub fn system_time_from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
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
mod tests {
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
            Request::Get => panic!("expected set"),
        }
    }

    #[test]
    fn get_and_set_are_recognized() {
        assert_eq!(parse_request("get=1\n"), Ok(Request::Get));
        assert_eq!(parse_request("bogus=1\n"), Err(UapiError::NoOperation));
        assert_eq!(parse_request(""), Err(UapiError::NoOperation));
    }

    #[test]
    fn set_round_trips_through_format() {
        let mut p = PeerChange::new(key(2));
        p.preshared_key = Some(PresharedKey::from_bytes([9; 32]));
        p.endpoint = Some("198.18.0.2:51820".parse().unwrap());
        p.persistent_keepalive = Some(25);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec!["198.19.2.0/24".parse().unwrap()];
        let req = SetRequest {
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
        };
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
            (format!("set=1\nlisten_port=99999\n"), "listen_port"),
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
}
