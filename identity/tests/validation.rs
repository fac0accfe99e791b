//! Validation table: every bad variant the dev PKI can make is rejected with its own error, and
//! the good ones pass, for root-only and root+intermediate CAs. Path rules (name constraints,
//! pathLenConstraint, CA bit of issuers, unknown critical extensions, extended key usage) come
//! from webpki; the SPIFFE and trust-domain rules from veil on top.

use std::time::{Duration, SystemTime};

use veil_certs_dev::{
    unknown_extension, uri_name_constraints_excluding, workload_id, BadVariant, CaOptions, DevCa,
    ExtraCa, LeafSpec,
};
use veil_identity::{
    validate_x509_svid, BundleSet, Bundles, CertificateDer, IdError, SpiffeId, Svid, SvidError,
    TrustDomain,
};

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn dev_ca(name: &str, with_intermediate: bool) -> DevCa {
    ca_with(
        name,
        CaOptions {
            with_intermediate,
            ..CaOptions::default()
        },
    )
}

fn ca_with(name: &str, options: CaOptions) -> DevCa {
    DevCa::with_options(td(name), options).unwrap()
}

/// A CA of lab.veil, the bundles of its root, and frontend's SPIFFE ID in its trust domain.
fn lab_veil_frontend(with_intermediate: bool) -> (DevCa, Bundles, SpiffeId) {
    let ca = dev_ca("lab.veil", with_intermediate);
    let bundles = bundles_of(&[&ca]);
    let id = workload_id(ca.trust_domain(), "shop", "frontend").unwrap();
    (ca, bundles, id)
}

fn bundles_of(cas: &[&DevCa]) -> Bundles {
    let mut b = Bundles::new();
    for c in cas {
        let mut roots: Vec<CertificateDer<'static>> = b
            .get(c.trust_domain())
            .map(|r| r.to_vec())
            .unwrap_or_default();
        roots.extend(c.bundle());
        b.insert(c.trust_domain().clone(), roots).unwrap();
    }
    b
}

fn x509_subject(der: &CertificateDer<'_>) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.subject().as_raw().to_vec()
}

/// The refusal reason: the variant and, where it has one, the certificate index (payloads such
/// as timestamps differ per run and are left out).
fn reason(e: &SvidError) -> (std::mem::Discriminant<SvidError>, Option<usize>) {
    let index = match e {
        SvidError::Malformed { index, .. }
        | SvidError::UnsupportedCertificate { index, .. }
        | SvidError::IntermediateCannotSign { index }
        | SvidError::IntermediateUnknownCriticalExtension { index }
        | SvidError::IntermediateForeignTrustDomain { index, .. } => Some(*index),
        _ => None,
    };
    (std::mem::discriminant(e), index)
}

fn same_reason(got: &SvidError, want: &SvidError) -> bool {
    reason(got) == reason(want)
}

