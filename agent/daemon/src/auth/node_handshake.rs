//! Node handshake (sans-IO): after TLS, the two agents exchange node name, WireGuard public key
//! and a proposed epoch, then derive the node pair's WireGuard preshared key from the TLS
//! exporter and confirm it.
//!
//! ```text
//! both → Hello { node_name, wg_public_key, epoch }          (sent right after TLS)
//! both ← Hello  ⇒ epoch = max(ours, theirs)
//!                 ctx   = min(keyA, keyB) ‖ max(keyA, keyB) ‖ epoch (u64 BE)   (72 bytes)
//!                 psk   = TLS-Exporter("EXPORTER-veil-wg-psk", ctx, 32)
//! both → Confirm { epoch, TLS-Exporter("EXPORTER-veil-node-confirm", ctx, 32) }
//! both ← Confirm ⇒ checked ⇒ Established(NodeKeys)  → install peer key + PSK
//! ```
//!
//! The context orders the keys canonically, so initiator and responder derive the same PSK
//! whatever their TLS roles; the epoch makes every re-key produce a new PSK even if a session
//! were reused; the exporter binds the PSK to the mutually authenticated, hybrid-PQ session.
//! [`RekeySchedule`] says when to run it again (interval, node SVID rotation, peer request,
//! peer SVID expiry, retry after failure).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use veil_transport::{PresharedKey, PublicKey};
use zeroize::Zeroizing;

use super::tls::Exporter;
use super::wire::{Confirm, Hello, Message};

/// Exporter label of the WireGuard PSK.
pub const PSK_LABEL: &[u8] = b"EXPORTER-veil-wg-psk";
/// Exporter label of the key confirmation (a different label, so the confirmation value on
/// the wire says nothing about the PSK).
pub const CONFIRM_LABEL: &[u8] = b"EXPORTER-veil-node-confirm";
/// Default interval between node handshakes on a channel (PSK rotation).
pub const DEFAULT_REKEY_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Why a node handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("expected {expected} in the node handshake, got {got}")]
    UnexpectedMessage {
        expected: &'static str,
        got: &'static str,
    },
    #[error("peer claims to be node {claimed} but authenticated as node {authenticated}")]
    WrongNode {
        claimed: String,
        authenticated: String,
    },
    #[error("peer wireguard public key is all zeros")]
    ZeroKey,
    #[error("peer wireguard public key is a point of small order")]
    LowOrderKey,
    #[error("peer wireguard public key equals ours")]
    SameKey,
    #[error("epoch {0} is not allowed (must be 1..u64::MAX)")]
    InvalidEpoch(u64),
    #[error("peer confirmed epoch {theirs}, we derived epoch {ours}")]
    EpochMismatch { ours: u64, theirs: u64 },
    #[error("peer key confirmation does not match ours")]
    ConfirmMismatch,
    #[error("tls exporter")]
    Exporter(#[source] rustls::Error),
}

/// What a completed node handshake yields: install `peer_wg_key` with `psk` in the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeKeys {
    pub peer_node: String,
    pub peer_wg_key: PublicKey,
    pub psk: PresharedKey,
    pub epoch: u64,
    /// The key this node announced in the handshake (its static key may rotate meanwhile).
    pub local_wg_key: PublicKey,
}

/// The exporter context: both public keys in canonical (byte-wise ascending) order, then the
/// epoch, big-endian.
pub fn psk_context(a: &PublicKey, b: &PublicKey, epoch: u64) -> [u8; 72] {
    let (lo, hi) = if a.as_bytes() <= b.as_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    let mut ctx = [0u8; 72];
    ctx[..32].copy_from_slice(lo.as_bytes());
    ctx[32..64].copy_from_slice(hi.as_bytes());
    ctx[64..].copy_from_slice(&epoch.to_be_bytes());
    ctx
}

/// The WireGuard PSK of a node pair for `epoch` on this TLS session.
pub fn derive_psk(
    exporter: &dyn Exporter,
    a: &PublicKey,
    b: &PublicKey,
    epoch: u64,
) -> Result<PresharedKey, Error> {
    let mut out = Zeroizing::new([0u8; 32]);
    exporter
        .export(PSK_LABEL, &psk_context(a, b, epoch), &mut out[..])
        .map_err(Error::Exporter)?;
    Ok(PresharedKey::from_bytes(*out))
}

