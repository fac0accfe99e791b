//! The userspace WireGuard device inside `veil-wg`: configuration, peers and their boringtun
//! state, and the routing tables the packet threads read.
//!
//! Peers live in an immutable [`Routing`] snapshot swapped whole on every configuration change,
//! so the packet threads take one cheap `Arc` clone per batch and never see a half-applied
//! `set`. Per-peer noise state sits behind a mutex the threads hold per batch, not per packet.
//!
//! Preshared-key changes are make-before-break: the peer gets a new `Tunn` (new PSK, new local
//! index) that starts a handshake at once, while the old one keeps carrying traffic and
//! decrypting packets addressed to its index until the new session is up — the behaviour of
//! kernel WireGuard, where a new PSK takes effect at the next handshake.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant, SystemTime},
};

use boringtun::{
    noise::{rate_limiter::RateLimiter, Tunn, TunnResult},
    x25519,
};

use zeroize::Zeroizing;

use super::initiation::Tai64n;
use crate::{
    allowed_ips::AllowedIps,
    tunnel::{DeviceState, PeerConfig, PeerState},
    uapi::{DeviceConfig, SetRequest},
    PublicKey,
};

/// Handshake initiations the whole device accepts per second before demanding cookies (and
/// holding each source to [`super::limiter::PER_SOURCE_RATE`]).
pub const HANDSHAKE_RATE_LIMIT: u64 = 1000;
/// How long a replaced `Tunn` keeps decrypting after its successor's session is up.
const RETIRE_AFTER_SUCCESSOR: Duration = Duration::from_secs(15);
/// Hard cap on a retiring `Tunn`'s life (WireGuard's REJECT_AFTER_TIME).
const RETIRE_MAX: Duration = Duration::from_secs(180);
/// When a handshake that configuration started (a new peer, a new PSK, a new private key) is
/// tried again while it has no session, counted from its first initiation. Both sides of a
/// pair change together (the node handshake hands each the other's new key and PSK at about
/// the same moment), so that first initiation often reaches a peer not yet configured and is
/// dropped there; when both sides' first initiations cross in flight, each is lost, and
/// WireGuard's own retry (REKEY_TIMEOUT) would leave the pair without a session for 5 s. After
/// the last of these, boringtun's timers go on as usual.
pub const CONFIG_RETRY_AFTER: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(750),
    Duration::from_millis(1750),
    Duration::from_millis(3750),
];

/// Counters of packets the device dropped, by cause.
#[derive(Debug, Default)]
pub struct Drops {
    /// Datagrams that are no WireGuard message at all (empty).
    pub malformed: AtomicU64,
    pub no_peer: AtomicU64,
    pub bad_source: AtomicU64,
    pub decrypt: AtomicU64,
    /// Authentic packets already seen: a data counter inside or behind the replay window, or
    /// a handshake initiation whose TAI64N timestamp is not newer than the last one.
    pub replay: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub send_error: AtomicU64,
    /// Handshake messages refused under load for a missing or stale cookie (MAC2), each
    /// answered with a cookie reply.
    pub cookie: AtomicU64,
    /// Handshake messages over their source address's budget under load.
    pub rate_limited: AtomicU64,
}

impl Drops {
    /// Every cause with its count, by the cause's stable name.
    pub fn counts(&self) -> [(&'static str, u64); 9] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("malformed", n(&self.malformed)),
            ("no-peer", n(&self.no_peer)),
            ("bad-source", n(&self.bad_source)),
            ("decrypt", n(&self.decrypt)),
            ("replay", n(&self.replay)),
            ("no-endpoint", n(&self.no_endpoint)),
            ("send-failed", n(&self.send_error)),
            ("cookie", n(&self.cookie)),
            ("rate-limited", n(&self.rate_limited)),
        ]
    }

