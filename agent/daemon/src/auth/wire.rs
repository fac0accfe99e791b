//! The control channel's wire format (inside TLS): length-prefixed binary frames.
//!
//! ```text
//! frame   = len:u32be  version:u8  kind:u8  body        (len counts version..end, ≤ MAX_FRAME_LEN)
//! string8 = n:u8 bytes[n]      string16 = n:u16be bytes[n]      bytes16 = n:u16be bytes[n]
//! chain   = count:u8 (1..=8) { n:u16be der[n] }*
//! proof   = scheme:u16be (a TLS 1.3 SignatureScheme) signature:bytes16
//! ```
//!
//! Hand-rolled instead of serde: every field has an explicit bound, decoding is strict (no
//! trailing bytes, no unknown kinds, UTF-8 checked), and no input can make it allocate more than
//! the frame it already bounded or panic (see the fuzz-style tests). Errors are `Copy`.

use super::AuthFailure;

/// The only protocol version; a peer speaking another is refused with a clear error.
pub const VERSION: u8 = 1;
/// Largest frame body (after the length field). Eight 4 KiB certificates and a signature fit
/// with room to spare; anything larger is hostile.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Length field size.
pub const HEADER_LEN: usize = 4;
/// Longest certificate chain accepted on the wire (mirrors `veil_identity::MAX_CHAIN_LEN`).
pub const MAX_CHAIN_CERTS: usize = veil_identity::MAX_CHAIN_LEN;
/// Longest single certificate.
pub const MAX_CERT_LEN: usize = 16 * 1024;
/// Longest signature (RSA-4096 is 512 bytes).
pub const MAX_SIGNATURE_LEN: usize = 1024;
/// Longest node name (a DNS name, as Kubernetes node names are).
pub const MAX_NODE_NAME_LEN: usize = 253;

const KIND_HELLO: u8 = 0x01;
const KIND_CONFIRM: u8 = 0x02;
const KIND_REKEY_REQUEST: u8 = 0x03;
const KIND_AUTH_REQUEST: u8 = 0x10;
const KIND_AUTH_RESPONSE: u8 = 0x11;
const KIND_REVOKE: u8 = 0x12;
const KIND_PING: u8 = 0x20;
const KIND_PONG: u8 = 0x21;

/// Why bytes from a peer were rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame of {0} bytes is shorter than its version and kind")]
    FrameTooShort(usize),
    #[error("unsupported protocol version {0} (this agent speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("message is truncated in field {0}")]
    Truncated(&'static str),
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("field {0} is invalid")]
    InvalidField(&'static str),
}

/// A message of the control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Node handshake, both directions: who I am and my WireGuard key.
    Hello(Hello),
    /// Node handshake, both directions: I derived (and installed) the PSK of this epoch.
    Confirm(Confirm),
    /// Asks the dialing side to re-run the node handshake on a fresh connection (e.g. the
    /// acceptor's node SVID rotated).
    RekeyRequest,
    AuthRequest(AuthRequest),
    AuthResponse(AuthResponse),
    /// A workload SVID this node hosted was revoked or removed: drop entries that relied on it.
    Revoke {
        spiffe_id: String,
    },
    Ping(u64),
    Pong(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node_name: String,
    pub wg_public_key: [u8; 32],
    /// The epoch this side proposes; both use the larger of the two.
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    pub epoch: u64,
    /// Exporter-derived key confirmation (not the PSK).
    pub check: [u8; 32],
}