fn confirm_value(
    exporter: &dyn Exporter,
    a: &PublicKey,
    b: &PublicKey,
    epoch: u64,
) -> Result<[u8; 32], Error> {
    let mut out = [0u8; 32];
    exporter
        .export(CONFIRM_LABEL, &psk_context(a, b, epoch), &mut out)
        .map_err(Error::Exporter)?;
    Ok(out)
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Confirm(_) => "confirm",
        Message::RekeyRequest => "rekey-request",
        Message::AuthRequest(_) => "auth-request",
        Message::AuthResponse(_) => "auth-response",
        Message::Revoke { .. } => "revoke",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
    }
}

enum State {
    AwaitHello,
    AwaitConfirm { keys: NodeKeys, check: [u8; 32] },
    Done,
}

/// One node handshake, either side (the protocol is symmetric).
pub struct NodeHandshake {
    local_key: PublicKey,
    proposed_epoch: u64,
    /// The node name the TLS layer authenticated for the peer.
    authenticated_peer: String,
    state: State,
}

/// What the caller does next.
#[derive(Debug)]
pub enum Progress {
    Send(Message),
    Established(NodeKeys),
}

impl NodeHandshake {
    /// Starts a handshake; the returned `Hello` is sent right away.
    pub fn start(
        local_node: &str,
        local_key: PublicKey,
        proposed_epoch: u64,
        authenticated_peer: &str,
    ) -> Result<(Self, Message), Error> {
        if proposed_epoch == 0 || proposed_epoch == u64::MAX {
            return Err(Error::InvalidEpoch(proposed_epoch));
        }
        let hello = Message::Hello(Hello {
            node_name: local_node.to_owned(),
            wg_public_key: *local_key.as_bytes(),
            epoch: proposed_epoch,
        });
        Ok((
            Self {
                local_key,
                proposed_epoch,
                authenticated_peer: authenticated_peer.to_owned(),
                state: State::AwaitHello,
            },
            hello,
        ))
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds one message from the peer.
    pub fn handle(&mut self, msg: Message, exporter: &dyn Exporter) -> Result<Progress, Error> {
        match (&self.state, msg) {
            (State::AwaitHello, Message::Hello(h)) => {
                if h.node_name != self.authenticated_peer {
                    return Err(Error::WrongNode {
                        claimed: h.node_name,
                        authenticated: self.authenticated_peer.clone(),
                    });
                }
                let peer_key = PublicKey(h.wg_public_key);
                if peer_key.as_bytes() == &[0u8; 32] {
                    return Err(Error::ZeroKey);
                }
                // A small-order key makes every Diffie-Hellman with it all zeros: the WireGuard
                // handshake would rest on the PSK alone.
                if peer_key.is_low_order() {
                    return Err(Error::LowOrderKey);
                }
                if peer_key == self.local_key {
                    return Err(Error::SameKey);
                }
                if h.epoch == 0 || h.epoch == u64::MAX {
                    return Err(Error::InvalidEpoch(h.epoch));
                }
                let epoch = self.proposed_epoch.max(h.epoch);
                let psk = derive_psk(exporter, &self.local_key, &peer_key, epoch)?;
                let check = confirm_value(exporter, &self.local_key, &peer_key, epoch)?;
                self.state = State::AwaitConfirm {
                    keys: NodeKeys {
                        peer_node: h.node_name,
                        peer_wg_key: peer_key,
                        psk,
                        epoch,
                        local_wg_key: self.local_key,
                    },
                    check,
                };
                Ok(Progress::Send(Message::Confirm(Confirm { epoch, check })))
            }
            (State::AwaitConfirm { keys, check }, Message::Confirm(c)) => {
                if c.epoch != keys.epoch {
                    return Err(Error::EpochMismatch {
                        ours: keys.epoch,
                        theirs: c.epoch,
                    });
                }
                if aws_lc_rs::constant_time::verify_slices_are_equal(&c.check, check).is_err() {
                    return Err(Error::ConfirmMismatch);
                }
                let keys = keys.clone();
                self.state = State::Done;
                Ok(Progress::Established(keys))
            }
            (State::AwaitHello, other) => Err(Error::UnexpectedMessage {
                expected: "hello",
                got: kind(&other),
            }),
            (State::AwaitConfirm { .. }, other) => Err(Error::UnexpectedMessage {
                expected: "confirm",
                got: kind(&other),
            }),
            (State::Done, other) => Err(Error::UnexpectedMessage {
                expected: "nothing",
                got: kind(&other),
            }),
        }
    }
}

/// The last epoch agreed with each peer; proposals are one more, so a PSK never repeats even
/// when a session's exporter secret were reused, and the larger proposal wins after a restart.
#[derive(Debug, Default)]
pub struct EpochBook(Mutex<HashMap<String, u64>>);

impl EpochBook {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn propose(&self, peer: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(peer)
            .copied()
            .unwrap_or(0)
            .saturating_add(1)
            .min(u64::MAX - 1)
    }

