//! A handshake initiation opened as far as its TAI64N timestamp (WireGuard §5.4.2), so the
//! newest timestamp a peer sent outlives the `Tunn` that accepted it.
//!
//! boringtun refuses an initiation whose timestamp is not newer than the last one *its* `Tunn`
//! accepted. A PSK change gives the peer a new `Tunn` (make before break) whose memory starts
//! empty, so an initiation captured before the change would be answered after it. The kernel
//! and wireguard-go keep the timestamp with the peer across PSK changes; veil-wg does the same
//! by reading it here before the `Tunn` sees the message. boringtun still does the handshake:
//! this only reads (and authenticates, through the AEAD tags) what the message carries.

use std::{ops::Range, sync::OnceLock};

use blake2::{Blake2s256, Digest};
use boringtun::x25519;
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305,
};
use hmac::{Mac, SimpleHmac};
use zeroize::Zeroizing;

/// A handshake initiation's length and the byte ranges of its fields.
pub const INITIATION_LEN: usize = 148;
const EPHEMERAL: Range<usize> = 8..40;
const STATIC: Range<usize> = 40..88;
const TIMESTAMP: Range<usize> = 88..116;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";

/// A TAI64N label: big-endian seconds, then big-endian nanoseconds, so the byte order is the
/// time order. The default (all zeros) is older than any real timestamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tai64n(pub [u8; 12]);

/// An initiation opened as far as its sender's static public key, with the handshake state
/// that reads its timestamp once the sender is known to be a peer.
pub struct Opened {
    pub peer_static: [u8; 32],
    chaining_key: Zeroizing<[u8; 32]>,
    hash: [u8; 32],
}

impl Opened {
    /// Opens the static key of initiation `msg` (a whole type-1 message) addressed to this
    /// device's key pair; `None` if it is no initiation or was not sealed for this key.
    pub fn new(
        static_private: &x25519::StaticSecret,
        static_public: &x25519::PublicKey,
        msg: &[u8],
    ) -> Option<Opened> {
        if msg.len() != INITIATION_LEN || msg[0] != 1 {
            return None;
        }
        let (ck, h) = initial();
        let ephemeral: [u8; 32] = msg[EPHEMERAL].try_into().ok()?;
        let h = hash(&hash(h, static_public.as_bytes()), &ephemeral);
        let ck = Zeroizing::new(hmac(&hmac(ck, &[&ephemeral]), &[&[1]]));
        let es = static_private.diffie_hellman(&x25519::PublicKey::from(ephemeral));
        let (ck, key) = kdf2(&ck, es.as_bytes());
        let peer_static = open(&key, &msg[STATIC], &h)?.try_into().ok()?;
        Some(Opened {
            peer_static,
            chaining_key: ck,
            hash: hash(&h, &msg[STATIC]),
        })
    }

    /// The timestamp of `msg`, given the Diffie-Hellman of this device's static key with the
    /// sender's; `None` if it does not authenticate.
    pub fn timestamp(&self, static_shared: &[u8; 32], msg: &[u8]) -> Option<Tai64n> {
        let (_, key) = kdf2(&self.chaining_key, static_shared);
        Some(Tai64n(
            open(&key, &msg[TIMESTAMP], &self.hash)?.try_into().ok()?,
        ))
    }
}

/// The protocol's initial chaining key, HASH(CONSTRUCTION), and hash, HASH(ck || IDENTIFIER).
fn initial() -> (&'static [u8; 32], &'static [u8; 32]) {
    static INITIAL: OnceLock<([u8; 32], [u8; 32])> = OnceLock::new();
    let (ck, h) = INITIAL.get_or_init(|| {
        let ck = hash(CONSTRUCTION, &[]);
        (ck, hash(&ck, IDENTIFIER))
    });
    (ck, h)
}

fn hash(a: &[u8], b: &[u8]) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(a)
        .chain_update(b)
        .finalize()
        .into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The protocol's KDF2: the next chaining key and a message key.
fn kdf2(chaining_key: &[u8; 32], input: &[u8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let t0 = Zeroizing::new(hmac(chaining_key, &[input]));
    let t1 = hmac(&*t0, &[&[1]]);
    let t2 = hmac(&*t0, &[&t1, &[2]]);
    (Zeroizing::new(t1), Zeroizing::new(t2))
}

/// ChaCha20-Poly1305 with the all-zero nonce (counter 0) the handshake uses.
fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    ChaCha20Poly1305::new(key.into())
        .decrypt(&[0u8; 12].into(), Payload { msg: sealed, aad })
        .ok()
}

#[cfg(test)]
mod tests {
    use boringtun::noise::{Tunn, TunnResult};

    use super::*;

    fn keys() -> (x25519::StaticSecret, x25519::PublicKey) {
        let s = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let p = x25519::PublicKey::from(&s);
        (s, p)
    }

    /// A real initiation from `from` to `to`, made by boringtun.
    fn initiation(from: &x25519::StaticSecret, to: &x25519::PublicKey) -> Vec<u8> {
        let mut tunn = Tunn::new(from.clone(), *to, Some([7; 32]), None, 1, None);
        let mut buf = [0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    fn unix_secs(t: Tai64n) -> u64 {
        u64::from_be_bytes(t.0[..8].try_into().unwrap()) - ((1 << 62) + 37)
    }

    #[test]
    fn reads_the_sender_and_a_timestamp_that_grows() {
        let (rs, rp) = keys();
        let (is, ip) = keys();
        let shared = rs.diffie_hellman(&ip).to_bytes();
        let first = initiation(&is, &rp);
        let opened = Opened::new(&rs, &rp, &first).expect("opens");
        assert_eq!(opened.peer_static, *ip.as_bytes());
        let t1 = opened.timestamp(&shared, &first).expect("timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            unix_secs(t1).abs_diff(now) <= 2,
            "{} vs {now}",
            unix_secs(t1)
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = initiation(&is, &rp);
        let t2 = Opened::new(&rs, &rp, &second)
            .unwrap()
            .timestamp(&shared, &second)
            .unwrap();
        assert!(t2 > t1, "{t2:?} not after {t1:?}");
    }

    #[test]
    fn refuses_what_was_not_sealed_for_this_key_or_was_altered() {
        let (rs, rp) = keys();
        let (is, ip) = keys();
        let msg = initiation(&is, &rp);
        let (other, other_pub) = keys();
        assert!(Opened::new(&other, &other_pub, &msg).is_none());
        for field in [EPHEMERAL, STATIC] {
            let mut bad = msg.clone();
            bad[field.start + 3] ^= 1;
            assert!(Opened::new(&rs, &rp, &bad).is_none(), "{field:?} altered");
        }
        let mut bad = msg.clone();
        bad[TIMESTAMP.start] ^= 1;
        let opened = Opened::new(&rs, &rp, &bad).expect("static still opens");
        assert!(opened
            .timestamp(&rs.diffie_hellman(&ip).to_bytes(), &bad)
            .is_none());
        // The wrong static-static secret does not open the timestamp either.
        assert!(Opened::new(&rs, &rp, &msg)
            .unwrap()
            .timestamp(&[0; 32], &msg)
            .is_none());
        assert!(Opened::new(&rs, &rp, &msg[..147]).is_none());
        let mut typed = msg.clone();
        typed[0] = 2;
        assert!(Opened::new(&rs, &rp, &typed).is_none());
    }
}