#[test]
fn every_bad_variant_is_rejected_with_its_own_error() {
    for with_intermediate in [false, true] {
        let (ca, bundles, id) = lab_veil_frontend(with_intermediate);
        let epoch = SystemTime::UNIX_EPOCH;
        let table: Vec<(BadVariant, SvidError)> = vec![
            (BadVariant::Expired, SvidError::Expired { not_after: epoch }),
            (
                BadVariant::NotYetValid,
                SvidError::NotYetValid { not_before: epoch },
            ),
            // With an intermediate, the foreign intermediate's SPIFFE ID is caught first.
            (
                BadVariant::WrongTrustDomain,
                if with_intermediate {
                    SvidError::IntermediateForeignTrustDomain {
                        index: 1,
                        expected: td("x"),
                        found: String::new(),
                    }
                } else {
                    SvidError::UntrustedRoot(td("x"))
                },
            ),
            (BadVariant::TwoUriSans, SvidError::MultipleUriSans(2)),
            (BadVariant::NoUriSan, SvidError::NoUriSan),
            (BadVariant::CaLeaf, SvidError::LeafIsCa),
            (BadVariant::KeyCertSignLeaf, SvidError::LeafKeyCertSign),
            (
                BadVariant::NoDigitalSignature,
                SvidError::LeafMissingDigitalSignature,
            ),
            (BadVariant::TamperedSignature, SvidError::BadSignature),
            (BadVariant::NoClientAuth, SvidError::ExtendedKeyUsageNotMtls),
            (
                BadVariant::LeafUnknownCriticalExtension,
                SvidError::LeafUnknownCriticalExtension,
            ),
            // The extra intermediate sits right above the leaf (index 1) in both shapes.
            (
                BadVariant::IntermediateUnknownCriticalExtension,
                SvidError::IntermediateUnknownCriticalExtension { index: 1 },
            ),
            (BadVariant::IntermediateNotCa, SvidError::IntermediateNotCa),
            (
                BadVariant::IntermediateCannotSign,
                SvidError::IntermediateCannotSign { index: 1 },
            ),
            (
                BadVariant::NameConstraintsExcludeLeaf,
                SvidError::NameConstraintViolation,
            ),
            (
                BadVariant::PathLenExceeded,
                SvidError::PathLenConstraintExceeded,
            ),
        ];
        assert_eq!(
            table.len(),
            BadVariant::ALL.len(),
            "every variant is in the table"
        );
        let mut seen = std::collections::HashSet::new();
        for (variant, want) in &table {
            let bad = ca.issue_bad(*variant, &id).unwrap();
            let got = validate_x509_svid(&bad.chain, &bundles, SystemTime::now()).expect_err(
                &format!("{variant:?} (intermediate={with_intermediate}) must fail"),
            );
            assert!(
                same_reason(&got, want),
                "{variant:?} (intermediate={with_intermediate}): got {got:?}, want {want:?}"
            );
            assert!(seen.insert(reason(&got)), "{variant:?} shares an error");
        }
        // The expired/not-yet-valid errors carry the leaf's own bounds.
        let expired = ca.issue_bad(BadVariant::Expired, &id).unwrap();
        match validate_x509_svid(&expired.chain, &bundles, SystemTime::now()) {
            Err(SvidError::Expired { not_after }) => assert!(not_after < SystemTime::now()),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn good_svids_pass_and_report_their_facts() {
    for with_intermediate in [false, true] {
        let ca = dev_ca("lab.veil", with_intermediate);
        let bundles = bundles_of(&[&ca]);
        let node = ca
            .issue_node_svid("node-a", Duration::from_secs(300))
            .unwrap();
        let wl = ca
            .issue_workload_svid("shop", "backend", Duration::from_secs(300))
            .unwrap();
        for svid in [&node, &wl] {
            let v = validate_x509_svid(svid.cert_chain(), &bundles, SystemTime::now()).unwrap();
            assert_eq!(&v.spiffe_id, svid.spiffe_id());
            assert_eq!(v.serial, svid.serial());
            assert_eq!(v.not_after, svid.not_after());
            assert_eq!(&v.leaf, svid.leaf());
        }
        // Validity is judged at the given time, not the wall clock.
        let later = node.not_after() + Duration::from_secs(1);
        assert!(matches!(
            validate_x509_svid(node.cert_chain(), &bundles, later),
            Err(SvidError::Expired { .. })
        ));
        let earlier = node.not_before() - Duration::from_secs(1);
        assert!(matches!(
            validate_x509_svid(node.cert_chain(), &bundles, earlier),
            Err(SvidError::NotYetValid { .. })
        ));
        // The last instant of validity is still valid (notAfter is inclusive).
        assert!(validate_x509_svid(node.cert_chain(), &bundles, node.not_after()).is_ok());
    }
}

#[test]
fn chain_must_end_in_a_root_of_the_svids_own_trust_domain() {
    let lab = dev_ca("lab.veil", false);
    let other = dev_ca("other.veil", false);
    let other_svid = other
        .issue_workload_svid("ns", "sa", Duration::from_secs(60))
        .unwrap();

    // No bundle for other.veil: refused, even though lab.veil's bundle exists.
    let only_lab = bundles_of(&[&lab]);
    assert!(matches!(
        validate_x509_svid(other_svid.cert_chain(), &only_lab, SystemTime::now()),
        Err(SvidError::NoBundle(t)) if t == td("other.veil")
    ));

    // other.veil's root filed under lab.veil does not make it a lab.veil root, and a lab.veil
    // id signed by other.veil's CA is refused although other.veil's own bundle is present.
    let mut mixed = bundles_of(&[&lab, &other]);
    let id = workload_id(&td("lab.veil"), "shop", "frontend").unwrap();
    let forged = other.issue_chain(&veil_certs_dev::LeafSpec::svid(
        &id,
        SystemTime::now(),
        Duration::from_secs(60),
    ));
    let forged = forged.unwrap();
    assert!(matches!(
        validate_x509_svid(&forged.chain, &mixed, SystemTime::now()),
        Err(SvidError::UntrustedRoot(t)) if t == td("lab.veil")
    ));
    mixed.remove(&td("other.veil"));
    assert!(matches!(
        validate_x509_svid(other_svid.cert_chain(), &mixed, SystemTime::now()),
        Err(SvidError::NoBundle(_))
    ));
}

#[test]
fn intermediate_problems_each_have_their_error() {
    let ca = dev_ca("lab.veil", true);
    let bundles = bundles_of(&[&ca]);
    let svid = ca
        .issue_workload_svid("shop", "frontend", Duration::from_secs(60))
        .unwrap();

    // Intermediate left out: the leaf's issuer is not a root.
    assert!(matches!(
        validate_x509_svid(&svid.cert_chain()[..1], &bundles, SystemTime::now()),
        Err(SvidError::UntrustedRoot(_))
    ));

    // A leaf posing as intermediate: refused as a non-CA after the leaf (before the path search,
    // where it would not reach a root either).
    let other = ca
        .issue_workload_svid("shop", "backend", Duration::from_secs(60))
        .unwrap();
    let chain = vec![svid.leaf().clone(), other.leaf().clone()];
    assert!(matches!(
        validate_x509_svid(&chain, &bundles, SystemTime::now()),
        Err(SvidError::IntermediateNotCa)
    ));

    // The root appended to the chain is fine (anchored in the chain itself).
    let mut with_root = svid.cert_chain().to_vec();
    with_root.push(ca.root().clone());
    assert!(validate_x509_svid(&with_root, &bundles, SystemTime::now()).is_ok());

    // An intermediate from another trust domain's CA is refused by name even if its root is in
    // the bundle of our trust domain.
    let foreign = dev_ca("other.veil", true);
    let id = workload_id(&td("lab.veil"), "shop", "frontend").unwrap();
    let forged = foreign
        .issue_chain(&veil_certs_dev::LeafSpec::svid(
            &id,
            SystemTime::now(),
            Duration::from_secs(60),
        ))
        .unwrap();
    let mut poisoned = bundles_of(&[&ca]);
    let mut roots = poisoned.get(&td("lab.veil")).unwrap().to_vec();
    roots.push(foreign.root().clone());
    poisoned.insert(td("lab.veil"), roots).unwrap();
    assert!(matches!(
        validate_x509_svid(&forged.chain, &poisoned, SystemTime::now()),
        Err(SvidError::IntermediateForeignTrustDomain { index: 1, .. })
    ));
}

/// The bad chains differ from good ones only in the one thing named: the same shapes without
/// it validate, so each refusal in the table is about that thing and not about the extra
/// intermediates.
#[test]
fn constraint_shapes_pass_without_the_fault() {
    for with_intermediate in [false, true] {
        let (ca, bundles, id) = lab_veil_frontend(with_intermediate);
        let spec = LeafSpec::svid(&id, SystemTime::now(), Duration::from_secs(60));
        let good = |extra: &[ExtraCa]| {
            let chain = ca.issue_chain_under(&spec, extra).unwrap().chain;
            validate_x509_svid(&chain, &bundles, SystemTime::now())
        };
        let path_len = |len| ExtraCa {
            path_len: Some(len),
            ..ExtraCa::default()
        };
        // pathLenConstraint 0 directly above the leaf, 1 above one more intermediate.
        good(&[path_len(0)]).unwrap();
        good(&[path_len(1), ExtraCa::default()]).unwrap();
        // An unknown extension is fine when it is not critical.
        let non_critical = ExtraCa {
            extensions: vec![unknown_extension(false)],
            ..ExtraCa::default()
        };
        good(&[non_critical]).unwrap();
        // Extra intermediates presented out of order still form a path.
        let mut chain = ca
            .issue_chain_under(&spec, &[ExtraCa::default(), ExtraCa::default()])
            .unwrap()
            .chain;
        chain[1..].reverse();
        let v = validate_x509_svid(&chain, &bundles, SystemTime::now()).unwrap();
        assert_eq!(v.spiffe_id, id);
    }
}

/// webpki does not match URI name constraints: any URI subtree refuses every URI SAN below it
/// (fail closed), even one that by RFC 5280 the constraint would allow. X509-SVID §4.2
/// anticipates this ("libraries which don't support them will reject such certificates").
#[test]
fn uri_name_constraints_refuse_every_uri_san() {
    let ca = dev_ca("lab.veil", false);
    let id = workload_id(ca.trust_domain(), "shop", "frontend").unwrap();
    let elsewhere = ExtraCa {
        extensions: vec![uri_name_constraints_excluding(&["other.veil"])],
        ..ExtraCa::default()
    };
    let chain = ca
        .issue_chain_under(
            &LeafSpec::svid(&id, SystemTime::now(), Duration::from_secs(60)),
            &[elsewhere],
        )
        .unwrap()
        .chain;
    assert!(matches!(
        validate_x509_svid(&chain, &bundles_of(&[&ca]), SystemTime::now()),
        Err(SvidError::NameConstraintViolation)
    ));
}

/// webpki does not apply a trust anchor's basicConstraints; veil applies the root's
/// pathLenConstraint on top.
#[test]
fn root_path_len_bounds_the_intermediates() {
    for (root_path_len, is_ok) in [(Some(0), false), (Some(1), true), (None, true)] {
        let ca = ca_with(
            "lab.veil",
            CaOptions {
                with_intermediate: true,
                root_path_len,
                ..CaOptions::default()
            },
        );
        let svid = ca
            .issue_workload_svid("shop", "frontend", Duration::from_secs(60))
            .unwrap();
        let got = validate_x509_svid(svid.cert_chain(), &bundles_of(&[&ca]), SystemTime::now());
        if is_ok {
            assert!(got.is_ok(), "root pathLen {root_path_len:?}: {got:?}");
        } else {
            assert!(
                matches!(got, Err(SvidError::PathLenConstraintExceeded)),
                "root pathLen {root_path_len:?}: {got:?}"
            );
        }
    }
}

/// webpki never looks at a trust anchor's dates; veil anchors only in roots inside their
/// validity window and names the root's bound when only a stale root would anchor.
#[test]
fn root_outside_its_validity_is_refused() {
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    // Root valid from now - 1h (the dev CA backdate) to now + 1 day.
    let ca = ca_with(
        "lab.veil",
        CaOptions {
            validity: day,
            ..CaOptions::default()
        },
    );
    let bundles = bundles_of(&[&ca]);
    let id = workload_id(ca.trust_domain(), "shop", "frontend").unwrap();
    // A leaf that outlives its root on both ends.
    let chain = ca
        .issue_chain(&LeafSpec::svid(&id, now - day, 10 * day))
        .unwrap()
        .chain;
    assert!(validate_x509_svid(&chain, &bundles, now).is_ok());
    match validate_x509_svid(&chain, &bundles, now + 2 * day) {
        Err(SvidError::IssuerExpired { not_after }) => {
            assert!(not_after > now && not_after < now + 2 * day)
        }
        other => panic!("{other:?}"),
    }
    match validate_x509_svid(&chain, &bundles, now - Duration::from_secs(2 * 3600)) {
        Err(SvidError::IssuerNotYetValid { not_before }) => assert!(not_before < now),
        other => panic!("{other:?}"),
    }
    // A valid root with the same name but another key (a renewed root) anchors nothing the
    // expired one signed, and the refusal still names the expired root.
    let renewed = DevCa::new(td("lab.veil")).unwrap();
    assert_eq!(
        x509_subject(renewed.root()),
        x509_subject(ca.root()),
        "same root name"
    );
    let both = bundles_of(&[&ca, &renewed]);
    assert!(matches!(
        validate_x509_svid(&chain, &both, now + 2 * day),
        Err(SvidError::IssuerExpired { .. })
    ));
}

#[test]
fn ca_rotation_overlap_then_revoke() {
    let old = dev_ca("lab.veil", false);
    let new = old.rotate().unwrap();
    let from_old = old
        .issue_node_svid("node-a", Duration::from_secs(60))
        .unwrap();
    let from_new = new
        .issue_node_svid("node-a", Duration::from_secs(60))
        .unwrap();

    let live = BundleSet::new();
    live.set_roots(td("lab.veil"), old.bundle()).unwrap();
    assert!(from_old.validate(&live, SystemTime::now()).is_ok());
    assert!(from_new.validate(&live, SystemTime::now()).is_err());

    // Overlap: both roots.
    live.set_roots(td("lab.veil"), [old.bundle(), new.bundle()].concat())
        .unwrap();
    assert!(from_old.validate(&live, SystemTime::now()).is_ok());
    assert!(from_new.validate(&live, SystemTime::now()).is_ok());

    // Revoke the old root: its SVIDs are refused, the new ones stay good. A snapshot loaded
    // before the change keeps its view.
    let before = live.load();
    live.set_roots(td("lab.veil"), new.bundle()).unwrap();
    assert!(matches!(
        from_old.validate(&live, SystemTime::now()),
        Err(SvidError::UntrustedRoot(_))
    ));
    assert!(from_new.validate(&live, SystemTime::now()).is_ok());
    assert!(from_old.validate(&before, SystemTime::now()).is_ok());

    // Removing the trust domain refuses everything with NoBundle.
    let clone = live.clone();
    assert!(clone.remove(&td("lab.veil")));
    assert!(matches!(
        from_new.validate(&live, SystemTime::now()),
        Err(SvidError::NoBundle(_))
    ));
}

#[test]
fn svid_from_der_checks_san_and_key() {
    let ca = dev_ca("lab.veil", false);
    let id = workload_id(ca.trust_domain(), "shop", "frontend").unwrap();
    let a = ca.issue(&id, Duration::from_secs(60)).unwrap();
    let b = ca.issue(&id, Duration::from_secs(60)).unwrap();
    assert_ne!(a.serial(), b.serial());
    assert!(matches!(
        Svid::from_der(a.cert_chain().to_vec(), b.private_key().clone()),
        Err(SvidError::KeyMismatch)
    ));
    let two = ca.issue_bad(BadVariant::TwoUriSans, &id).unwrap();
    assert!(matches!(
        two.into_svid(),
        Err(veil_certs_dev::Error::Svid(SvidError::MultipleUriSans(2)))
    ));
    let trust_domain_id = SpiffeId::for_trust_domain(ca.trust_domain());
    let spec = veil_certs_dev::LeafSpec::svid(
        &trust_domain_id,
        SystemTime::now(),
        Duration::from_secs(60),
    );
    assert!(matches!(
        ca.issue_chain(&spec).unwrap().into_svid(),
        Err(veil_certs_dev::Error::Svid(SvidError::LeafIdWithoutPath(_)))
    ));
    assert!(format!("{a:?}").contains("redacted"));
}

#[test]
fn bundles_reject_non_ca_roots() {
    let ca = dev_ca("lab.veil", false);
    let leaf = ca.issue_node_svid("n", Duration::from_secs(60)).unwrap();
    let set = BundleSet::new();
    assert!(set
        .set_roots(td("lab.veil"), vec![leaf.leaf().clone()])
        .is_err());
    assert!(set.set_roots(td("lab.veil"), vec![]).is_err());
    assert!(set.load().is_empty());
}

#[test]
fn split_der_certs_round_trips_concatenation() {
    let ca = dev_ca("lab.veil", true);
    let svid = ca.issue_node_svid("n", Duration::from_secs(60)).unwrap();
    let joined: Vec<u8> = svid.cert_chain().iter().flat_map(|c| c.to_vec()).collect();
    let split = veil_identity::split_der_certs(ca.trust_domain(), &joined).unwrap();
    assert_eq!(split, svid.cert_chain());
    assert!(
        veil_identity::split_der_certs(ca.trust_domain(), &joined[..joined.len() - 1]).is_err()
    );
}

/// Scenario 14's forms that are not a [`BadVariant`], as certificates through the validator: a
/// NUL inside the URI SAN (a C-string reader would see the victim's ID), IDs with the root path
/// (none, or "/"), and a substituted leaf (another workload's leaf where an intermediate
/// belongs, so the chain carries two identities): each refused with its own error.
#[test]
fn nul_in_the_san_root_path_ids_and_a_substituted_leaf_are_rejected() {
    for with_intermediate in [false, true] {
        let (ca, bundles, id) = lab_veil_frontend(with_intermediate);
        let now = SystemTime::now();
        let issue = |uri: &str| {
            let mut spec = LeafSpec::svid(
                &id,
                now - Duration::from_secs(60),
                Duration::from_secs(3600),
            );
            spec.uris = vec![uri.to_string()];
            ca.issue_chain(&spec).unwrap().chain
        };
        let check = |what: &str, chain: &[CertificateDer<'static>], ok: fn(&SvidError) -> bool| {
            let got = validate_x509_svid(chain, &bundles, now).expect_err(&format!(
                "{what} (intermediate={with_intermediate}) must fail"
            ));
            assert!(
                ok(&got),
                "{what} (intermediate={with_intermediate}): {got:?}"
            );
        };
        check("NUL in the SAN", &issue(&format!("{id}\0.evil")), |e| {
            matches!(e, SvidError::InvalidSpiffeId(IdError::BadPathChar('\0')))
        });
        check("no path", &issue("spiffe://lab.veil"), |e| {
            matches!(e, SvidError::LeafIdWithoutPath(_))
        });
        check("root path", &issue("spiffe://lab.veil/"), |e| {
            matches!(e, SvidError::InvalidSpiffeId(IdError::TrailingSlash))
        });
        // backend's leaf in front of frontend's whole chain: two end-entity certificates.
        let backend = workload_id(ca.trust_domain(), "shop", "backend").unwrap();
        let mut substituted = ca
            .issue(&backend, Duration::from_secs(3600))
            .unwrap()
            .cert_chain()
            .to_vec();
        substituted.truncate(1);
        substituted.extend(issue(&id.to_string()));
        check("a substituted leaf", &substituted, |e| {
            matches!(e, SvidError::IntermediateNotCa)
        });
        // The same chain without the substitution passes: the forms above are the only fault.
        validate_x509_svid(&issue(&id.to_string()), &bundles, now).expect("the good chain");
    }
}

/// Scenario 12, the spelling half: a trust domain written another way (case, a port, user info,
/// percent-encoding, the scheme's case or shape, the path's format) is not the trust domain,
/// whichever CA in the bundle set signed the chain: this trust domain's own or a federated
/// one's. Both CAs sign every spelling; each is refused as an invalid SPIFFE ID before any
/// bundle is chosen, so no spelling can pick lab.veil's roots for other.veil's CA or pass as
/// lab.veil.
#[test]
fn a_trust_domain_spelled_another_way_is_refused_whichever_ca_signed_it() {
    let lab = dev_ca("lab.veil", true);
    let federated = dev_ca("other.veil", false);
    let bundles = bundles_of(&[&lab, &federated]);
    let now = SystemTime::now();
    let chain = |ca: &DevCa, uri: &str| {
        let mut spec = LeafSpec::svid(
            &workload_id(&td("lab.veil"), "shop", "frontend").unwrap(),
            now,
            Duration::from_secs(60),
        );
        spec.uris = vec![uri.to_string()];
        ca.issue_chain(&spec).unwrap().chain
    };
    // The control: the canonical spelling from lab.veil's own CA passes.
    let canonical = "spiffe://lab.veil/ns/shop/sa/frontend";
    let ok = validate_x509_svid(&chain(&lab, canonical), &bundles, now).unwrap();
    assert_eq!(ok.spiffe_id.to_string(), canonical);
    for uri in [
        "spiffe://LAB.veil/ns/shop/sa/frontend",
        "spiffe://Lab.Veil/ns/shop/sa/frontend",
        "spiffe://lab.veil:443/ns/shop/sa/frontend",
        "spiffe://frontend@lab.veil/ns/shop/sa/frontend",
        "spiffe://lab%2Eveil/ns/shop/sa/frontend",
        "spiffe://lab.veil%00/ns/shop/sa/frontend",
        "SPIFFE://lab.veil/ns/shop/sa/frontend",
        "spiffe:lab.veil/ns/shop/sa/frontend",
        "spiffe:///lab.veil/ns/shop/sa/frontend",
        "https://lab.veil/ns/shop/sa/frontend",
        "spiffe://lab.veil/ns/shop/sa/frontend/",
        "spiffe://lab.veil//ns/shop/sa/frontend",
        "spiffe://lab.veil/ns/shop/sa/./frontend",
        "spiffe://lab.veil/ns/shop/sa/frontend?x=1",
        "spiffe://lab.veil/ns/shop/sa/frontend#x",
    ] {
        for (ca, signer) in [(&lab, "lab.veil"), (&federated, "other.veil")] {
            match validate_x509_svid(&chain(ca, uri), &bundles, now) {
                Err(SvidError::InvalidSpiffeId(_)) => {}
                other => panic!("{uri} signed by {signer}'s CA: {other:?}"),
            }
        }
    }
    // A trailing dot is a valid trust domain name of its own (SPIFFE's characters allow it, as
    // go-spiffe does), not lab.veil: no bundle of that name, so refused whoever signed it.
    let dotted = "spiffe://lab.veil./ns/shop/sa/frontend";
    for ca in [&lab, &federated] {
        assert!(matches!(
            validate_x509_svid(&chain(ca, dotted), &bundles, now),
            Err(SvidError::NoBundle(t)) if t.to_string() == "lab.veil."
        ));
    }
}