    pub fn record(&self, peer: &str, epoch: u64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(peer.to_owned()).or_insert(0);
        *e = (*e).max(epoch);
    }
}

/// When to re-run the node handshake with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyConfig {
    pub interval: Duration,
    /// Re-key this long before the peer's node SVID (the session's authentication) expires.
    pub expiry_margin: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for RekeyConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_REKEY_INTERVAL,
            expiry_margin: Duration::from_secs(30),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// Why a re-key is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekeyReason {
    /// The PSK rotation interval elapsed.
    Interval,
    /// Our node SVID rotated: the session must present the new one.
    SvidRotated,
    /// The peer asked (its node SVID rotated).
    PeerRequested,
    /// The peer's node SVID that authenticated the session is about to expire.
    PeerSvidExpiring,
    /// The last attempt failed; trying again after backoff.
    Retry,
}

impl RekeyReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Interval => "interval",
            Self::SvidRotated => "svid-rotated",
            Self::PeerRequested => "peer-requested",
            Self::PeerSvidExpiring => "peer-svid-expiring",
            Self::Retry => "retry",
        }
    }
}

/// Sans-IO re-key scheduler for one peer: inputs are events with `now`; [`Self::deadline`] is
/// when to call [`Self::poll`] next.
#[derive(Debug)]
pub struct RekeySchedule {
    cfg: RekeyConfig,
    due: Option<(Instant, RekeyReason)>,
    failures: u32,
    /// The peer SVID expiry the last handshake saw, to tell a renewed SVID from the same one.
    last_peer_until: Option<Instant>,
}

impl RekeySchedule {
    pub fn new(cfg: RekeyConfig) -> Self {
        Self {
            cfg,
            due: None,
            failures: 0,
            last_peer_until: None,
        }
    }

    fn set_earlier(&mut self, at: Instant, reason: RekeyReason) {
        match self.due {
            Some((cur, _)) if cur <= at => {}
            _ => self.due = Some((at, reason)),
        }
    }

    /// A node handshake completed; `peer_valid_until` is when the peer's node SVID chain stops
    /// validating.
    pub fn on_established(&mut self, now: Instant, peer_valid_until: Option<Instant>) {
        self.failures = 0;
        self.due = Some((now + self.cfg.interval, RekeyReason::Interval));
        if let Some(until) = peer_valid_until {
            // A re-key a margin before the peer's SVID expires only helps if the peer has a
            // newer SVID by then. If this handshake saw the same SVID as the last one (its
            // expiry within a second: the Instants are derived from wall-clock times), re-keying
            // again cannot renew anything — with a short TTL it would spin — so the next one is
            // at the expiry itself, where it fails closed unless the peer rotated meanwhile
            // (its rotation asks for a re-key anyway).
            let same_svid = self.last_peer_until.is_some_and(|last| {
                last.max(until).duration_since(last.min(until)) < Duration::from_secs(1)
            });
            self.last_peer_until = Some(until);
            let at = if same_svid {
                until
            } else {
                until.checked_sub(self.cfg.expiry_margin).unwrap_or(now)
            }
            .max(now);
            self.set_earlier(at, RekeyReason::PeerSvidExpiring);
        }
    }

    pub fn on_svid_rotated(&mut self, now: Instant) {
        self.set_earlier(now, RekeyReason::SvidRotated);
    }

    pub fn on_peer_requested(&mut self, now: Instant) {
        self.set_earlier(now, RekeyReason::PeerRequested);
    }

