//! WireGuard keys: x25519 static keys and preshared keys. Secrets zeroize on drop, never print
//! (`Debug` shows only the public half or `<redacted>`) and compare in constant time.

use std::{fmt::Write as _, marker::PhantomData};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Errors parsing a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key is not valid hex")]
    Hex,
    #[error("key has {0} bytes, expected 32")]
    Length(usize),
}

fn to_32(bytes: &[u8]) -> Result<[u8; 32], KeyError> {
    bytes.try_into().map_err(|_| KeyError::Length(bytes.len()))
}

/// Decodes a base64 key (surrounding white space ignored); the decoded buffer is wiped, as
/// it may hold a secret.
fn from_base64_32(s: &str) -> Result<[u8; 32], KeyError> {
    let mut v = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    let k = to_32(&v);
    v.zeroize();
    k
}

/// Parses 64 lowercase-or-uppercase hex digits (the UAPI key encoding).
pub fn parse_hex32(s: &str) -> Result<[u8; 32], KeyError> {
    if s.len() != 64 {
        if s.bytes().all(|b| b.is_ascii_hexdigit()) && s.len().is_multiple_of(2) {
            return Err(KeyError::Length(s.len() / 2));
        }
        return Err(KeyError::Hex);
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).map_err(|_| KeyError::Hex)?;
        out[i] = u8::from_str_radix(hex, 16).map_err(|_| KeyError::Hex)?;
    }
    Ok(out)
}

/// Lowercase hex of a key, written straight into the formatter: no intermediate `String`, so
/// a caller formatting into a zeroizing buffer leaves no copy of a secret behind.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8; 32]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in self.0 {
            f.write_char(char::from(DIGITS[usize::from(b >> 4)]))?;
            f.write_char(char::from(DIGITS[usize::from(b & 0xf)]))?;
        }
        Ok(())
    }
}

fn to_hex(b: &[u8; 32]) -> String {
    Hex(b).to_string()
}

/// 32 secret bytes of kind `K` ([`PrivateKey`] or [`PresharedKey`]): zeroized on drop, `==` is
/// constant-time, and `Debug` (one impl per kind) never shows the secret. The kinds differ only
/// in what else they can do, so parsing, hex and comparison are written once here.
pub struct SecretKey<K>([u8; 32], PhantomData<K>);

/// The kind of a static private key (x25519).
#[derive(Debug, Clone, Copy)]
pub enum Private {}

/// The kind of a preshared key.
#[derive(Debug, Clone, Copy)]
pub enum Preshared {}

/// A static private key (x25519).
pub type PrivateKey = SecretKey<Private>;

/// A 32-byte preshared key mixed into the WireGuard handshake.
pub type PresharedKey = SecretKey<Preshared>;

impl<K> Clone for SecretKey<K> {
    fn clone(&self) -> Self {
        Self::from_bytes(self.0)
    }
}

impl<K> Zeroize for SecretKey<K> {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl<K> Drop for SecretKey<K> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<K> ZeroizeOnDrop for SecretKey<K> {}

impl<K> ConstantTimeEq for SecretKey<K> {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl<K> PartialEq for SecretKey<K> {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl<K> Eq for SecretKey<K> {}

impl<K> SecretKey<K> {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b, PhantomData)
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        from_base64_32(s).map(Self::from_bytes)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s).map(Self::from_bytes)
    }