    /// One line for veil-wg's log: every cause with its count.
    pub fn summary(&self) -> String {
        self.counts()
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One `Tunn` and the local index its sessions answer to.
pub struct Noise {
    pub tunn: Tunn,
    pub index: u32,
}

/// The noise state of a peer: the current `Tunn`, and one being retired after a key change.
pub struct PeerNoise {
    pub current: Noise,
    pub retiring: Option<(Noise, Instant)>,
    /// When `current` first had a session (for retiring its predecessor).
    pub current_up_since: Option<Instant>,
    /// The newest initiation timestamp accepted from the peer, kept across `Tunn` replacements
    /// (see [`super::initiation`]).
    pub latest_initiation: Tai64n,
    /// When this side last started a handshake because the peer sent a stale initiation.
    pub initiated_after_stale: Option<Instant>,
    /// A handshake configuration started, until `current` has a session: when its first
    /// initiation left and how many were sent again ([`CONFIG_RETRY_AFTER`]).
    pub config_retry: Option<(Instant, usize)>,
}

impl PeerNoise {
    /// The `Tunn` to encrypt with: the current one once it has a session, else the retiring
    /// one while it still has one, else the current one (which queues and handshakes).
    pub fn tx(&mut self) -> &mut Tunn {
        // The common case, checked first: asking a Tunn for its handshake age reads the clock,
        // and this runs once per packet.
        if self.retiring.is_none() {
            return &mut self.current.tunn;
        }
        let current_up = self.current.tunn.time_since_last_handshake().is_some();
        match &mut self.retiring {
            Some((old, _)) if !current_up && old.tunn.time_since_last_handshake().is_some() => {
                &mut old.tunn
            }
            _ => &mut self.current.tunn,
        }
    }

    /// The `Tunn` owning a local index.
    pub fn by_index(&mut self, index: u32) -> Option<&mut Tunn> {
        if self.current.index == index {
            return Some(&mut self.current.tunn);
        }
        match &mut self.retiring {
            Some((old, _)) if old.index == index => Some(&mut old.tunn),
            _ => None,
        }
    }

    /// The initiation to send again now for a handshake configuration started, if one is due
    /// (see [`CONFIG_RETRY_AFTER`]); none once `current` has a session.
    pub fn config_retry<'a>(&mut self, now: Instant, buf: &'a mut [u8]) -> Option<&'a [u8]> {
        let (since, sent) = self.config_retry?;
        let due = CONFIG_RETRY_AFTER.get(sent).copied();
        if self.current.tunn.time_since_last_handshake().is_some() || due.is_none() {
            self.config_retry = None;
            return None;
        }
        if now.duration_since(since) < due? {
            return None;
        }
        self.config_retry = Some((since, sent + 1));
        match self.current.tunn.format_handshake_initiation(buf, true) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }

    /// Drops the retiring `Tunn` once its successor has been up long enough.
    pub fn retire(&mut self, now: Instant) {
        if self.current_up_since.is_none()
            && self.current.tunn.time_since_last_handshake().is_some()
        {
            self.current_up_since = Some(now);
        }
        let done = match (&self.retiring, self.current_up_since) {
            (Some((_, since)), _) if now.duration_since(*since) > RETIRE_MAX => true,
            (Some(_), Some(up)) => now.duration_since(up) > RETIRE_AFTER_SUCCESSOR,
            _ => false,
        };
        if done {
            self.retiring = None;
        }
    }
}

pub struct Peer {
    pub public_key: PublicKey,
    /// Diffie-Hellman of the device's static key with the peer's (reads initiation timestamps).
    pub static_shared: Zeroizing<[u8; 32]>,
    pub endpoint: Mutex<Option<Endpoint>>,
    pub noise: Mutex<PeerNoise>,
    /// Bytes of data messages (keepalives included) sent to and received from the peer, as
    /// they cross the wire (header and tag included), across `Tunn` replacements: what the
    /// kernel and wireguard-go report as `transfer`, but for handshake messages, which they
    /// count too.
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Unix seconds of the last completed handshake (0 = never).
    pub last_handshake_unix: AtomicU64,
    pub config: Mutex<PeerConfig>,
}

