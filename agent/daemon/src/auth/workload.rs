//! Workload handshake (sans-IO): two node agents prove, over their authenticated channel, that
//! a (local identity, remote identity) pair is backed by the two workloads' X.509-SVIDs.
//!
//! ```text
//! initiator (node I, workload identity L)           responder (node R, workload identity R)
//!   AuthRequest { id, nonce, L, R, chain_L, sig_L(transcript_I) } ──▶
//!                     checks chain_L, L's SPIFFE ID ∈ identities node I hosts, sig_L;
//!                     picks its own SVID for R (only if it hosts R)
//!   ◀── AuthResponse { id, Ok { chain_R, sig_R(transcript_R) } | Err(reason) }
//!   checks chain_R, R's SPIFFE ID ∈ identities node R hosts, sig_R
//!
//! transcript = "veil-workload-auth-v1\0" ‖ role ('I'|'R') ‖ binding(32) ‖ nonce(32)
//!              ‖ L(u32) ‖ R(u32) ‖ node I id(u32) ‖ node R id(u32) [‖ SHA-256(leaf_L), role R]
//! binding    = TLS-Exporter("EXPORTER-veil-workload-auth", "", 32), once per connection
//! ```
//!
//! The binding ties each proof to this TLS session (a proof cannot be replayed on another
//! channel); the nonce makes each request's proof fresh; the responder's proof covers the
//! initiator's leaf, pairing the two. Success yields an [`Authenticated`] on each side:
//! (L, R, node R) on the initiator, (R, L, node I) on the responder, expiring at the earliest
//! not-after of the SVIDs involved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use veil_identity::{validate_x509_svid, BundleSet, SpiffeId, Svid, TrustDomain, ValidatedSvid};

use super::tls::Exporter;
use super::wire::{AuthAccept, AuthRequest, AuthResponse, Proof};
use super::{AuthFailure, AuthTriple, LocalWorkloads, PeerDirectory};

/// Exporter label of the per-session binding value.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-veil-workload-auth";
const TRANSCRIPT_PREFIX: &[u8] = b"veil-workload-auth-v1\0";

/// Signature schemes a proof may use (the TLS 1.3 set).
pub const PROOF_SCHEMES: [SignatureScheme; 6] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// The exporter value that binds proofs to one TLS session.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionBinding([u8; 32]);

impl SessionBinding {
    pub fn from_exporter(ex: &dyn Exporter) -> Result<Self, rustls::Error> {
        let mut out = [0u8; 32];
        ex.export(BINDING_LABEL, &[], &mut out)?;
        Ok(Self(out))
    }

    #[cfg(test)]
    pub(crate) fn fixed(b: [u8; 32]) -> Self {
        Self(b)
    }
}

impl std::fmt::Debug for SessionBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionBinding(<redacted>)")
    }
}

/// What one side needs to check the other: the channel it runs on and the cluster view.
pub struct Context<'a> {
    pub trust_domain: &'a TrustDomain,
    pub bundles: &'a BundleSet,
    pub directory: &'a dyn PeerDirectory,
    pub local_node: u32,
    pub peer_node: u32,
    pub binding: SessionBinding,
    pub now: SystemTime,
}

/// A successful workload handshake, from this node's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub triple: AuthTriple,
    pub local_spiffe_id: SpiffeId,
    pub remote_spiffe_id: SpiffeId,
    /// Earliest not-after of the SVIDs involved (and of the peer chain's issuers).
    pub expires: SystemTime,
}

/// Loaded signing keys of workload SVIDs, by SVID serial, so a busy pair does not re-parse
/// its PKCS#8 key for every handshake. Bounded; cleared when full.
#[derive(Default)]
pub struct SigningKeys(Mutex<HashMap<(SpiffeId, String), Arc<dyn SigningKey>>>);

const SIGNING_KEYS_MAX: usize = 4096;

impl SigningKeys {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, svid: &Svid) -> Result<Arc<dyn SigningKey>, AuthFailure> {
        let k = (svid.spiffe_id().clone(), svid.serial().to_owned());
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = map.get(&k) {
            return Ok(key.clone());
        }
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(
            &svid.private_key().private_key_der(),
        )
        .map_err(|_| AuthFailure::NoLocalSvid)?;
        if map.len() >= SIGNING_KEYS_MAX {
            map.clear();
        }
        map.insert(k, key.clone());
        Ok(key)
    }
}

