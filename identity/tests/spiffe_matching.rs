//! Scenario 26 (tests/README.md): principal-matching edge cases. SPIFFE IDs with `.`, `..`, `*`,
//! percent-encodings (`%2F`, `%2f`, `%41`, `%2e`), a trailing `/`, `//`, Unicode (look-alikes
//! included) and upper case, as a parsed ID and as the URI SAN of an SVID. Pass criterion (NI):
//! exact match only. A malformed ID is refused at parse time with the error of the rule it
//! breaks; a well-formed look-alike parses as itself (never normalised) and never equals, hashes
//! like, or belongs to the trust domain of the ID it imitates.
//!
//! veil's policy does not name SPIFFE IDs (it selects by labels; namespace and service account
//! enter the identity key through `SpiffeId::from_segments`), so the principals a check compares
//! are the ones these tables parse: workload handshakes compare `ValidatedSvid::spiffe_id`
//! against the directory's `SpiffeId`s.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use veil_certs_dev::{DevCa, LeafSpec};
use veil_identity::{
    validate_x509_svid, Bundles, IdError, SpiffeId, SvidError, TrustDomain, MAX_SPIFFE_ID_LEN,
};

/// The principal every look-alike below imitates.
const REFERENCE: &str = "spiffe://lab.veil/ns/shop/sa/frontend";

/// Malformed IDs and the error each must be refused with (one row a line: a table).
#[rustfmt::skip]
fn malformed() -> Vec<(&'static str, IdError)> {
    use IdError::*;
    vec![
        // Dot segments: a path normaliser would turn these into REFERENCE.
        ("spiffe://lab.veil/ns/shop/sa/./frontend", DotSegment),
        ("spiffe://lab.veil/ns/shop/sa/x/../frontend", DotSegment),
        ("spiffe://lab.veil/ns/shop/sa/frontend/.", DotSegment),
        ("spiffe://lab.veil/./ns/shop/sa/frontend", DotSegment),
        ("spiffe://lab.veil/ns/shop/sa/frontend/..", DotSegment),
        // Wildcards are not patterns anywhere in veil; as characters they are refused.
        ("spiffe://lab.veil/ns/shop/sa/*", BadPathChar('*')),
        ("spiffe://lab.veil/ns/*/sa/frontend", BadPathChar('*')),
        ("spiffe://lab.veil/*", BadPathChar('*')),
        ("spiffe://*.veil/ns/shop/sa/frontend", BadTrustDomainChar('*')),
        ("spiffe://*/ns/shop/sa/frontend", BadTrustDomainChar('*')),
        // Percent-encodings: a decoder would make `%2F` a separator, `%41` an `A`, `%2e` a dot.
        ("spiffe://lab.veil/ns/shop/sa%2Ffrontend", BadPathChar('%')),
        ("spiffe://lab.veil/ns/shop/sa%2ffrontend", BadPathChar('%')),
        ("spiffe://lab.veil/ns/shop/sa/fr%6Fntend", BadPathChar('%')),
        ("spiffe://lab.veil/ns/shop/sa/%2e/frontend", BadPathChar('%')),
        ("spiffe://lab.veil/ns/shop/sa/%41", BadPathChar('%')),
        ("spiffe://lab%2Eveil/ns/shop/sa/frontend", BadTrustDomainChar('%')),
        // Trailing and doubled slashes.
        ("spiffe://lab.veil/ns/shop/sa/frontend/", TrailingSlash),
        ("spiffe://lab.veil/ns/shop/sa/frontend//", TrailingSlash),
        ("spiffe://lab.veil/ns/shop//sa/frontend", EmptySegment),
        ("spiffe://lab.veil//ns/shop/sa/frontend", EmptySegment),
        ("spiffe://lab.veil/", TrailingSlash),
        // Unicode, look-alikes first: Cyrillic а (U+0430), fullwidth ｆ (U+FF46), a combining
        // acute (U+0301), a zero-width space (U+200B), dotless ı (U+0131), Kelvin sign K (U+212A).
        ("spiffe://lab.veil/ns/shop/sa/front\u{0435}nd", BadPathChar('\u{0435}')),
        ("spiffe://lab.veil/ns/sh\u{043e}p/sa/frontend", BadPathChar('\u{043e}')),
        ("spiffe://lab.veil/ns/shop/sa/\u{ff46}rontend", BadPathChar('\u{ff46}')),
        ("spiffe://lab.veil/ns/shop/sa/fronte\u{301}nd", BadPathChar('\u{301}')),
        ("spiffe://lab.veil/ns/shop/sa/frontend\u{200b}", BadPathChar('\u{200b}')),
        ("spiffe://lab.veil/ns/shop/sa/fronte\u{0131}nd", BadPathChar('\u{0131}')),
        ("spiffe://l\u{0430}b.veil/ns/shop/sa/frontend", BadTrustDomainChar('\u{0430}')),
        ("spiffe://lab.v\u{0435}il/ns/shop/sa/frontend", BadTrustDomainChar('\u{0435}')),
        ("spiffe://lab.veil\u{3002}x/ns/shop/sa/frontend", BadTrustDomainChar('\u{3002}')),
        ("spiffe://\u{212a}.veil/ns/shop/sa/frontend", BadTrustDomainChar('\u{212a}')),
        // Upper case where the spec wants lower case: scheme and trust domain.
        ("SPIFFE://lab.veil/ns/shop/sa/frontend", WrongScheme),
        ("Spiffe://lab.veil/ns/shop/sa/frontend", WrongScheme),
        ("spiffe://LAB.veil/ns/shop/sa/frontend", UppercaseTrustDomain('L')),
        ("spiffe://lab.Veil/ns/shop/sa/frontend", UppercaseTrustDomain('V')),
        // Other URL parts a lenient parser would drop on the way to a match.
        ("spiffe://lab.veil/ns/shop/sa/frontend?x", Query),
        ("spiffe://lab.veil/ns/shop/sa/frontend#x", Fragment),
        ("spiffe://lab.veil:443/ns/shop/sa/frontend", Port),
        ("spiffe://x@lab.veil/ns/shop/sa/frontend", Userinfo),
        ("spiffe://lab.veil/ns/shop/sa/front end", BadPathChar(' ')),
        ("spiffe://lab.veil/ns/shop/sa/frontend\n", BadPathChar('\n')),
        ("spiffe://lab.veil/ns/shop/sa/frontend\0", BadPathChar('\0')),
        ("spiffe://lab.veil/ns/shop/sa/front\\end", BadPathChar('\\')),
        (" spiffe://lab.veil/ns/shop/sa/frontend", WrongScheme),
    ]
}