/// A proof of possession: a signature with the workload's SVID key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// TLS 1.3 `SignatureScheme` code.
    pub scheme: u16,
    pub signature: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRequest {
    /// Correlates the response; unique among this sender's outstanding requests.
    pub id: u32,
    pub nonce: [u8; 32],
    pub initiator_identity: u32,
    pub responder_identity: u32,
    /// The initiator workload's X.509-SVID chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    pub proof: Proof,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthAccept {
    pub chain: Vec<Vec<u8>>,
    pub proof: Proof,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthResponse {
    pub id: u32,
    pub result: Result<AuthAccept, AuthFailure>,
}

/// Encodes a message as a complete frame (length prefix included).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(VERSION);
    match msg {
        Message::Hello(h) => {
            out.push(KIND_HELLO);
            put_str8(&mut out, &h.node_name);
            out.extend_from_slice(&h.wg_public_key);
            out.extend_from_slice(&h.epoch.to_be_bytes());
        }
        Message::Confirm(c) => {
            out.push(KIND_CONFIRM);
            out.extend_from_slice(&c.epoch.to_be_bytes());
            out.extend_from_slice(&c.check);
        }
        Message::RekeyRequest => out.push(KIND_REKEY_REQUEST),
        Message::AuthRequest(r) => {
            out.push(KIND_AUTH_REQUEST);
            out.extend_from_slice(&r.id.to_be_bytes());
            out.extend_from_slice(&r.nonce);
            out.extend_from_slice(&r.initiator_identity.to_be_bytes());
            out.extend_from_slice(&r.responder_identity.to_be_bytes());
            put_chain(&mut out, &r.chain);
            put_proof(&mut out, &r.proof);
        }
        Message::AuthResponse(r) => {
            out.push(KIND_AUTH_RESPONSE);
            out.extend_from_slice(&r.id.to_be_bytes());
            match &r.result {
                Ok(a) => {
                    out.push(0);
                    put_chain(&mut out, &a.chain);
                    put_proof(&mut out, &a.proof);
                }
                Err(f) => {
                    out.push(1);
                    out.push(f.code());
                }
            }
        }
        Message::Revoke { spiffe_id } => {
            out.push(KIND_REVOKE);
            put_bytes16(&mut out, spiffe_id.as_bytes());
        }
        Message::Ping(n) => {
            out.push(KIND_PING);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Message::Pong(n) => {
            out.push(KIND_PONG);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    let len = (out.len() - HEADER_LEN) as u32;
    out[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    out
}

// Encoders truncate what does not fit the bound instead of panicking; the decoder on the other
// side then rejects the message, which is the right outcome for a value we should never send.
fn put_str8(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u8::MAX as usize)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_chain(out: &mut Vec<u8>, chain: &[Vec<u8>]) {
    let chain = &chain[..chain.len().min(u8::MAX as usize)];
    out.push(chain.len() as u8);
    for c in chain {
        put_bytes16(out, c);
    }
}

fn put_proof(out: &mut Vec<u8>, p: &Proof) {
    out.extend_from_slice(&p.scheme.to_be_bytes());
    put_bytes16(out, &p.signature);
}

/// Reads a frame's length field and checks it against the bounds: what the shell reads next.
pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len < 2 {
        return Err(Error::FrameTooShort(len));
    }
    Ok(len)
}

/// Streaming decode: the first complete frame of `buf` and the bytes it used, `None` if more
/// bytes are needed. A length over the maximum is refused before any body arrives.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = parse_header(*header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, HEADER_LEN + len)))
}

/// Decodes one frame body (version, kind, fields), strictly.
pub fn decode_body(body: &[u8]) -> Result<Message, Error> {
    if body.len() > MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut r = Reader(body);
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let kind = r.u8("kind")?;
    let msg = match kind {
        KIND_HELLO => {
            let node_name = r.str8("node_name")?;
            if !is_node_name(&node_name) {
                return Err(Error::InvalidField("node_name"));
            }
            Message::Hello(Hello {
                node_name,
                wg_public_key: r.array("wg_public_key")?,
                epoch: r.u64("epoch")?,
            })
        }
        KIND_CONFIRM => Message::Confirm(Confirm {
            epoch: r.u64("epoch")?,
            check: r.array("check")?,
        }),
        KIND_REKEY_REQUEST => Message::RekeyRequest,
        KIND_AUTH_REQUEST => Message::AuthRequest(AuthRequest {
            id: r.u32("id")?,
            nonce: r.array("nonce")?,
            initiator_identity: r.u32("initiator_identity")?,
            responder_identity: r.u32("responder_identity")?,
            chain: r.chain("chain")?,
            proof: r.proof()?,
        }),
        KIND_AUTH_RESPONSE => {
            let id = r.u32("id")?;
            let result = match r.u8("result")? {
                0 => Ok(AuthAccept {
                    chain: r.chain("chain")?,
                    proof: r.proof()?,
                }),
                1 => Err(AuthFailure::from_code(r.u8("failure")?)
                    .ok_or(Error::InvalidField("failure"))?),
                _ => return Err(Error::InvalidField("result")),
            };
            Message::AuthResponse(AuthResponse { id, result })
        }
        KIND_REVOKE => {
            let raw = r.bytes16("spiffe_id")?;
            if raw.is_empty() || raw.len() > veil_identity::MAX_SPIFFE_ID_LEN {
                return Err(Error::InvalidField("spiffe_id"));
            }
            let spiffe_id = std::str::from_utf8(raw)
                .map_err(|_| Error::InvalidField("spiffe_id"))?
                .to_owned();
            Message::Revoke { spiffe_id }
        }
        KIND_PING => Message::Ping(r.u64("ping")?),
        KIND_PONG => Message::Pong(r.u64("pong")?),
        other => return Err(Error::UnknownKind(other)),
    };
    if !r.0.is_empty() {
        return Err(Error::TrailingBytes(r.0.len()));
    }
    Ok(msg)
}

/// Node names as Kubernetes allows them: DNS subdomain characters.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(Error::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(Error::Truncated(what))?;
        self.0 = rest;
        Ok(*head)
    }

    fn str8(&mut self, what: &'static str) -> Result<String, Error> {
        let n = self.u8(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Error::InvalidField(what))
    }

    fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], Error> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn chain(&mut self, what: &'static str) -> Result<Vec<Vec<u8>>, Error> {
        let count = self.u8(what)? as usize;
        if count == 0 || count > MAX_CHAIN_CERTS {
            return Err(Error::InvalidField(what));
        }
        let mut chain = Vec::with_capacity(count);
        for _ in 0..count {
            let der = self.bytes16(what)?;
            if der.is_empty() || der.len() > MAX_CERT_LEN {
                return Err(Error::InvalidField(what));
            }
            chain.push(der.to_vec());
        }
        Ok(chain)
    }

    fn proof(&mut self) -> Result<Proof, Error> {
        let scheme = self.u16("proof_scheme")?;
        let sig = self.bytes16("proof_signature")?;
        if sig.is_empty() || sig.len() > MAX_SIGNATURE_LEN {
            return Err(Error::InvalidField("proof_signature"));
        }
        Ok(Proof {
            scheme,
            signature: sig.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn samples() -> Vec<Message> {
        let proof = Proof {
            scheme: 0x0403,
            signature: vec![7; 71],
        };
        vec![
            Message::Hello(Hello {
                node_name: "node-a".into(),
                wg_public_key: [9; 32],
                epoch: 42,
            }),
            Message::Confirm(Confirm {
                epoch: 42,
                check: [3; 32],
            }),
            Message::RekeyRequest,
            Message::AuthRequest(AuthRequest {
                id: 7,
                nonce: [1; 32],
                initiator_identity: 256,
                responder_identity: 300,
                chain: vec![vec![0x30; 500], vec![0x31; 400]],
                proof: proof.clone(),
            }),
            Message::AuthResponse(AuthResponse {
                id: 7,
                result: Ok(AuthAccept {
                    chain: vec![vec![0x30; 600]],
                    proof,
                }),
            }),
            Message::AuthResponse(AuthResponse {
                id: 8,
                result: Err(AuthFailure::NotHosted),
            }),
            Message::Revoke {
                spiffe_id: "spiffe://lab.veil/ns/shop/sa/frontend".into(),
            },
            Message::Ping(1),
            Message::Pong(u64::MAX),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let frame = encode(&m);
            let (back, used) = decode_frame(&frame).unwrap().unwrap();
            assert_eq!(back, m);
            assert_eq!(used, frame.len());
            // Two frames back to back decode one at a time.
            let mut two = frame.clone();
            two.extend_from_slice(&frame);
            let (first, used) = decode_frame(&two).unwrap().unwrap();
            assert_eq!((first, used), (m, frame.len()));
        }
    }

    #[test]
    fn every_truncation_asks_for_more_bytes_never_panics() {
        for m in samples() {
            let frame = encode(&m);
            for cut in 0..frame.len() {
                assert_eq!(decode_frame(&frame[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_truncated_body_with_a_consistent_length_is_an_error() {
        for m in samples() {
            let frame = encode(&m);
            let body = &frame[HEADER_LEN..];
            for cut in 0..body.len() {
                let e = decode_body(&body[..cut]).unwrap_err();
                assert!(
                    matches!(e, Error::Truncated(_) | Error::InvalidField(_)),
                    "{m:?} cut at {cut}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn bounds_and_strictness() {
        assert_eq!(
            parse_header(((MAX_FRAME_LEN + 1) as u32).to_be_bytes()),
            Err(Error::FrameTooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(
            decode_frame(&u32::MAX.to_be_bytes()),
            Err(Error::FrameTooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(
            parse_header(1u32.to_be_bytes()),
            Err(Error::FrameTooShort(1))
        );
        assert_eq!(
            decode_body(&[2, KIND_PING]),
            Err(Error::UnsupportedVersion(2))
        );
        assert_eq!(decode_body(&[VERSION, 0x7f]), Err(Error::UnknownKind(0x7f)));
        let mut ping = encode(&Message::Ping(1))[HEADER_LEN..].to_vec();
        ping.push(0);
        assert_eq!(decode_body(&ping), Err(Error::TrailingBytes(1)));
        // Bad node names, empty chains, unknown failure codes.
        let mut hello = vec![VERSION, KIND_HELLO, 3, b'A', b'/', b'x'];
        hello.extend_from_slice(&[0; 40]);
        assert_eq!(decode_body(&hello), Err(Error::InvalidField("node_name")));
        let mut req = vec![VERSION, KIND_AUTH_REQUEST];
        req.extend_from_slice(&[0; 4 + 32 + 8]);
        req.push(0);
        assert_eq!(decode_body(&req), Err(Error::InvalidField("chain")));
        assert_eq!(
            decode_body(&[VERSION, KIND_AUTH_RESPONSE, 0, 0, 0, 1, 1, 0]),
            Err(Error::InvalidField("failure"))
        );
        assert_eq!(
            decode_body(&[VERSION, KIND_AUTH_RESPONSE, 0, 0, 0, 1, 2]),
            Err(Error::InvalidField("result"))
        );
        let mut nine = vec![VERSION, KIND_AUTH_RESPONSE, 0, 0, 0, 1, 0, 9];
        nine.extend_from_slice(&[0, 1, 0x30].repeat(9));
        assert_eq!(decode_body(&nine), Err(Error::InvalidField("chain")));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut buf = vec![0u8; 4096];
        for _ in 0..20_000 {
            let n = rng.random_range(0..buf.len());
            rng.fill_bytes(&mut buf[..n]);
            let _ = decode_frame(&buf[..n]);
            let _ = decode_body(&buf[..n]);
            // Random bodies behind a valid header and version reach the field decoders.
            if n > 2 {
                buf[0] = VERSION;
                buf[1] = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21][n % 8];
                let _ = decode_body(&buf[..n]);
            }
        }
    }

    mod properties {
        use super::super::*;
        use proptest::{collection::vec, prelude::*};

        fn chain() -> impl Strategy<Value = Vec<Vec<u8>>> {
            vec(vec(any::<u8>(), 1..64), 1..=MAX_CHAIN_CERTS)
        }

        fn proof() -> impl Strategy<Value = Proof> {
            (any::<u16>(), vec(any::<u8>(), 1..128))
                .prop_map(|(scheme, signature)| Proof { scheme, signature })
        }

        fn message() -> impl Strategy<Value = Message> {
            prop_oneof![
                ("[a-z0-9][a-z0-9.-]{0,40}", any::<[u8; 32]>(), any::<u64>()).prop_map(
                    |(node_name, wg_public_key, epoch)| Message::Hello(Hello {
                        node_name,
                        wg_public_key,
                        epoch
                    })
                ),
                (any::<u64>(), any::<[u8; 32]>())
                    .prop_map(|(epoch, check)| Message::Confirm(Confirm { epoch, check })),
                Just(Message::RekeyRequest),
                (
                    any::<u32>(),
                    any::<[u8; 32]>(),
                    any::<u32>(),
                    any::<u32>(),
                    chain(),
                    proof()
                )
                    .prop_map(|(id, nonce, i, r, chain, proof)| {
                        Message::AuthRequest(AuthRequest {
                            id,
                            nonce,
                            initiator_identity: i,
                            responder_identity: r,
                            chain,
                            proof,
                        })
                    }),
                (any::<u32>(), chain(), proof()).prop_map(|(id, chain, proof)| {
                    Message::AuthResponse(AuthResponse {
                        id,
                        result: Ok(AuthAccept { chain, proof }),
                    })
                }),
                (
                    any::<u32>(),
                    proptest::sample::select(AuthFailure::ALL.to_vec())
                )
                    .prop_map(|(id, f)| Message::AuthResponse(AuthResponse { id, result: Err(f) })),
                "spiffe://[a-z.]{1,20}/[a-z/]{0,40}"
                    .prop_map(|spiffe_id| Message::Revoke { spiffe_id }),
                any::<u64>().prop_map(Message::Ping),
                any::<u64>().prop_map(Message::Pong),
            ]
        }

        proptest! {
            /// Any bytes: an error, a request for more, or a frame that re-encodes to itself,
            /// never a panic, never a length beyond the input.
            #[test]
            fn arbitrary_bytes_never_panic(buf in vec(any::<u8>(), 0..2048)) {
                if let Ok(Some((m, used))) = decode_frame(&buf) {
                    prop_assert!(used <= buf.len());
                    prop_assert_eq!(&encode(&m)[..], &buf[..used]);
                }
                let _ = decode_body(&buf);
            }

            /// Arbitrary bodies behind a valid version and each kind reach every field decoder.
            #[test]
            fn arbitrary_fields_never_panic(
                kind in proptest::sample::select(vec![0x01u8, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21]),
                rest in vec(any::<u8>(), 0..4096),
            ) {
                let mut body = vec![VERSION, kind];
                body.extend_from_slice(&rest);
                if let Ok(m) = decode_body(&body) {
                    prop_assert_eq!(&encode(&m)[HEADER_LEN..], &body[..]);
                }
            }

            /// Every well-formed message round-trips, and every prefix of its frame only asks
            /// for more bytes.
            #[test]
            fn well_formed_messages_round_trip(m in message()) {
                let frame = encode(&m);
                prop_assert_eq!(decode_frame(&frame), Ok(Some((m, frame.len()))));
                for cut in 0..frame.len() {
                    prop_assert_eq!(decode_frame(&frame[..cut]), Ok(None));
                }
            }
        }
    }

    #[test]
    fn bit_flips_of_valid_frames_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for m in samples() {
            let frame = encode(&m);
            for _ in 0..2_000 {
                let mut f = frame.clone();
                let i = rng.random_range(0..f.len());
                f[i] ^= 1 << rng.random_range(0..8);
                // A flip that still decodes must re-encode to a valid frame.
                if let Ok(Some((back, _))) = decode_frame(&f) {
                    assert!(decode_frame(&encode(&back)).unwrap().is_some());
                }
            }
        }
    }
}
