//! WireGuard keys: x25519 static keys and preshared keys. Secrets zeroize on drop and never
//! print (`Debug` shows only the public half or `<redacted>`).

use base64::{engine::general_purpose::STANDARD, Engine as _};
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

/// Parses 64 lowercase-or-uppercase hex digits (the UAPI key encoding).
pub fn parse_hex32(s: &str) -> Result<[u8; 32], KeyError> {
    if s.len() != 64 {
        if s.bytes().all(|b| b.is_ascii_hexdigit()) && s.len() % 2 == 0 {
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

fn to_hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A static private key (x25519). Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as x25519 requires.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        Self(secret.to_bytes())
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let mut v = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        let k = to_32(&v);
        v.zeroize();
        k.map(Self)
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

    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// All zeros: UAPI's way of saying "no private key".
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// A public key (x25519). Shown in base64 as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let v = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        to_32(&v).map(Self)
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

/// A 32-byte preshared key mixed into the WireGuard handshake. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s).map(Self)
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let mut v = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        let k = to_32(&v);
        v.zeroize();
        k.map(Self)
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    /// A short, non-reversible fingerprint for logs (first 4 bytes of SHA-less mixing are
    /// enough to tell epochs apart without revealing the key).
    pub fn fingerprint(&self) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.0 {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    }
}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
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
    fn bad_keys_are_named() {
        assert_eq!(PublicKey::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PublicKey::from_hex("zz"), Err(KeyError::Hex));
        assert_eq!(PublicKey::from_hex("00ff"), Err(KeyError::Length(2)));
        assert_eq!(PublicKey::from_hex(&"g".repeat(64)), Err(KeyError::Hex));
    }
}