#[derive(Clone, Copy)]
enum Role {
    Initiator,
    Responder,
}

struct Transcript<'a> {
    binding: &'a SessionBinding,
    nonce: &'a [u8; 32],
    initiator_identity: u32,
    responder_identity: u32,
    initiator_node: u32,
    responder_node: u32,
}

impl Transcript<'_> {
    fn bytes(&self, role: Role, initiator_leaf: Option<&[u8]>) -> Vec<u8> {
        let mut m = Vec::with_capacity(TRANSCRIPT_PREFIX.len() + 1 + 64 + 16 + 32);
        m.extend_from_slice(TRANSCRIPT_PREFIX);
        m.push(match role {
            Role::Initiator => b'I',
            Role::Responder => b'R',
        });
        m.extend_from_slice(&self.binding.0);
        m.extend_from_slice(self.nonce);
        m.extend_from_slice(&self.initiator_identity.to_be_bytes());
        m.extend_from_slice(&self.responder_identity.to_be_bytes());
        m.extend_from_slice(&self.initiator_node.to_be_bytes());
        m.extend_from_slice(&self.responder_node.to_be_bytes());
        if let Some(leaf) = initiator_leaf {
            m.extend_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf).as_ref(),
            );
        }
        m
    }
}

fn sign(keys: &SigningKeys, svid: &Svid, msg: &[u8]) -> Result<Proof, AuthFailure> {
    let key = keys.get(svid)?;
    let signer = key
        .choose_scheme(&PROOF_SCHEMES)
        .ok_or(AuthFailure::NoLocalSvid)?;
    let signature = signer.sign(msg).map_err(|_| AuthFailure::NoLocalSvid)?;
    Ok(Proof {
        scheme: u16::from(signer.scheme()),
        signature,
    })
}

fn verify_proof(leaf: &[u8], proof: &Proof, msg: &[u8]) -> Result<(), AuthFailure> {
    let scheme = SignatureScheme::from(proof.scheme);
    if !PROOF_SCHEMES.contains(&scheme) {
        return Err(AuthFailure::BadProof);
    }
    static ALGS: std::sync::OnceLock<rustls::crypto::WebPkiSupportedAlgorithms> =
        std::sync::OnceLock::new();
    let algs = ALGS.get_or_init(|| {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    });
    // TLS 1.3 semantics: the first algorithm mapped to the scheme, which also pins the key
    // type (an ECDSA P-256 scheme cannot verify with a P-384 key).
    let alg = algs
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .and_then(|(_, a)| a.first())
        .ok_or(AuthFailure::BadProof)?;
    let der = CertificateDer::from(leaf);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| AuthFailure::InvalidSvid)?;
    cert.verify_signature(*alg, msg, &proof.signature)
        .map_err(|_| AuthFailure::BadProof)
}

/// Validates a peer workload's chain and checks that its SPIFFE ID is in our trust domain,
/// that the peer node hosts it, and that it maps to `claimed_identity`.
fn check_peer_workload(
    chain: &[Vec<u8>],
    claimed_identity: u32,
    ctx: &Context<'_>,
) -> Result<ValidatedSvid, AuthFailure> {
    let chain: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let v = validate_x509_svid(&chain, ctx.bundles, ctx.now).map_err(|e| {
        note_outside_validity(&e, ctx.now);
        AuthFailure::from_svid_error(&e)
    })?;
    if !v.spiffe_id.is_member_of(ctx.trust_domain) {
        return Err(AuthFailure::WrongTrustDomain);
    }
    let ids = ctx.directory.hosted_identities(ctx.peer_node, &v.spiffe_id);
    if ids.is_empty() {
        return Err(AuthFailure::NotHosted);
    }
    if !ids.contains(&claimed_identity) {
        return Err(AuthFailure::WrongSpiffeId);
    }
    Ok(v)
}