/// Well-formed IDs that look like REFERENCE and must never match it. `member` says whether the
/// ID is in REFERENCE's trust domain (`lab.veil`).
fn look_alikes() -> Vec<(&'static str, bool)> {
    vec![
        // Upper case in the path is allowed by the spec and significant.
        ("spiffe://lab.veil/ns/shop/sa/Frontend", true),
        ("spiffe://lab.veil/NS/shop/sa/frontend", true),
        ("spiffe://lab.veil/ns/SHOP/sa/frontend", true),
        // Dots inside a segment are characters, not path syntax.
        ("spiffe://lab.veil/ns/shop/sa/frontend.", true),
        ("spiffe://lab.veil/ns/shop/sa/.frontend", true),
        ("spiffe://lab.veil/ns/shop/sa/front.end", true),
        ("spiffe://lab.veil/ns/shop/sa/frontend..", true),
        ("spiffe://lab.veil/ns/shop/sa/...", true),
        ("spiffe://lab.veil/ns/shop./sa/frontend", true),
        // Prefixes and extensions: no prefix matching.
        ("spiffe://lab.veil/ns/shop/sa/frontend2", true),
        ("spiffe://lab.veil/ns/shop/sa/frontend/x", true),
        ("spiffe://lab.veil/ns/shop/sa/fronten", true),
        ("spiffe://lab.veil/ns/shop/sa", true),
        ("spiffe://lab.veil/ns/shop/sa/front-end", true),
        ("spiffe://lab.veil/ns/shop/sa/front_end", true),
        ("spiffe://lab.veil/ns/shop-sa/frontend", true),
        ("spiffe://lab.veil/ns/shop/sa/2F", true),
        ("spiffe://lab.veil", true),
        // Other trust domains that look like lab.veil: a trailing dot (the same name in DNS,
        // not here), `-`/`_` for `.`, a suffix, a subdomain.
        ("spiffe://lab.veil./ns/shop/sa/frontend", false),
        ("spiffe://lab-veil/ns/shop/sa/frontend", false),
        ("spiffe://lab_veil/ns/shop/sa/frontend", false),
        ("spiffe://lab.veil2/ns/shop/sa/frontend", false),
        ("spiffe://x.lab.veil/ns/shop/sa/frontend", false),
        ("spiffe://lab.vei/l/ns/shop/sa/frontend", false),
        ("spiffe://labveil/ns/shop/sa/frontend", false),
        ("spiffe://.lab.veil/ns/shop/sa/frontend", false),
    ]
}

#[test]
fn malformed_ids_are_refused_with_the_rule_they_break() {
    for (input, want) in malformed() {
        let got = SpiffeId::parse(input);
        assert_eq!(got.as_ref(), Err(&want), "{input:?}");
        // The error is clear: it is one line naming what is wrong, and the same text reaches a
        // user through serde (lab files, status JSON, control-plane files).
        let text = want.to_string();
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "{input:?}: {text}"
        );
        let json = serde_json::to_string(input).unwrap();
        let err = serde_json::from_str::<SpiffeId>(&json).expect_err(input);
        assert!(err.to_string().contains(&text), "{input:?}: {err}");
    }
}

