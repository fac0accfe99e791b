//! X.509-SVID and trust bundle parsing and validation (`veil_identity`) and the control
//! channel's node-chain check on top (`veil::auth::tls::check_node_chain`), against a dev CA
//! made once per process (leaf → intermediate → root). Its keys are random, so the dev CA's own
//! certificates are spliced in by flags. The first input byte picks the mode (bits 0-1) and the
//! flags (bits 2-3):
//! - 0: the rest is a concatenated DER chain (after the good leaf if bit 2, before the good
//!   intermediate if bit 3), validated against the dev bundle;
//! - 1: the rest is `(offset:u16be, xor:u8)*` flips applied to the good node-a chain;
//! - 2: the rest is a concatenated DER bundle (plus the dev root if bit 2); the good chain is
//!   validated against it;
//! - 3: the rest is a PKCS#8 private key (or, if bit 2, flips of the good key as in mode 1)
//!   paired with the good chain (`Svid::from_der`).
//!
//! Checked: nothing but the dev CA's own chain validates, and nothing can change the identity
//! it vouches for: any chain that validates names node-a and carries the issued leaf; a bundle
//! anchors the good chain only if it holds the dev root or intermediate; node-a's chain is never
//! accepted as node-b, and the control channel's node check agrees with SVID validation; the
//! issued key is accepted; malformed certificates, bundles and keys are errors, never panics.
//!
//! `VEIL_FUZZ_WRITE_SEEDS=<dir>` writes seed inputs made from the dev PKI of that process (the
//! good chain, every bad variant of `veil_certs_dev`, the bundle, the key) to `<dir>`.
#![no_main]

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use libfuzzer_sys::fuzz_target;
use veil_agent::auth::tls::{check_node_chain, ExpectedPeer};
use veil_certs_dev::{node_id, BadVariant, CaOptions, DevCa};
use veil_identity::{
    split_der_certs, validate_x509_svid, BundleSet, Bundles, CertificateDer, SpiffeId, Svid,
    SvidPrivateKey, TrustDomain,
};

struct Pki {
    td: TrustDomain,
    anchors: Vec<CertificateDer<'static>>,
    bundles: BundleSet,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    id: SpiffeId,
    other: SpiffeId,
    now: SystemTime,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let td = TrustDomain::new("lab.veil").unwrap();
        let opts = CaOptions {
            with_intermediate: true,
            ..CaOptions::default()
        };
        let ca = DevCa::with_options(td.clone(), opts).expect("dev ca");
        let svid = ca
            .issue_node_svid("node-a", Duration::from_secs(3600))
            .expect("node svid");
        let bundles = BundleSet::new();
        bundles
            .set_roots(td.clone(), ca.bundle())
            .expect("dev bundle");
        let mut anchors = ca.bundle();
        anchors.extend(ca.intermediate().cloned());
        let p = Pki {
            id: svid.spiffe_id().clone(),
            other: node_id(&td, "node-b").unwrap(),
            chain: svid.cert_chain().to_vec(),
            key: svid.private_key().pkcs8_der().to_vec(),
            td,
            anchors,
            bundles,
            now: SystemTime::now() + Duration::from_secs(60),
        };
        if let Some(dir) = std::env::var_os("VEIL_FUZZ_WRITE_SEEDS") {
            write_seeds(&ca, &p, std::path::Path::new(&dir));
        }
        p
    })
}