/// A peer workload's SVID outside its validity by this node's clock is most often a clock that
/// is wrong here or on the issuer's side (the pair only shows `invalid-svid` or
/// `expired-svid`): said at WARN with the time it was judged by, at most once a minute.
fn note_outside_validity(e: &veil_identity::SvidError, now: SystemTime) {
    use veil_identity::SvidError as E;
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    if !matches!(
        e,
        E::NotYetValid { .. }
            | E::Expired { .. }
            | E::IssuerNotYetValid { .. }
            | E::IssuerExpired { .. }
    ) {
        return;
    }
    if !crate::warning_due(&LAST, std::time::Duration::from_secs(60)) {
        return;
    }
    let judged = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    tracing::warn!(error = %e, judged_at_unix = judged, "a peer workload's svid is outside its validity by this node's clock: is a clock wrong? (said at most once a minute)");
}

/// The leaf of a peer's chain. The chain was validated first, which refuses an empty one; this
/// keeps an empty chain an `InvalidSvid` even if that order changes, never an index panic.
fn leaf_of(chain: &[Vec<u8>]) -> Result<&[u8], AuthFailure> {
    chain
        .first()
        .map(Vec::as_slice)
        .ok_or(AuthFailure::InvalidSvid)
}

/// Checks our own SVID before using it to answer or ask.
fn check_local_svid(svid: &Svid, identity: u32, ctx: &Context<'_>) -> Result<(), AuthFailure> {
    if svid.is_expired_at(ctx.now) {
        return Err(AuthFailure::ExpiredSvid);
    }
    // Never speak for a workload the cluster does not place on this node.
    if !ctx
        .directory
        .hosted_identities(ctx.local_node, svid.spiffe_id())
        .contains(&identity)
    {
        return Err(AuthFailure::NotHosted);
    }
    Ok(())
}

/// The initiating side of one workload handshake.
#[derive(Debug)]
pub struct Initiator {
    id: u32,
    nonce: [u8; 32],
    local_identity: u32,
    remote_identity: u32,
    local_svid: Arc<Svid>,
}