/// Where a peer's datagrams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The local address the peer's last authenticated datagram was sent to, the source of
    /// everything sent to it (as the kernel and wireguard-go do): on a node with several
    /// addresses the peer sees its answers come from where it sent, so it does not roam to
    /// the node's primary address. `None` (configured, not yet heard from): the route decides.
    pub local: Option<IpAddr>,
}

impl Endpoint {
    /// A configured endpoint: no local address yet.
    pub fn configured(addr: SocketAddr) -> Self {
        Self { addr, local: None }
    }
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.route().map(|e| e.addr)
    }

    /// The endpoint with the local address answers leave from.
    pub fn route(&self) -> Option<Endpoint> {
        *self.endpoint.lock().expect("endpoint lock")
    }

    /// An endpoint set through the UAPI: the local address is forgotten (as `wg set` does in
    /// the kernel).
    pub fn set_endpoint(&self, addr: SocketAddr) {
        self.roam(addr, None);
    }

    /// WireGuard roaming: an authenticated datagram from `addr`, sent to this device's `local`
    /// address, moves the endpoint there and makes `local` the source of what is sent back.
    pub fn roam(&self, addr: SocketAddr, local: Option<IpAddr>) {
        *self.endpoint.lock().expect("endpoint lock") = Some(Endpoint { addr, local });
    }

    pub fn note_handshake(&self, tunn: &Tunn) {
        if let Some(age) = tunn.time_since_last_handshake() {
            let t = SystemTime::now() - age;
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.last_handshake_unix.fetch_max(secs, Ordering::Relaxed);
        }
    }
}

/// What the packet threads read: built whole, swapped whole.
#[derive(Default)]
pub struct Routing {
    pub by_ip: AllowedIps<Arc<Peer>>,
    /// Local index (`receiver_idx >> 8`) → peer.
    pub by_index: HashMap<u32, Arc<Peer>>,
    pub by_key: HashMap<PublicKey, Arc<Peer>>,
    pub static_private: Option<x25519::StaticSecret>,
    pub static_public: Option<x25519::PublicKey>,
    pub rate_limiter: Option<Arc<RateLimiter>>,
}

impl Routing {
    /// The peer whose allowed IPs contain `src` must be the peer that decrypted the packet
    /// (cryptokey routing); anything else is a spoofed inner source.
    pub fn source_allowed(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        self.by_ip.lookup(src).is_some_and(|p| Arc::ptr_eq(p, peer))
    }
}

/// The configuration half of the device: applies UAPI `set`s and publishes [`Routing`].
pub struct Device {
    pub name: String,
    config: Mutex<DeviceConfig>,
    routing: RwLock<Arc<Routing>>,
    next_index: AtomicU32,
    pub drops: Drops,
    /// Handshake load and per-source budgets (see [`super::limiter`]).
    pub handshakes: super::limiter::PerSource,
    /// Bumped when the listen port changes, so the UDP side rebinds.
    pub listen_port: AtomicU32,
}