    /// The attempt failed: retry after an exponential backoff (capped; `jitter` in [0, 1)
    /// spreads retries of many peers, pass 0 for determinism).
    pub fn on_failed(&mut self, now: Instant, jitter: f64) {
        let exp = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let base = self
            .cfg
            .retry_min
            .saturating_mul(1u32 << exp)
            .min(self.cfg.retry_max);
        let delay = base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.5);
        self.due = Some((now + delay, RekeyReason::Retry));
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.due.map(|(at, _)| at)
    }

    /// A re-key that is due at `now`; the schedule then waits for the outcome
    /// (`on_established` or `on_failed`).
    pub fn poll(&mut self, now: Instant) -> Option<RekeyReason> {
        match self.due {
            Some((at, reason)) if at <= now => {
                self.due = None;
                Some(reason)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::{session_pair, Pki};
    use veil_transport::PrivateKey;

    /// A fake exporter: both "ends" share one secret, like the two sides of a TLS session.
    struct FakeExporter([u8; 32]);
    impl Exporter for FakeExporter {
        fn export(&self, label: &[u8], ctx: &[u8], out: &mut [u8]) -> Result<(), rustls::Error> {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0);
            let mut m = label.to_vec();
            m.extend_from_slice(ctx);
            let tag = aws_lc_rs::hmac::sign(&key, &m);
            out.copy_from_slice(&tag.as_ref()[..out.len()]);
            Ok(())
        }
    }

    fn run_pair(
        a: (&str, PublicKey, u64),
        b: (&str, PublicKey, u64),
        ex_a: &dyn Exporter,
        ex_b: &dyn Exporter,
    ) -> (NodeKeys, NodeKeys) {
        let (mut ha, hello_a) = NodeHandshake::start(a.0, a.1, a.2, b.0).unwrap();
        let (mut hb, hello_b) = NodeHandshake::start(b.0, b.1, b.2, a.0).unwrap();
        let Progress::Send(conf_a) = ha.handle(hello_b, ex_a).unwrap() else {
            panic!("a sends confirm")
        };
        let Progress::Send(conf_b) = hb.handle(hello_a, ex_b).unwrap() else {
            panic!("b sends confirm")
        };
        let Progress::Established(ka) = ha.handle(conf_b, ex_a).unwrap() else {
            panic!("a established")
        };
        let Progress::Established(kb) = hb.handle(conf_a, ex_b).unwrap() else {
            panic!("b established")
        };
        assert!(ha.is_done() && hb.is_done());
        (ka, kb)
    }

    #[test]
    fn both_sides_agree_on_the_psk_over_a_real_tls_session() {
        let pki = Pki::new("lab.veil");
        let (client, server) = session_pair(&pki);
        let (ka, kb) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let (a, b) = run_pair(("node-a", ka, 3), ("node-b", kb, 5), &*client, &*server);
        assert_eq!(a.psk, b.psk);
        assert!(!a.psk.is_zero());
        assert_eq!((a.epoch, b.epoch), (5, 5), "the larger proposal wins");
        assert_eq!((a.peer_wg_key, b.peer_wg_key), (kb, ka));
        assert_eq!(
            (a.peer_node.as_str(), b.peer_node.as_str()),
            ("node-b", "node-a")
        );
        // The PSK is exactly the exporter with the documented label and context.
        let mut expect = [0u8; 32];
        client
            .export(PSK_LABEL, &psk_context(&ka, &kb, 5), &mut expect)
            .unwrap();
        assert_eq!(a.psk.as_bytes(), &expect);
        // Another TLS session between the same nodes gives another PSK.
        let (client2, server2) = session_pair(&pki);
        let (a2, b2) = run_pair(("node-a", ka, 5), ("node-b", kb, 5), &*client2, &*server2);
        assert_eq!(a2.psk, b2.psk);
        assert_ne!(a2.psk, a.psk);
    }

    #[test]
    fn roles_do_not_matter() {
        let ex = FakeExporter([4; 32]);
        let (ka, kb) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (a1, _) = run_pair(("node-a", ka, 1), ("node-b", kb, 1), &ex, &ex);
        let (b2, a2) = run_pair(("node-b", kb, 1), ("node-a", ka, 1), &ex, &ex);
        assert_eq!(a1.psk, a2.psk);
        assert_eq!(a1.psk, b2.psk);
    }

    #[test]
    fn context_holds_both_keys_in_order_and_the_epoch() {
        let (ka, kb) = (PublicKey([0xaa; 32]), PublicKey([0x11; 32]));
        let ctx = psk_context(&ka, &kb, 0x0102);
        assert_eq!(&ctx[..32], &[0x11; 32]);
        assert_eq!(&ctx[32..64], &[0xaa; 32]);
        assert_eq!(&ctx[64..], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(ctx, psk_context(&kb, &ka, 0x0102));
        let ex = FakeExporter([9; 32]);
        let p1 = derive_psk(&ex, &ka, &kb, 1).unwrap();
        assert_ne!(p1, derive_psk(&ex, &ka, &kb, 2).unwrap(), "epoch");
        assert_ne!(
            p1,
            derive_psk(&ex, &ka, &PublicKey([0x12; 32]), 1).unwrap(),
            "key"
        );
        assert_eq!(p1, derive_psk(&ex, &kb, &ka, 1).unwrap(), "order");
    }

    #[test]
    fn refuses_a_peer_claiming_another_node_or_bad_keys() {
        let ex = FakeExporter([1; 32]);
        let (ka, kb) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
        let (_, lie) = NodeHandshake::start("node-c", kb, 1, "node-a").unwrap();
        assert!(matches!(
            h.handle(lie, &ex),
            Err(Error::WrongNode { claimed, .. }) if claimed == "node-c"
        ));
        for (key, want) in [([0u8; 32], "zero"), ([1u8; 32], "same")] {
            let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
            let (_, bad) = NodeHandshake::start("node-b", PublicKey(key), 1, "node-a").unwrap();
            let e = h.handle(bad, &ex).unwrap_err();
            match want {
                "zero" => assert!(matches!(e, Error::ZeroKey)),
                _ => assert!(matches!(e, Error::SameKey)),
            }
        }
        assert!(matches!(
            NodeHandshake::start("node-a", ka, 0, "node-b"),
            Err(Error::InvalidEpoch(0))
        ));
    }

    #[test]
    fn refuses_a_peer_key_of_small_order() {
        let ex = FakeExporter([1; 32]);
        let ka = PrivateKey::generate().public_key();
        let hex = |s: &str| {
            let mut b = [0u8; 32];
            for (i, x) in b.iter_mut().enumerate() {
                *x = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
            }
            b
        };
        for point in [
            "0100000000000000000000000000000000000000000000000000000000000000",
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ] {
            let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
            let (_, bad) =
                NodeHandshake::start("node-b", PublicKey(hex(point)), 1, "node-a").unwrap();
            assert!(
                matches!(h.handle(bad, &ex), Err(Error::LowOrderKey)),
                "{point}"
            );
        }
        // A real key passes.
        let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
        let (_, good) =
            NodeHandshake::start("node-b", PrivateKey::generate().public_key(), 1, "node-a")
                .unwrap();
        assert!(matches!(h.handle(good, &ex), Ok(Progress::Send(_))));
    }

    #[test]
    fn out_of_order_and_forged_confirmations_fail() {
        let ex = FakeExporter([1; 32]);
        let (ka, kb) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
        let confirm = Message::Confirm(Confirm {
            epoch: 1,
            check: [0; 32],
        });
        assert!(matches!(
            h.handle(confirm.clone(), &ex),
            Err(Error::UnexpectedMessage {
                expected: "hello",
                got: "confirm"
            })
        ));
        let (_, hello_b) = NodeHandshake::start("node-b", kb, 1, "node-a").unwrap();
        h.handle(hello_b.clone(), &ex).unwrap();
        assert!(matches!(
            h.handle(confirm, &ex),
            Err(Error::ConfirmMismatch)
        ));
        let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
        h.handle(hello_b, &ex).unwrap();
        let wrong_epoch = Message::Confirm(Confirm {
            epoch: 2,
            check: [0; 32],
        });
        assert!(matches!(
            h.handle(wrong_epoch, &ex),
            Err(Error::EpochMismatch { ours: 1, theirs: 2 })
        ));
        // Different sessions (exporters) never confirm each other.
        let other = FakeExporter([2; 32]);
        let (mut ha, hello_a) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
        let (mut hb, hello_b) = NodeHandshake::start("node-b", kb, 1, "node-a").unwrap();
        ha.handle(hello_b, &ex).unwrap();
        let Progress::Send(conf_b) = hb.handle(hello_a, &other).unwrap() else {
            panic!()
        };
        assert!(matches!(
            ha.handle(conf_b, &ex),
            Err(Error::ConfirmMismatch)
        ));
    }

    #[test]
    fn hostile_epochs_are_refused_or_saturate_never_overflow() {
        let ex = FakeExporter([1; 32]);
        let (ka, kb) = (PublicKey([1; 32]), PublicKey([2; 32]));
        for (epoch, ok) in [(0, false), (u64::MAX, false), (u64::MAX - 1, true)] {
            let (mut h, _) = NodeHandshake::start("node-a", ka, 1, "node-b").unwrap();
            let hello = Message::Hello(Hello {
                node_name: "node-b".into(),
                wg_public_key: *kb.as_bytes(),
                epoch,
            });
            match h.handle(hello, &ex) {
                Ok(Progress::Send(Message::Confirm(c))) if ok => assert_eq!(c.epoch, epoch),
                Err(Error::InvalidEpoch(e)) if !ok => assert_eq!(e, epoch),
                other => panic!("epoch {epoch}: {other:?}"),
            }
        }
        // A peer that pushed the epoch to the top leaves proposals there, still valid.
        let book = EpochBook::new();
        book.record("node-b", u64::MAX - 1);
        assert_eq!(book.propose("node-b"), u64::MAX - 1);
        book.record("node-b", u64::MAX);
        assert_eq!(book.propose("node-b"), u64::MAX - 1);
        assert!(NodeHandshake::start("node-a", ka, book.propose("node-b"), "node-b").is_ok());
    }

    #[test]
    fn epoch_book_proposes_one_more_than_agreed() {
        let book = EpochBook::new();
        assert_eq!(book.propose("node-b"), 1);
        book.record("node-b", 7);
        book.record("node-b", 3);
        assert_eq!(book.propose("node-b"), 8);
        assert_eq!(book.propose("node-c"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rekey_runs_on_the_interval_rotation_request_and_expiry() {
        let mut s = RekeySchedule::new(RekeyConfig::default());
        assert_eq!(s.deadline(), None);
        let t0 = Instant::now();
        s.on_established(t0, Some(t0 + Duration::from_secs(3600)));
        assert_eq!(s.deadline(), Some(t0 + DEFAULT_REKEY_INTERVAL));
        tokio::time::advance(Duration::from_secs(599)).await;
        assert_eq!(s.poll(Instant::now()), None);
        tokio::time::sleep_until(s.deadline().unwrap()).await;
        assert_eq!(s.poll(Instant::now()), Some(RekeyReason::Interval));
        assert_eq!(s.poll(Instant::now()), None, "fires once, then waits");
        assert_eq!(s.deadline(), None);

        // Our SVID rotates mid-interval: due now.
        s.on_established(Instant::now(), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        s.on_svid_rotated(Instant::now());
        assert_eq!(s.poll(Instant::now()), Some(RekeyReason::SvidRotated));

        s.on_established(Instant::now(), None);
        s.on_peer_requested(Instant::now());
        assert_eq!(s.poll(Instant::now()), Some(RekeyReason::PeerRequested));

        // The peer's node SVID expires before the interval: re-key a margin before it.
        let now = Instant::now();
        s.on_established(now, Some(now + Duration::from_secs(100)));
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(70)));
        tokio::time::advance(Duration::from_secs(70)).await;
        assert_eq!(s.poll(Instant::now()), Some(RekeyReason::PeerSvidExpiring));
        // The peer had not rotated: the same SVID comes back. No re-key loop: the next one is
        // at its expiry, not now.
        let now = Instant::now();
        s.on_established(now, Some(now + Duration::from_secs(30)));
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(30)));
        // The schedule lives across channels (the mesh carries it to each new one): seeing the
        // same SVID yet again still does not re-key before its expiry.
        let now = Instant::now();
        s.on_established(now, Some(now + Duration::from_secs(30)));
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(30)));
        // A renewed SVID (later expiry) is re-keyed a margin before its end again.
        let now = Instant::now();
        s.on_established(now, Some(now + Duration::from_secs(3600)));
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(600)));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_rekeys_back_off_exponentially_up_to_the_cap() {
        let mut s = RekeySchedule::new(RekeyConfig::default());
        let mut delays = Vec::new();
        for _ in 0..8 {
            let now = Instant::now();
            s.on_failed(now, 0.0);
            let d = s.deadline().unwrap() - now;
            delays.push(d.as_secs());
            tokio::time::sleep_until(s.deadline().unwrap()).await;
            assert_eq!(s.poll(Instant::now()), Some(RekeyReason::Retry));
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        s.on_established(Instant::now(), None);
        let now = Instant::now();
        s.on_failed(now, 0.0);
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(1)), "reset");
    }
}
