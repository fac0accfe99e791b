//! SPIFFE ID and trust domain parsing (`veil_identity`) and the matching built on it: node
//! identities (`veil::auth::node_name_of` / `node_spiffe_id`, what the control channel admits)
//! and SPIRE selector sets. The input is two strings separated by a newline. Checked:
//! - a parsed ID prints as its input, is `spiffe://` + trust domain + path, is a member of its
//!   own trust domain, and rebuilds from its trust domain and path segments;
//! - two parsed IDs are equal exactly when their strings are, and one is a member of the other's
//!   trust domain exactly when the trust domain names are equal;
//! - an ID is a node identity named `n` exactly when it equals the node ID built for `n`;
//! - a trust domain's own ID parses back; a parsed selector set prints and parses back the same.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use veil_agent::auth::{node_name_of, node_spiffe_id};
use veil_identity::{SelectorSet, SpiffeId, TrustDomain, SCHEME_PREFIX};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text
        .split_once('\n')
        .unwrap_or((text, "spiffe://lab.veil/veil/node/node-a"));
    let ia = SpiffeId::parse(a).ok().inspect(|id| check_id(a, id));
    let ib = SpiffeId::parse(b).ok().inspect(|id| check_id(b, id));
    if let (Some(ia), Some(ib)) = (&ia, &ib) {
        assert_eq!(ia == ib, a == b);
        assert_eq!(
            ia.is_member_of(&ib.trust_domain()),
            ia.trust_domain_name() == ib.trust_domain_name()
        );
        // The node-shape check of one trust domain never admits another's IDs.
        if node_name_of(ia, &ib.trust_domain()).is_some() {
            assert_eq!(ia.trust_domain(), ib.trust_domain());
        }
    }
    if let Ok(td) = TrustDomain::new(a) {
        assert_eq!(td.as_str(), a);
        let own = SpiffeId::for_trust_domain(&td);
        assert_eq!(SpiffeId::parse(&td.id_string()).as_ref(), Ok(&own));
        assert_eq!(
            TrustDomain::from_bundle_key(&td.id_string()).as_ref(),
            Ok(&td)
        );
        if let Ok(id) = node_spiffe_id(&td, b) {
            assert_eq!(
                node_name_of(&id, &td).as_deref(),
                Some(b),
                "node {b:?} in {td}"
            );
        }
    }
    if let Ok(set) = SelectorSet::from_str(a) {
        let shown = set.to_string();
        assert_eq!(
            SelectorSet::from_str(&shown).as_ref(),
            Ok(&set),
            "{shown:?}"
        );
    }
});

fn check_id(s: &str, id: &SpiffeId) {
    assert_eq!(id.as_str(), s);
    assert_eq!(id.to_string(), s);
    assert_eq!(
        format!("{SCHEME_PREFIX}{}{}", id.trust_domain_name(), id.path()),
        s
    );
    let td = TrustDomain::new(id.trust_domain_name()).expect("an id's trust domain parses");
    assert!(id.is_member_of(&td));
    assert_eq!(id.trust_domain(), td);
    let path = id.path();
    let segments: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.strip_prefix('/')
            .expect("a path starts with /")
            .split('/')
            .collect()
    };
    assert_eq!(SpiffeId::from_segments(&td, &segments).as_ref(), Ok(id));
    if let Some(name) = node_name_of(id, &td) {
        assert_eq!(node_spiffe_id(&td, &name).as_ref(), Ok(id), "node {name:?}");
    }
}