#[test]
fn look_alikes_parse_as_themselves_and_never_match() {
    let reference = SpiffeId::parse(REFERENCE).unwrap();
    let lab_veil = TrustDomain::new("lab.veil").unwrap();
    let set: HashSet<SpiffeId> = [reference.clone()].into();
    for (input, is_member) in look_alikes() {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(id.as_str(), input, "normalised");
        assert_ne!(id, reference, "{input:?} matched {REFERENCE}");
        assert!(
            !set.contains(&id),
            "{input:?} found in a set of {REFERENCE}"
        );
        assert_eq!(id.is_member_of(&lab_veil), is_member, "{input:?}");
        assert_eq!(id.trust_domain() == lab_veil, is_member, "{input:?}");
    }
    // Building the reference from its segments gives the same principal as parsing it, and
    // segments carrying path syntax are refused rather than spliced in.
    assert_eq!(
        SpiffeId::from_segments(&lab_veil, &["ns", "shop", "sa", "frontend"]).unwrap(),
        reference
    );
    for (segment, want) in [
        ("sa/frontend", IdError::BadPathChar('/')),
        ("..", IdError::DotSegment),
        (".", IdError::DotSegment),
        ("", IdError::EmptySegment),
        ("*", IdError::BadPathChar('*')),
        ("front%2Fend", IdError::BadPathChar('%')),
        ("front\u{0435}nd", IdError::BadPathChar('\u{0435}')),
    ] {
        assert_eq!(
            SpiffeId::from_segments(&lab_veil, &["ns", "shop", segment]),
            Err(want),
            "{segment:?}"
        );
    }
    // Every look-alike is distinct from every other: no two collapse into one principal.
    let all: HashSet<SpiffeId> = look_alikes()
        .iter()
        .map(|(s, _)| SpiffeId::parse(s).unwrap())
        .collect();
    assert_eq!(all.len(), look_alikes().len());
    assert!(MAX_SPIFFE_ID_LEN >= REFERENCE.len());
}

#[test]
fn svids_carrying_malformed_or_look_alike_ids() {
    let ca = DevCa::new(TrustDomain::new("lab.veil").unwrap()).unwrap();
    let mut bundles = Bundles::new();
    bundles
        .insert(ca.trust_domain().clone(), ca.bundle())
        .unwrap();
    let reference = SpiffeId::parse(REFERENCE).unwrap();
    let now = SystemTime::now();
    let leaf = |uri: &str| {
        let mut spec = LeafSpec::svid(
            &reference,
            now - Duration::from_secs(60),
            Duration::from_secs(600),
        );
        spec.uris = vec![uri.to_string()];
        spec
    };

    // The well-formed reference validates: the refusals below are about the ID alone.
    let good = ca.issue_chain(&leaf(REFERENCE)).unwrap();
    let v = validate_x509_svid(&good.chain, &bundles, now).unwrap();
    assert_eq!(v.spiffe_id, reference);

    let mut refused = 0;
    let mut not_encodable = Vec::new();
    for (uri, want) in malformed() {
        // A URI SAN is an IA5String: non-ASCII cannot be put into an SVID by a conforming
        // issuer (rcgen refuses it), so those cases stop at the parse table above.
        let Ok(chain) = ca.issue_chain(&leaf(uri)) else {
            assert!(
                !uri.is_ascii(),
                "{uri:?}: an ASCII URI SAN could not be issued"
            );
            not_encodable.push(uri);
            continue;
        };
        match validate_x509_svid(&chain.chain, &bundles, now) {
            Err(SvidError::InvalidSpiffeId(got)) => assert_eq!(got, want, "{uri:?}"),
            other => panic!("{uri:?}: want InvalidSpiffeId({want:?}), got {other:?}"),
        }
        refused += 1;
    }
    assert!(
        refused >= 30,
        "only {refused} malformed SVIDs were issued and checked"
    );
    println!(
        "{refused} SVIDs with malformed IDs refused; {} non-ASCII IDs not encodable as a URI SAN",
        not_encodable.len()
    );

    // Look-alikes in the CA's trust domain validate as themselves, never as the reference; those
    // of another trust domain are refused (this CA anchors lab.veil only) or, like the bare
    // trust-domain ID, refused as leaves.
    for (uri, is_member) in look_alikes() {
        let chain = ca.issue_chain(&leaf(uri)).unwrap();
        let got = validate_x509_svid(&chain.chain, &bundles, now);
        if is_member && uri != "spiffe://lab.veil" {
            let v = got.unwrap_or_else(|e| panic!("{uri:?}: {e}"));
            assert_eq!(v.spiffe_id.as_str(), uri, "normalised");
            assert_ne!(v.spiffe_id, reference, "{uri:?} validated as {REFERENCE}");
        } else {
            let e = got.expect_err(uri);
            assert!(
                !matches!(e, SvidError::InvalidSpiffeId(_)),
                "{uri:?} is well formed: {e}"
            );
        }
    }
}