impl Initiator {
    /// Builds the request for (local identity, remote identity) with the local workload's
    /// SVID. `nonce` must be fresh random bytes.
    pub fn start(
        id: u32,
        nonce: [u8; 32],
        local_identity: u32,
        remote_identity: u32,
        local_svid: Arc<Svid>,
        keys: &SigningKeys,
        ctx: &Context<'_>,
    ) -> Result<(Self, AuthRequest), AuthFailure> {
        check_local_svid(&local_svid, local_identity, ctx)?;
        let t = Transcript {
            binding: &ctx.binding,
            nonce: &nonce,
            initiator_identity: local_identity,
            responder_identity: remote_identity,
            initiator_node: ctx.local_node,
            responder_node: ctx.peer_node,
        };
        let proof = sign(keys, &local_svid, &t.bytes(Role::Initiator, None))?;
        let req = AuthRequest {
            id,
            nonce,
            initiator_identity: local_identity,
            responder_identity: remote_identity,
            chain: local_svid
                .cert_chain()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect(),
            proof,
        };
        Ok((
            Self {
                id,
                nonce,
                local_identity,
                remote_identity,
                local_svid,
            },
            req,
        ))
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn triple(&self, ctx_peer_node: u32) -> AuthTriple {
        AuthTriple {
            local_identity: self.local_identity,
            remote_identity: self.remote_identity,
            remote_node: ctx_peer_node,
        }
    }

    /// Checks the response.
    pub fn finish(
        self,
        resp: AuthResponse,
        ctx: &Context<'_>,
    ) -> Result<Authenticated, AuthFailure> {
        if resp.id != self.id {
            return Err(AuthFailure::ProtocolError);
        }
        let accept = resp.result?;
        let peer = check_peer_workload(&accept.chain, self.remote_identity, ctx)?;
        let t = Transcript {
            binding: &ctx.binding,
            nonce: &self.nonce,
            initiator_identity: self.local_identity,
            responder_identity: self.remote_identity,
            initiator_node: ctx.local_node,
            responder_node: ctx.peer_node,
        };
        let msg = t.bytes(Role::Responder, Some(self.local_svid.leaf().as_ref()));
        verify_proof(leaf_of(&accept.chain)?, &accept.proof, &msg)?;
        Ok(Authenticated {
            triple: self.triple(ctx.peer_node),
            local_spiffe_id: self.local_svid.spiffe_id().clone(),
            remote_spiffe_id: peer.spiffe_id,
            expires: self.local_svid.not_after().min(peer.valid_until),
        })
    }
}

/// Answers one request. Returns the response to send and the local outcome (an entry to
/// write on success, a reason to count on failure).
pub fn respond(
    req: &AuthRequest,
    local: &dyn LocalWorkloads,
    keys: &SigningKeys,
    ctx: &Context<'_>,
) -> (AuthResponse, Result<Authenticated, AuthFailure>) {
    let outcome = respond_inner(req, local, keys, ctx);
    let result = match &outcome {
        Ok((accept, _)) => Ok(accept.clone()),
        Err(f) => Err(*f),
    };
    (AuthResponse { id: req.id, result }, outcome.map(|(_, a)| a))
}

fn respond_inner(
    req: &AuthRequest,
    local: &dyn LocalWorkloads,
    keys: &SigningKeys,
    ctx: &Context<'_>,
) -> Result<(AuthAccept, Authenticated), AuthFailure> {
    // Cheap checks first (security issue §6): a request for a workload this node does not
    // host is refused before the peer's chain is parsed or any signature verified.
    let svid = local
        .svid_for(req.responder_identity)
        .ok_or(AuthFailure::NotHosted)?;
    let peer = check_peer_workload(&req.chain, req.initiator_identity, ctx)?;
    let leaf = leaf_of(&req.chain)?;
    let initiator_transcript = Transcript {
        binding: &ctx.binding,
        nonce: &req.nonce,
        initiator_identity: req.initiator_identity,
        responder_identity: req.responder_identity,
        initiator_node: ctx.peer_node,
        responder_node: ctx.local_node,
    };
    verify_proof(
        leaf,
        &req.proof,
        &initiator_transcript.bytes(Role::Initiator, None),
    )?;
    check_local_svid(&svid, req.responder_identity, ctx)?;
    let proof = sign(
        keys,
        &svid,
        &initiator_transcript.bytes(Role::Responder, Some(leaf)),
    )?;
    let accept = AuthAccept {
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect(),
        proof,
    };
    let authenticated = Authenticated {
        triple: AuthTriple {
            local_identity: req.responder_identity,
            remote_identity: req.initiator_identity,
            remote_node: ctx.peer_node,
        },
        local_spiffe_id: svid.spiffe_id().clone(),
        remote_spiffe_id: peer.spiffe_id,
        expires: svid.not_after().min(peer.valid_until),
    };
    Ok((accept, authenticated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::{session_pair, Pki};
    use crate::auth::wire::{decode_frame, encode, Message};
    use crate::auth::{StaticDirectory, StaticWorkloads};
    use std::time::Duration;
    use veil_certs_dev::BadVariant;

    const NODE_A: u32 = 1;
    const NODE_B: u32 = 2;
    const FRONTEND: u32 = 300;
    const BACKEND: u32 = 301;
    const INTRUDER: u32 = 302;

    struct World {
        pki: Pki,
        dir: StaticDirectory,
        frontend: Arc<Svid>,
        backend: Arc<Svid>,
        intruder: Arc<Svid>,
        on_b: StaticWorkloads,
        keys: SigningKeys,
    }

    fn world() -> World {
        let pki = Pki::new("lab.veil");
        let hour = Duration::from_secs(3600);
        let frontend = pki.workload("shop", "frontend", hour);
        let backend = pki.workload("shop", "backend", 2 * hour);
        let intruder = pki.workload("shop", "intruder", hour);
        let mut dir = StaticDirectory::new();
        dir.add_workload(NODE_A, frontend.spiffe_id().clone(), FRONTEND);
        dir.add_workload(NODE_A, intruder.spiffe_id().clone(), INTRUDER);
        dir.add_workload(NODE_B, backend.spiffe_id().clone(), BACKEND);
        let on_b = StaticWorkloads([(BACKEND, backend.clone())].into());
        World {
            pki,
            dir,
            frontend,
            backend,
            intruder,
            on_b,
            keys: SigningKeys::new(),
        }
    }

    fn ctx<'a>(w: &'a World, local: u32, peer: u32, binding: SessionBinding) -> Context<'a> {
        ctx_in(w, &w.dir, local, peer, binding)
    }

    /// Node A's and node B's contexts over one fixed session binding.
    fn fixed_pair(w: &World) -> (Context<'_>, Context<'_>) {
        let binding = SessionBinding::fixed([3; 32]);
        (
            ctx(w, NODE_A, NODE_B, binding),
            ctx(w, NODE_B, NODE_A, binding),
        )
    }

    /// [`ctx`] with another view of placements (a node that lies about what it hosts).
    fn ctx_in<'a>(
        w: &'a World,
        directory: &'a StaticDirectory,
        local: u32,
        peer: u32,
        binding: SessionBinding,
    ) -> Context<'a> {
        Context {
            trust_domain: &w.pki.td,
            bundles: &w.pki.bundles,
            directory,
            local_node: local,
            peer_node: peer,
            binding,
            now: SystemTime::now(),
        }
    }

    /// The exporter bindings of a real TLS session: (client's, server's).
    fn bindings(w: &World) -> (SessionBinding, SessionBinding) {
        let (client, server) = session_pair(&w.pki);
        (
            SessionBinding::from_exporter(&*client).unwrap(),
            SessionBinding::from_exporter(&*server).unwrap(),
        )
    }

    /// Starts a request from `local` (presenting `svid`) for BACKEND.
    fn start(
        w: &World,
        ca: &Context<'_>,
        (id, nonce): (u32, u8),
        local: u32,
        svid: Arc<Svid>,
    ) -> (Initiator, AuthRequest) {
        Initiator::start(id, [nonce; 32], local, BACKEND, svid, &w.keys, ca).unwrap()
    }

    /// node-b answers with the workloads it hosts.
    fn respond_on_b(
        w: &World,
        req: &AuthRequest,
        cb: &Context<'_>,
    ) -> (AuthResponse, Result<Authenticated, AuthFailure>) {
        respond(req, &w.on_b, &w.keys, cb)
    }

    /// A full exchange over a real TLS session's exporter values.
    fn exchange(
        w: &World,
        local_identity: u32,
        remote_identity: u32,
        svid: Arc<Svid>,
    ) -> (
        Result<Authenticated, AuthFailure>,
        Result<Authenticated, AuthFailure>,
    ) {
        let (ba, bb) = bindings(w);
        assert_eq!(ba, bb);
        let ca = ctx(w, NODE_A, NODE_B, ba);
        let cb = ctx(w, NODE_B, NODE_A, bb);
        let (init, req) = match Initiator::start(
            7,
            [5; 32],
            local_identity,
            remote_identity,
            svid,
            &w.keys,
            &ca,
        ) {
            Ok(x) => x,
            Err(f) => return (Err(f), Err(f)),
        };
        let Message::AuthRequest(req) = roundtrip(Message::AuthRequest(req)) else {
            unreachable!()
        };
        let (resp, responder) = respond(&req, &w.on_b, &w.keys, &cb);
        let Message::AuthResponse(resp) = roundtrip(Message::AuthResponse(resp)) else {
            unreachable!()
        };
        (init.finish(resp, &ca), responder)
    }

    /// Through the wire encoding and back.
    fn roundtrip(m: Message) -> Message {
        decode_frame(&encode(&m)).unwrap().unwrap().0
    }

    #[test]
    fn good_pair_authenticates_on_both_sides() {
        let w = world();
        let (a, b) = exchange(&w, FRONTEND, BACKEND, w.frontend.clone());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(
            a.triple,
            AuthTriple {
                local_identity: FRONTEND,
                remote_identity: BACKEND,
                remote_node: NODE_B
            }
        );
        assert_eq!(
            b.triple,
            AuthTriple {
                local_identity: BACKEND,
                remote_identity: FRONTEND,
                remote_node: NODE_A
            }
        );
        assert_eq!(&a.remote_spiffe_id, w.backend.spiffe_id());
        assert_eq!(&b.remote_spiffe_id, w.frontend.spiffe_id());
        // Expiry: the earliest not-after (frontend's 1 h, not backend's 2 h), on both sides.
        assert_eq!(a.expires, w.frontend.not_after());
        assert_eq!(b.expires, w.frontend.not_after());
    }

    #[test]
    fn expired_initiator_svid_is_refused_as_expired() {
        let w = world();
        let expired = Arc::new(
            w.pki
                .ca
                .issue_bad(BadVariant::Expired, w.frontend.spiffe_id())
                .unwrap()
                .into_svid()
                .unwrap(),
        );
        // Our own side refuses to use it...
        let (a, _) = exchange(&w, FRONTEND, BACKEND, expired.clone());
        assert_eq!(a, Err(AuthFailure::ExpiredSvid));
        // ...and a peer that sends one anyway is refused by the responder with that reason.
        let (ba, bb) = bindings(&w);
        let mut ca = ctx(&w, NODE_A, NODE_B, ba);
        ca.now = expired.not_before();
        let (_, req) = start(&w, &ca, (1, 0), FRONTEND, expired);
        let (resp, outcome) = respond_on_b(&w, &req, &ctx(&w, NODE_B, NODE_A, bb));
        assert_eq!(outcome, Err(AuthFailure::ExpiredSvid));
        assert_eq!(resp.result, Err(AuthFailure::ExpiredSvid));
    }

    #[test]
    fn responder_never_answers_for_a_workload_it_does_not_host() {
        let w = world();
        // node-b is asked for the intruder identity, which lives on node-a.
        let (a, b) = exchange(&w, FRONTEND, INTRUDER, w.frontend.clone());
        assert_eq!(a, Err(AuthFailure::NotHosted));
        assert_eq!(b, Err(AuthFailure::NotHosted));
    }

    /// node-a's requests as claimed by node-a, which lies about what it hosts: (case, node-a's
    /// placements added, identity claimed, SVID presented, node-b's verdict).
    #[test]
    fn requests_node_a_does_not_host_are_refused() {
        let w = world();
        let foreign = Pki::new("evil.veil");
        let evil = foreign.workload("shop", "frontend", Duration::from_secs(600));
        let cases = [
            (
                // A valid backend SVID (stolen, or a stale placement), claimed as the backend.
                "claims a workload it does not host",
                (w.backend.clone(), BACKEND),
                AuthFailure::NotHosted,
            ),
            (
                // The frontend SVID claimed as the intruder's numeric identity.
                "identity mismatch",
                (w.frontend.clone(), INTRUDER),
                AuthFailure::WrongSpiffeId,
            ),
            (
                "workload of a foreign trust domain",
                (evil, FRONTEND),
                AuthFailure::WrongTrustDomain,
            ),
        ];
        for (case, (svid, claimed), want) in cases {
            let (ba, bb) = bindings(&w);
            let mut dir_a = w.dir.clone();
            dir_a.add_workload(NODE_A, svid.spiffe_id().clone(), claimed);
            let ca = ctx_in(&w, &dir_a, NODE_A, NODE_B, ba);
            let (_, req) = start(&w, &ca, (1, 0), claimed, svid);
            let (resp, outcome) = respond_on_b(&w, &req, &ctx(&w, NODE_B, NODE_A, bb));
            assert_eq!(outcome, Err(want), "{case}");
            assert_eq!(resp.result, Err(want), "{case}");
        }
    }

    #[test]
    fn a_responder_answering_with_a_workload_it_does_not_host_is_refused() {
        let mut w = world();
        // node-b answers for BACKEND with the intruder's SVID (hosted on node-a).
        w.on_b.0.insert(BACKEND, w.intruder.clone());
        let mut b_dir = w.dir.clone();
        b_dir.add_workload(NODE_B, w.intruder.spiffe_id().clone(), BACKEND);
        let (ba, bb) = bindings(&w);
        let ca = ctx(&w, NODE_A, NODE_B, ba);
        let cb = ctx_in(&w, &b_dir, NODE_B, NODE_A, bb);
        let (init, req) = start(&w, &ca, (1, 0), FRONTEND, w.frontend.clone());
        let (resp, outcome) = respond_on_b(&w, &req, &cb);
        assert!(outcome.is_ok());
        assert_eq!(init.finish(resp, &ca), Err(AuthFailure::NotHosted));
    }

    #[test]
    fn proofs_are_bound_to_the_session_nonce_and_identities() {
        let w = world();
        let (ba, bb) = bindings(&w);
        let ca = ctx(&w, NODE_A, NODE_B, ba);
        let cb = ctx(&w, NODE_B, NODE_A, bb);
        let (_, req) = start(&w, &ca, (1, 0), FRONTEND, w.frontend.clone());
        // Replayed onto another TLS session.
        let other = ctx(&w, NODE_B, NODE_A, SessionBinding::fixed([1; 32]));
        assert_eq!(respond_on_b(&w, &req, &other).1, Err(AuthFailure::BadProof));
        // Nonce, identities or signature altered.
        let tampers: [fn(&mut AuthRequest); 4] = [
            |r| r.nonce[0] ^= 1,
            |r| r.proof.signature[10] ^= 1,
            |r| r.proof.scheme = u16::from(SignatureScheme::ECDSA_NISTP384_SHA384),
            |r| r.proof.scheme = u16::from(SignatureScheme::RSA_PKCS1_SHA1),
        ];
        for (i, tamper) in tampers.iter().enumerate() {
            let mut r = req.clone();
            tamper(&mut r);
            assert_eq!(
                respond_on_b(&w, &r, &cb).1,
                Err(AuthFailure::BadProof),
                "tamper {i}"
            );
        }
        // The untouched request still verifies.
        assert!(respond_on_b(&w, &req, &cb).1.is_ok());

        // A response for another request (id) or to another initiator leaf is refused.
        let (init, req) = start(&w, &ca, (2, 2), FRONTEND, w.frontend.clone());
        let (mut resp, _) = respond_on_b(&w, &req, &cb);
        resp.id = 3;
        assert_eq!(init.finish(resp, &ca), Err(AuthFailure::ProtocolError));
        let (init, req) = start(&w, &ca, (4, 4), FRONTEND, w.frontend.clone());
        let mut forged = req.clone();
        forged.nonce = [9; 32];
        let (resp, _) = respond_on_b(&w, &forged, &cb);
        // (The responder refuses the forged nonce, so it sends a failure, never a proof.)
        assert_eq!(init.finish(resp, &ca), Err(AuthFailure::BadProof));
    }

    #[test]
    fn empty_chains_are_refused_on_both_sides_without_panicking() {
        let w = world();
        let (ca, cb) = fixed_pair(&w);
        let (init, mut req) = start(&w, &ca, (1, 1), FRONTEND, w.frontend.clone());
        req.chain.clear();
        let (resp, outcome) = respond_on_b(&w, &req, &cb);
        assert_eq!(outcome, Err(AuthFailure::InvalidSvid));
        assert_eq!(resp.result, Err(AuthFailure::InvalidSvid));
        let forged = AuthResponse {
            id: 1,
            result: Ok(AuthAccept {
                chain: Vec::new(),
                proof: Proof {
                    scheme: 0x0403,
                    signature: vec![1; 64],
                },
            }),
        };
        assert_eq!(init.finish(forged, &ca), Err(AuthFailure::InvalidSvid));
        assert_eq!(leaf_of(&[]), Err(AuthFailure::InvalidSvid));
    }

    #[test]
    fn responder_proof_over_a_different_nonce_is_refused() {
        let w = world();
        let (ca, cb) = fixed_pair(&w);
        let (init1, _) = start(&w, &ca, (1, 1), FRONTEND, w.frontend.clone());
        let (_, req2) = start(&w, &ca, (1, 2), FRONTEND, w.frontend.clone());
        // The answer to request 2 (same id, other nonce) does not complete request 1.
        let (resp2, ok) = respond_on_b(&w, &req2, &cb);
        assert!(ok.is_ok());
        assert_eq!(init1.finish(resp2, &ca), Err(AuthFailure::BadProof));
    }
}