    /// Hex of the secret in a plain `String` (not zeroized): for tests and harnesses. The UAPI
    /// formats keys into zeroizing buffers without it.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    pub(crate) fn hex(&self) -> Hex<'_> {
        Hex(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// All zeros: UAPI's way of saying "no key" (no private key, no preshared key).
    pub fn is_zero(&self) -> bool {
        self.0.ct_eq(&[0u8; 32]).into()
    }
}

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as x25519 requires.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        Self::from_bytes(secret.to_bytes())
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

/// A public key (x25519). Shown in base64 as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        from_base64_32(s).map(Self)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s).map(Self)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A point of small order (all zeros, the identity, the points of order 2, 4 and 8, and
    /// their non-canonical encodings): a Diffie-Hellman with it yields the all-zero secret
    /// whatever the other side's key, so a peer claiming one contributes nothing to the
    /// WireGuard handshake. Detected as X25519 does (RFC 7748 §6.1): the shared secret with a
    /// fixed scalar is all zeros exactly for these points, since every clamped scalar is a
    /// multiple of the cofactor.
    pub fn is_low_order(&self) -> bool {
        let probe = x25519_dalek::StaticSecret::from([0x5a; 32]);
        !probe
            .diffie_hellman(&x25519_dalek::PublicKey::from(self.0))
            .was_contributory()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_base64(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_derivation_matches_x25519() {
        let k = PrivateKey::generate();
        let again = PrivateKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(k.public_key(), again.public_key());
        assert_eq!(
            PublicKey::from_base64(&k.public_key().to_base64()).unwrap(),
            k.public_key()
        );
        assert_eq!(
            PublicKey::from_hex(&k.public_key().to_hex()).unwrap(),
            k.public_key()
        );
    }

    #[test]
    fn secrets_never_print() {
        let k = PrivateKey::generate();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&k.to_base64()) && !dbg.contains(&k.to_hex()));
        let p = PresharedKey::from_bytes([7; 32]);
        assert_eq!(format!("{p:?}"), "PresharedKey(<redacted>)");
    }

    #[test]
    fn secret_keys_compare_in_constant_time() {
        let (a, b) = ([7u8; 32], {
            let mut b = [7u8; 32];
            b[31] = 8;
            b
        });
        assert!(bool::from(
            PresharedKey::from_bytes(a).ct_eq(&PresharedKey::from_bytes(a))
        ));
        assert!(!bool::from(
            PresharedKey::from_bytes(a).ct_eq(&PresharedKey::from_bytes(b))
        ));
        assert!(bool::from(
            PrivateKey::from_bytes(a).ct_eq(&PrivateKey::from_bytes(a))
        ));
        assert!(!bool::from(
            PrivateKey::from_bytes(a).ct_eq(&PrivateKey::from_bytes(b))
        ));
        // `==` is the constant-time comparison.
        assert_eq!(PresharedKey::from_bytes(a), PresharedKey::from_bytes(a));
        assert_ne!(PresharedKey::from_bytes(a), PresharedKey::from_bytes(b));
        assert_ne!(PrivateKey::from_bytes(a), PrivateKey::from_bytes(b));
        assert!(PresharedKey::from_bytes([0; 32]).is_zero());
        assert!(!PresharedKey::from_bytes(b).is_zero());
        assert!(PrivateKey::from_bytes([0; 32]).is_zero());
    }

    #[test]
    fn hex_is_lowercase_and_round_trips() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37);
        }
        let want: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(PresharedKey::from_bytes(b).to_hex(), want);
        assert_eq!(PrivateKey::from_bytes(b).hex().to_string(), want);
        assert_eq!(
            PresharedKey::from_hex(&want.to_uppercase())
                .unwrap()
                .as_bytes(),
            &b
        );
    }

    /// The x25519 points of small order (libsodium's blocklist) and the encodings with the
    /// ignored top bit set.
    fn low_order_points() -> Vec<[u8; 32]> {
        let hex = |s: &str| parse_hex32(s).unwrap();
        let canonical = [
            hex("0000000000000000000000000000000000000000000000000000000000000000"),
            hex("0100000000000000000000000000000000000000000000000000000000000000"),
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ];
        let mut all = canonical.to_vec();
        all.extend(canonical.iter().map(|p| {
            let mut q = *p;
            q[31] |= 0x80;
            q
        }));
        all
    }

    #[test]
    fn low_order_public_keys_are_recognized() {
        for p in low_order_points() {
            assert!(PublicKey(p).is_low_order(), "{}", PublicKey(p));
        }
        for _ in 0..32 {
            let k = PrivateKey::generate().public_key();
            assert!(!k.is_low_order(), "{k}");
        }
        // The curve's base point (u = 9) has large prime order.
        let mut nine = [0u8; 32];
        nine[0] = 9;
        assert!(!PublicKey(nine).is_low_order());
    }

    #[test]
    fn bad_keys_are_named() {
        assert_eq!(PublicKey::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PublicKey::from_hex("zz"), Err(KeyError::Hex));
        assert_eq!(PublicKey::from_hex("00ff"), Err(KeyError::Length(2)));
        assert_eq!(PublicKey::from_hex(&"g".repeat(64)), Err(KeyError::Hex));
    }
}