fn concat(chain: &[CertificateDer<'_>]) -> Vec<u8> {
    chain.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

fn write_seeds(ca: &DevCa, p: &Pki, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let put = |name: &str, mode: u8, body: &[u8]| {
        let mut b = vec![mode];
        b.extend_from_slice(body);
        std::fs::write(dir.join(name), b).unwrap();
    };
    put("good-chain", 0, &concat(&p.chain));
    put("good-leaf", 0, p.chain[0].as_ref());
    put("splice-good-leaf-and-intermediate", 4 | 8, &[]);
    put(
        "splice-good-leaf-before-other-ca-intermediate",
        4,
        p.chain[1].as_ref(),
    );
    put("flip-none", 1, &[]);
    put("flip-leaf-byte-200", 1, &[0, 200, 0x01]);
    put("bundle", 2, &concat(&ca.bundle()));
    put("bundle-root-and-intermediate", 2, &concat(&p.anchors));
    put("bundle-splice-dev-root", 2 | 4, &[]);
    put("key", 3, &p.key);
    put("key-flip-none", 3 | 4, &[]);
    put("key-flip-byte-40", 3 | 4, &[0, 40, 0x80]);
    for v in BadVariant::ALL {
        if let Ok(c) = ca.issue_bad(v, &p.id) {
            put(&format!("bad-{v:?}"), 0, &concat(&c.chain));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let p = pki();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (splice_a, splice_b) = (mode & 4 != 0, mode & 8 != 0);
    match mode % 4 {
        0 => {
            let Ok(mut chain) = split_der_certs(&p.td, rest) else {
                return;
            };
            if splice_a {
                chain.insert(0, p.chain[0].clone());
            }
            if splice_b {
                chain.extend(p.chain.get(1).cloned());
            }
            check_chain(p, &chain);
        }
        1 => {
            let bytes = flipped(&concat(&p.chain), rest);
            if let Ok(chain) = split_der_certs(&p.td, &bytes) {
                check_chain(p, &chain);
            }
        }
        2 => {
            let Ok(mut roots) = split_der_certs(&p.td, rest) else {
                return;
            };
            if splice_a {
                roots.push(p.anchors[0].clone());
            }
            let mut bundles = Bundles::new();
            if bundles.insert(p.td.clone(), roots.clone()).is_err() {
                return;
            }
            if validate_x509_svid(&p.chain, &bundles, p.now).is_ok() {
                assert!(
                    roots.iter().any(|r| p.anchors.contains(r)),
                    "a bundle without the dev CA anchors its chain"
                );
            }
        }
        _ => {
            let der = if splice_a {
                flipped(&p.key, rest)
            } else {
                rest.to_vec()
            };
            let is_original = der == p.key;
            let key = SvidPrivateKey::from_pkcs8_der(der);
            match Svid::from_der(p.chain.clone(), key) {
                Ok(svid) => assert_eq!(svid.spiffe_id(), &p.id),
                Err(e) => assert!(!is_original, "the issued key refused: {e}"),
            }
        }
    }
});

/// `bytes` with `(offset:u16be, xor:u8)*` flips applied.
fn flipped(bytes: &[u8], flips: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for f in flips.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([f[0], f[1]])) % out.len();
        out[at] ^= f[2];
    }
    out
}

fn check_chain(p: &Pki, chain: &[CertificateDer<'static>]) {
    let validated = validate_x509_svid(chain, &p.bundles, p.now);
    if let Ok(v) = &validated {
        assert_eq!(v.spiffe_id, p.id, "a chain validated with another identity");
        assert_eq!(v.leaf, p.chain[0], "a chain validated with another leaf");
        assert!(v.not_before <= p.now && p.now <= v.not_after);
        assert!(v.valid_until <= v.not_after);
    }
    let Some((leaf, rest)) = chain.split_first() else {
        return;
    };
    let as_peer = |peer: ExpectedPeer| check_node_chain(leaf, rest, &p.bundles, &peer, p.now);
    assert_eq!(
        as_peer(ExpectedPeer::Node(p.id.clone())).is_ok(),
        validated.is_ok(),
        "node check and validation disagree"
    );
    let any = as_peer(ExpectedPeer::AnyNodeOf(p.td.clone()));
    assert_eq!(any.is_ok(), validated.is_ok());
    assert!(
        as_peer(ExpectedPeer::Node(p.other.clone())).is_err(),
        "node-a's chain accepted as node-b"
    );
}