impl Device {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            config: Mutex::new(DeviceConfig::default()),
            routing: RwLock::new(Arc::new(Routing::default())),
            next_index: AtomicU32::new(rand_index()),
            drops: Drops::default(),
            handshakes: super::limiter::PerSource::new(HANDSHAKE_RATE_LIMIT),
            listen_port: AtomicU32::new(0),
        }
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().expect("routing lock").clone()
    }

    fn alloc_index(&self) -> u32 {
        // 24 bits: boringtun shifts the index left by 8 for its session ids.
        self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff
    }

    /// Applies a validated `set` and swaps in the new routing. Returns handshake initiations
    /// to send (from peers whose preshared key changed, and new peers), as (endpoint, datagram).
    ///
    /// A peer keeps its `Arc` across changes that keep the static keys, so a packet thread
    /// holding the previous snapshot still reaches live noise state.
    pub fn apply(&self, req: &SetRequest) -> Vec<(Endpoint, Vec<u8>)> {
        let mut cfg = self.config.lock().expect("config lock");
        let next = cfg.apply(req);
        let old = self.routing();
        let key_changed = next.private_key != cfg.private_key;
        let (static_private, static_public) = match &next.private_key {
            Some(k) => {
                let s = x25519::StaticSecret::from(*k.as_bytes());
                let p = x25519::PublicKey::from(&s);
                (Some(s), Some(p))
            }
            None => (None, None),
        };
        let rate_limiter = match (&static_public, &old.rate_limiter) {
            (Some(_), Some(rl)) if !key_changed => Some(rl.clone()),
            (Some(p), _) => Some(Arc::new(RateLimiter::new(p, HANDSHAKE_RATE_LIMIT))),
            (None, _) => None,
        };
        let mut routing = Routing {
            static_private: static_private.clone(),
            static_public,
            rate_limiter: rate_limiter.clone(),
            ..Default::default()
        };
        let mut initiations = Vec::new();
        // Only an endpoint this request names moves a live peer: every other peer keeps the
        // endpoint it roamed to, as in wireguard-go and the kernel (a `wg set` of the listen
        // port, or of another peer, must not send a roamed peer's traffic back to where it was
        // first configured). The last change of a peer that names one wins.
        let requested_endpoints: HashMap<PublicKey, SocketAddr> = req
            .peers
            .iter()
            .filter_map(|c| Some((c.public_key, c.endpoint?)))
            .collect();
        for pc in &next.peers {
            // No private key: no noise state at all, so nothing can be sent (fails closed).
            let Some(sk) = &static_private else { continue };
            // A low-order public key: every Diffie-Hellman with it is all zeros, so a handshake
            // with it authenticates nobody. The peer stays in the configuration (`get` lists it,
            // as the kernel and wireguard-go do) but gets no noise state and no routing: nothing
            // is ever sent to it, its allowed IPs drop as `no-peer`, and an initiation claiming
            // its key finds no peer.
            if pc.public_key.is_low_order() {
                continue;
            }
            let new_noise = || {
                let index = self.alloc_index();
                let tunn = Tunn::new(
                    sk.clone(),
                    x25519::PublicKey::from(*pc.public_key.as_bytes()),
                    pc.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    pc.persistent_keepalive,
                    index,
                    rate_limiter.clone(),
                );
                Noise { tunn, index }
            };
            let requested = requested_endpoints.get(&pc.public_key).copied();
            let peer = match old.by_key.get(&pc.public_key) {
                Some(p) if !key_changed => {
                    let mut conf = p.config.lock().expect("peer config lock");
                    if !same_noise_params(&conf, pc) {
                        // Make before break: the old Tunn keeps its sessions while the new one
                        // (new PSK) handshakes.
                        let mut noise = p.noise.lock().expect("noise lock");
                        let mut fresh = new_noise();
                        let ep = requested.map(Endpoint::configured).or(p.route());
                        noise.config_retry = first_initiation(&mut fresh, ep, &mut initiations);
                        let previous = std::mem::replace(&mut noise.current, fresh);
                        noise.retiring = Some((previous, Instant::now()));
                        noise.current_up_since = None;
                    }
                    if let Some(e) = requested {
                        p.set_endpoint(e);
                    }
                    *conf = pc.clone();
                    p.clone()
                }
                _ => {
                    let mut noise = new_noise();
                    // A new peer with a known endpoint gets an initiation at once: after a
                    // veil-wg restart the peers still hold sessions this process forgot, and
                    // would otherwise keep sending into them until their own rekey timeout
                    // (about 15 s of one-way loss); it also saves the first packet a round trip.
                    let config_retry = first_initiation(
                        &mut noise,
                        pc.endpoint.map(Endpoint::configured),
                        &mut initiations,
                    );
                    let peer_public = x25519::PublicKey::from(*pc.public_key.as_bytes());
                    Arc::new(Peer {
                        public_key: pc.public_key,
                        static_shared: Zeroizing::new(sk.diffie_hellman(&peer_public).to_bytes()),
                        endpoint: Mutex::new(pc.endpoint.map(Endpoint::configured)),
                        noise: Mutex::new(PeerNoise {
                            current: noise,
                            retiring: None,
                            current_up_since: None,
                            latest_initiation: Tai64n::default(),
                            initiated_after_stale: None,
                            config_retry,
                        }),
                        tx_bytes: AtomicU64::new(0),
                        rx_bytes: AtomicU64::new(0),
                        last_handshake_unix: AtomicU64::new(0),
                        config: Mutex::new(pc.clone()),
                    })
                }
            };
            {
                let n = peer.noise.lock().expect("noise lock");
                routing.by_index.insert(n.current.index, peer.clone());
                if let Some((old, _)) = &n.retiring {
                    routing.by_index.insert(old.index, peer.clone());
                }
            }
            for a in &pc.allowed_ips {
                routing.by_ip.insert(*a, peer.clone());
            }
            routing.by_key.insert(pc.public_key, peer);
        }
        self.listen_port
            .store(u32::from(next.listen_port), Ordering::Relaxed);
        *self.routing.write().expect("routing lock") = Arc::new(routing);
        *cfg = next;
        initiations
    }

    /// Configuration plus live statistics, in configuration order.
    pub fn state(&self, bound_port: u16) -> (DeviceConfig, DeviceState) {
        let cfg = self.config.lock().expect("config lock").clone();
        let routing = self.routing();
        let peers = cfg
            .peers
            .iter()
            .map(|pc| {
                let live = routing.by_key.get(&pc.public_key);
                let hs = live
                    .map(|p| p.last_handshake_unix.load(Ordering::Relaxed))
                    .unwrap_or(0);
                PeerState {
                    public_key: Some(pc.public_key),
                    has_preshared_key: pc.preshared_key.is_some(),
                    endpoint: live.and_then(|p| p.endpoint()).or(pc.endpoint),
                    allowed_ips: pc.allowed_ips.clone(),
                    last_handshake: (hs > 0)
                        .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(hs)),
                    rx_bytes: live
                        .map(|p| p.rx_bytes.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    tx_bytes: live
                        .map(|p| p.tx_bytes.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    persistent_keepalive: pc.persistent_keepalive,
                }
            })
            .collect();
        let state = DeviceState {
            public_key: cfg.private_key.as_ref().map(|k| k.public_key()),
            listen_port: if bound_port != 0 {
                bound_port
            } else {
                cfg.listen_port
            },
            fwmark: cfg.fwmark,
            peers,
        };
        (cfg, state)
    }
}

/// The initiation a `Tunn` that configuration made sends at once to `ep` (none without one),
/// added to `out`; returns its retry state ([`PeerNoise::config_retry`]).
fn first_initiation(
    noise: &mut Noise,
    ep: Option<Endpoint>,
    out: &mut Vec<(Endpoint, Vec<u8>)>,
) -> Option<(Instant, usize)> {
    let ep = ep?;
    let mut buf = [0u8; 256];
    match noise.tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => {
            out.push((ep, d.to_vec()));
            Some((Instant::now(), 0))
        }
        _ => None,
    }
}

/// Whether two configs of one peer can share noise state (same PSK and keepalive).
fn same_noise_params(a: &PeerConfig, b: &PeerConfig) -> bool {
    a.preshared_key == b.preshared_key && a.persistent_keepalive == b.persistent_keepalive
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom_fill(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

fn getrandom_fill(b: &mut [u8]) -> Result<(), ()> {
    use rand_core::RngCore as _;
    rand_core::OsRng.try_fill_bytes(b).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{key::PresharedKey, uapi::PeerChange, PrivateKey};

    fn peer_change(key: PublicKey, ip: &str, psk: Option<u8>) -> PeerChange {
        let mut c = PeerChange::new(key);
        c.allowed_ips = vec![ip.parse().unwrap()];
        c.endpoint = Some("198.18.0.2:51820".parse().unwrap());
        c.preshared_key = psk.map(|b| PresharedKey::from_bytes([b; 32]));
        c
    }

    #[test]
    fn a_low_order_peer_is_listed_but_gets_no_noise_state_and_no_initiation() {
        let dev = Device::new("t0");
        let low = PublicKey([0; 32]);
        assert!(low.is_low_order());
        let good = PrivateKey::generate().public_key();
        let inits = dev.apply(&SetRequest {
            private_key: Some(PrivateKey::generate()),
            peers: vec![
                peer_change(low, "198.19.9.0/24", None),
                peer_change(good, "198.19.2.0/24", None),
            ],
            ..Default::default()
        });
        // Only the good peer (it has an endpoint) is initiated.
        assert_eq!(inits.len(), 1);
        let r = dev.routing();
        assert!(!r.by_key.contains_key(&low));
        assert!(r.by_ip.lookup("198.19.9.1".parse().unwrap()).is_none());
        assert!(r.by_key.contains_key(&good));
        let (cfg, _) = dev.state(51820);
        assert!(cfg.peers.iter().any(|p| p.public_key == low));
    }

    #[test]
    fn routing_follows_config_and_psk_change_keeps_old_noise() {
        let dev = Device::new("t0");
        let me = PrivateKey::generate();
        let other = PrivateKey::generate().public_key();
        dev.apply(&SetRequest {
            private_key: Some(me.clone()),
            listen_port: Some(51820),
            peers: vec![peer_change(other, "198.19.2.0/24", Some(1))],
            ..Default::default()
        });
        let r = dev.routing();
        let p = r
            .by_ip
            .lookup("198.19.2.7".parse().unwrap())
            .unwrap()
            .clone();
        assert_eq!(p.public_key, other);
        let first_index = p.noise.lock().unwrap().current.index;
        assert!(r.by_index.contains_key(&first_index));
        assert!(r.source_allowed(&p, "198.19.2.9".parse().unwrap()));
        assert!(!r.source_allowed(&p, "198.19.3.9".parse().unwrap()));

        // Endpoint-only change: same noise state (same index).
        let mut ep = PeerChange::new(other);
        ep.endpoint = Some("198.18.0.9:51820".parse().unwrap());
        assert!(dev
            .apply(&SetRequest {
                peers: vec![ep],
                ..Default::default()
            })
            .is_empty());
        let p2 = dev.routing().by_key[&other].clone();
        assert_eq!(p2.noise.lock().unwrap().current.index, first_index);
        assert_eq!(p2.endpoint(), Some("198.18.0.9:51820".parse().unwrap()));

        // Roamed (an authenticated packet from elsewhere, sent to this device's secondary
        // address), then a set that does not name the peer's endpoint: the roamed endpoint and
        // the local address answers leave from stay. One that names it moves it and forgets
        // the local address.
        let roamed = Endpoint {
            addr: "198.18.0.12:40000".parse().unwrap(),
            local: Some("198.18.0.77".parse().unwrap()),
        };
        p2.roam(roamed.addr, roamed.local);
        dev.apply(&SetRequest {
            listen_port: Some(51830),
            ..Default::default()
        });
        dev.apply(&SetRequest {
            peers: vec![PeerChange::new(other)],
            ..Default::default()
        });
        assert_eq!(dev.routing().by_key[&other].route(), Some(roamed));
        let mut back = PeerChange::new(other);
        back.endpoint = Some("198.18.0.9:51820".parse().unwrap());
        dev.apply(&SetRequest {
            peers: vec![back],
            ..Default::default()
        });
        assert_eq!(
            dev.routing().by_key[&other].route(),
            Some(Endpoint::configured("198.18.0.9:51820".parse().unwrap()))
        );

        // PSK change: a new Tunn (new index) that handshakes at once; the old one is retiring and
        // still routable by its index.
        let mut psk = PeerChange::new(other);
        psk.preshared_key = Some(PresharedKey::from_bytes([2; 32]));
        let inits = dev.apply(&SetRequest {
            peers: vec![psk],
            ..Default::default()
        });
        assert_eq!(inits.len(), 1);
        assert_eq!(inits[0].1.len(), 148, "a handshake initiation is 148 bytes");
        let r = dev.routing();
        let p3 = r.by_key[&other].clone();
        let n = p3.noise.lock().unwrap();
        assert_ne!(n.current.index, first_index);
        assert_eq!(n.retiring.as_ref().unwrap().0.index, first_index);
        assert!(r.by_index.contains_key(&first_index) && r.by_index.contains_key(&n.current.index));
    }

    #[test]
    fn without_private_key_there_are_no_peers() {
        let dev = Device::new("t1");
        let other = PrivateKey::generate().public_key();
        dev.apply(&SetRequest {
            peers: vec![peer_change(other, "198.19.2.0/24", None)],
            ..Default::default()
        });
        assert!(dev
            .routing()
            .by_ip
            .lookup("198.19.2.1".parse().unwrap())
            .is_none());
        let (_, st) = dev.state(0);
        assert_eq!(st.peers.len(), 1, "config still lists the peer");
    }

    /// Two devices' Tunns complete a handshake and move data, then survive a PSK change on
    /// both ends without losing a packet that was encrypted with the old session.
    #[test]
    fn psk_rotation_is_make_before_break() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let (a, b) = (Device::new("a"), Device::new("b"));
        let set = |d: &Device, me: &PrivateKey, other: PublicKey, ip: &str, psk: u8| {
            d.apply(&SetRequest {
                private_key: Some(me.clone()),
                peers: vec![peer_change(other, ip, Some(psk))],
                ..Default::default()
            })
        };
        // A new peer with an endpoint gets an initiation at once (a initiates; b's own
        // initiation is not delivered in this test).
        let inits = set(&a, &ka, kb.public_key(), "10.0.2.0/24", 1);
        set(&b, &kb, ka.public_key(), "10.0.1.0/24", 1);
        assert_eq!(
            inits.len(),
            1,
            "a new peer with an endpoint is initiated at once"
        );
        let init = inits[0].1.clone();
        let pa = a.routing().by_key[&kb.public_key()].clone();
        let pb = b.routing().by_key[&ka.public_key()].clone();
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];
        // A packet sent before the session is up is queued behind the handshake.
        assert!(matches!(
            pa.noise
                .lock()
                .unwrap()
                .tx()
                .encapsulate(&ipv4_packet(), &mut buf),
            TunnResult::Done
        ));
        let resp = answer(&pb, &init, &mut buf2);
        // a consumes the response and flushes its queued packet.
        let mut na = pa.noise.lock().unwrap();
        let _ = na.current.tunn.decapsulate(None, &resp, &mut buf);
        let queued = match na.current.tunn.decapsulate(None, &[], &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        drop(na);
        assert!(matches!(
            pb.noise
                .lock()
                .unwrap()
                .current
                .tunn
                .decapsulate(None, &queued, &mut buf2),
            TunnResult::WriteToTunnelV4(..)
        ));
        // Encrypt one packet with the old session, then rotate the PSK on both devices.
        let in_flight = match pa
            .noise
            .lock()
            .unwrap()
            .tx()
            .encapsulate(&ipv4_packet(), &mut buf)
        {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        set(&a, &ka, kb.public_key(), "10.0.2.0/24", 2);
        set(&b, &kb, ka.public_key(), "10.0.1.0/24", 2);
        let pb = b.routing().by_key[&ka.public_key()].clone();
        // The in-flight packet is addressed to b's old index and still decrypts.
        let idx = u32::from_le_bytes(in_flight[4..8].try_into().unwrap()) >> 8;
        let mut nb = pb.noise.lock().unwrap();
        let tunn = nb.by_index(idx).expect("old index still routable");
        assert!(matches!(
            tunn.decapsulate(None, &in_flight, &mut buf2),
            TunnResult::WriteToTunnelV4(..)
        ));
        // And the old session still encrypts while the new one is not up.
        assert!(nb.current.tunn.time_since_last_handshake().is_none());
        assert!(
            matches!(nb.tx().encapsulate(&ipv4_packet(), &mut buf2), TunnResult::WriteToNetwork(d) if d[0] == 4)
        );
    }

    /// Both sides are configured at about the same moment and their first initiations cross:
    /// each reaches a side that does not know the sender's key yet and is dropped. The
    /// initiation is sent again at each `CONFIG_RETRY_AFTER` step while there is no session
    /// (not after boringtun's 5 s), and the retry completes the handshake.
    #[test]
    fn a_lost_configuration_initiation_is_sent_again_until_a_session_is_up() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let (a, b) = (Device::new("a"), Device::new("b"));
        let set = |d: &Device, me: &PrivateKey, other: PublicKey, ip: &str| {
            d.apply(&SetRequest {
                private_key: Some(me.clone()),
                peers: vec![peer_change(other, ip, Some(1))],
                ..Default::default()
            })
        };
        // a's first initiation is lost (b has no peer yet); b's is never delivered either.
        assert_eq!(set(&a, &ka, kb.public_key(), "10.0.2.0/24").len(), 1);
        assert_eq!(set(&b, &kb, ka.public_key(), "10.0.1.0/24").len(), 1);
        // Just after the first initiations: their steps are due at t0 + step at the latest.
        let t0 = Instant::now();
        let pa = a.routing().by_key[&kb.public_key()].clone();
        let pb = b.routing().by_key[&ka.public_key()].clone();
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];
        let retry_at = |n: &mut PeerNoise, at: Duration, buf: &mut [u8]| {
            n.config_retry(t0 + at, buf).map(<[u8]>::to_vec)
        };
        let mut na = pa.noise.lock().unwrap();
        // Not before the first step, then once per step.
        assert_eq!(
            retry_at(&mut na, Duration::from_millis(100), &mut buf),
            None
        );
        let again = retry_at(&mut na, CONFIG_RETRY_AFTER[0], &mut buf).expect("sent again");
        assert_eq!((again.len(), again[0]), (148, 1), "a handshake initiation");
        assert_eq!(retry_at(&mut na, CONFIG_RETRY_AFTER[0], &mut buf), None);
        // The retry reaches b, configured by now: b answers, a's session comes up.
        let resp = answer(&pb, &again, &mut buf2);
        assert!(matches!(
            na.current.tunn.decapsulate(None, &resp, &mut buf),
            TunnResult::WriteToNetwork(d) if d[0] == 4
        ));
        // A session: nothing more is sent, and the retry is over.
        assert_eq!(retry_at(&mut na, CONFIG_RETRY_AFTER[1], &mut buf), None);
        assert!(na.config_retry.is_none());
        drop(na);
        // Without an answer, b sends again at each step and then leaves it to boringtun.
        let mut nb = pb.noise.lock().unwrap();
        nb.config_retry = Some((t0, 0));
        let sent = CONFIG_RETRY_AFTER
            .iter()
            .filter(|at| retry_at(&mut nb, **at, &mut buf2).is_some())
            .count();
        assert_eq!(sent, CONFIG_RETRY_AFTER.len());
        assert_eq!(retry_at(&mut nb, Duration::from_secs(60), &mut buf2), None);
        assert!(nb.config_retry.is_none());
    }

    /// The handshake response of `responder`'s current `Tunn` to `init`.
    fn answer(responder: &Peer, init: &[u8], buf: &mut [u8]) -> Vec<u8> {
        let mut n = responder.noise.lock().unwrap();
        match n.current.tunn.decapsulate(None, init, buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no handshake response: {other:?}"),
        }
    }

    fn ipv4_packet() -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 1, 1]);
        p[16..20].copy_from_slice(&[10, 0, 2, 1]);
        p
    }
}
