//! `TrustDomain` and `SpiffeId`, parsed exactly per the SPIFFE ID specification
//! (spiffe/standards/SPIFFE-ID.md): lowercase `spiffe` scheme, a trust domain of `[a-z0-9._-]`
//! without port or userinfo, optional path of non-empty segments of `[a-zA-Z0-9._-]` that are
//! neither `.` nor `..`, no trailing slash, no query or fragment, at most 2048 bytes.
//!
//! Matching is exact string equality: there are no wildcards and no patterns anywhere in veil's
//! identity checks.

use std::fmt;
use std::str::FromStr;

/// The only accepted scheme prefix. The spec requires the scheme in lowercase.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Maximum length of a whole SPIFFE ID in bytes (SPIFFE-ID.md §2.3 "Maximum SPIFFE ID Length").
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name in bytes (a DNS name limit the spec adopts).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a trust domain or SPIFFE ID was rejected: one variant per rule of the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("spiffe id is empty")]
    Empty,
    #[error("spiffe id does not start with the lowercase scheme `spiffe://`")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes ({0} bytes)")]
    TrustDomainTooLong(usize),
    #[error("trust domain contains uppercase character {0:?}; trust domains are lowercase")]
    UppercaseTrustDomain(char),
    #[error("trust domain contains character {0:?}; only a-z 0-9 . - _ are allowed")]
    BadTrustDomainChar(char),
    #[error("trust domain has a port; spiffe ids carry none")]
    Port,
    #[error("trust domain has userinfo; spiffe ids carry none")]
    Userinfo,
    #[error("spiffe id has a query; spiffe ids carry none")]
    Query,
    #[error("spiffe id has a fragment; spiffe ids carry none")]
    Fragment,
    #[error("path has an empty segment (`//`)")]
    EmptySegment,
    #[error("path has a `.` or `..` segment")]
    DotSegment,
    #[error("path has a trailing slash")]
    TrailingSlash,
    #[error("path contains character {0:?}; only a-z A-Z 0-9 . - _ are allowed")]
    BadPathChar(char),
    #[error("trust domain id has a path; expected `spiffe://<trust domain>` alone")]
    UnexpectedPath,
    #[error("spiffe id is longer than {MAX_SPIFFE_ID_LEN} bytes ({0} bytes)")]
    TooLong(usize),
}

fn check_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    // Userinfo and port are named separately from "bad character" so a user who pastes a URL
    // learns which URL part to drop.
    if td.contains('@') {
        return Err(IdError::Userinfo);
    }
    if td.contains(':') {
        return Err(IdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong(td.len()));
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdError::UppercaseTrustDomain(c)),
            _ => return Err(IdError::BadTrustDomainChar(c)),
        }
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), IdError> {
    if seg.is_empty() {
        return Err(IdError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(IdError::DotSegment);
    }
    for c in seg.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            _ => return Err(IdError::BadPathChar(c)),
        }
    }
    Ok(())
}

/// Checks a path (`""` or `/seg/seg…`).
fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller splits at the first '/', so a non-empty path always starts with one.
    let rest = &path[1..];
    if rest.is_empty() || path.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    rest.split('/').try_for_each(check_segment)
}

/// A SPIFFE trust domain name, e.g. `lab.veil`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// Parses a bundle-map key: SPIRE sends `spiffe://example.org`, the protobuf comments
    /// describe `example.org`; both name the same trust domain.
    pub fn from_bundle_key(key: &str) -> Result<Self, IdError> {
        if key.contains(':') {
            let id = SpiffeId::parse(key)?;
            if !id.path().is_empty() {
                return Err(IdError::UnexpectedPath);
            }
            Ok(id.trust_domain())
        } else {
            Self::new(key)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`, the trust domain's own SPIFFE ID (used as bundle-map key and as the
    /// URI SAN of CA certificates).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

/// A SPIFFE ID, e.g. `spiffe://lab.veil/ns/shop/sa/frontend`. Compared by exact string.
/// A clone shares the text: an agent keys its peer directory and auth entries by IDs that
/// thousands of pods and pairs carry.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    repr: std::sync::Arc<str>,
    /// Byte offset where the path starts (end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID string.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(IdError::WrongScheme);
        };
        if s.contains('#') {
            return Err(IdError::Fragment);
        }
        if s.contains('?') {
            return Err(IdError::Query);
        }
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            repr: s.into(),
            path_start: SCHEME_PREFIX.len() + td_end,
        })
    }

    /// Builds `spiffe://<td>/<seg>/<seg>…`, checking every segment.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, IdError> {
        let mut repr = td.id_string();
        let path_start = repr.len();
        for seg in segments {
            check_segment(seg)?;
            repr.push('/');
            repr.push_str(seg);
        }
        if repr.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(repr.len()));
        }
        Ok(Self {
            repr: repr.into(),
            path_start,
        })
    }

    /// The trust domain's own ID, `spiffe://<td>` (empty path).
    pub fn for_trust_domain(td: &TrustDomain) -> Self {
        Self::from_segments(td, &[]).expect("a trust domain id is always valid")
    }

    pub fn as_str(&self) -> &str {
        &self.repr
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.repr[SCHEME_PREFIX.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, `""` or `/seg/seg…`.
    pub fn path(&self) -> &str {
        &self.repr[self.path_start..]
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repr)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.repr)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(TrustDomain);
serde_via_str!(SpiffeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        for s in [
            "spiffe://lab.veil/ns/shop/sa/frontend",
            "spiffe://lab.veil/veil/node/node-a",
            "spiffe://example.org",
            "spiffe://a_b-c.9/A.b-C_d/x",
            "spiffe://td/..a/a..",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/frontend").unwrap();
        assert_eq!(id.trust_domain_name(), "lab.veil");
        assert_eq!(id.path(), "/ns/shop/sa/frontend");
        assert!(id.is_member_of(&TrustDomain::new("lab.veil").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("lab.vei").unwrap()));
        assert_eq!(SpiffeId::parse("spiffe://x").unwrap().path(), "");
    }

    #[test]
    fn rejects_each_rule_with_its_own_error() {
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2040));
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://td/a", IdError::WrongScheme),
            ("SPIFFE://td/a", IdError::WrongScheme),
            ("spiffe:/td/a", IdError::WrongScheme),
            ("spiffe:///a", IdError::EmptyTrustDomain),
            ("spiffe://", IdError::EmptyTrustDomain),
            (&long_td, IdError::TrustDomainTooLong(256)),
            ("spiffe://Lab.veil/a", IdError::UppercaseTrustDomain('L')),
            ("spiffe://lab*veil/a", IdError::BadTrustDomainChar('*')),
            ("spiffe://lab%2eveil/a", IdError::BadTrustDomainChar('%')),
            ("spiffe://lab.veil:443/a", IdError::Port),
            ("spiffe://user@lab.veil/a", IdError::Userinfo),
            ("spiffe://lab.veil/a?x=1", IdError::Query),
            ("spiffe://lab.veil/a#frag", IdError::Fragment),
            ("spiffe://lab.veil//a", IdError::EmptySegment),
            ("spiffe://lab.veil/a//b", IdError::EmptySegment),
            ("spiffe://lab.veil/./a", IdError::DotSegment),
            ("spiffe://lab.veil/a/..", IdError::DotSegment),
            ("spiffe://lab.veil/a/", IdError::TrailingSlash),
            ("spiffe://lab.veil/", IdError::TrailingSlash),
            ("spiffe://lab.veil/a b", IdError::BadPathChar(' ')),
            ("spiffe://lab.veil/a%20b", IdError::BadPathChar('%')),
            ("spiffe://lab.veil/*", IdError::BadPathChar('*')),
            (&long_id, IdError::TooLong(long_id.len())),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn length_limits_are_inclusive() {
        let td = "a".repeat(255);
        assert!(TrustDomain::new(&td).is_ok());
        let path = "b".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len());
        let id = format!("spiffe://td/{path}");
        assert_eq!(id.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
    }

    #[test]
    fn trust_domain_parsing() {
        assert_eq!(TrustDomain::new("lab.veil").unwrap().as_str(), "lab.veil");
        assert_eq!(
            TrustDomain::new("LAB"),
            Err(IdError::UppercaseTrustDomain('L'))
        );
        assert_eq!(TrustDomain::new(""), Err(IdError::EmptyTrustDomain));
        assert_eq!(
            TrustDomain::new("a/b"),
            Err(IdError::BadTrustDomainChar('/'))
        );
        assert_eq!(
            TrustDomain::from_bundle_key("spiffe://lab.veil").unwrap(),
            TrustDomain::new("lab.veil").unwrap()
        );
        assert_eq!(
            TrustDomain::from_bundle_key("lab.veil")
                .unwrap()
                .id_string(),
            "spiffe://lab.veil"
        );
        assert_eq!(
            TrustDomain::from_bundle_key("spiffe://lab.veil/x"),
            Err(IdError::UnexpectedPath)
        );
    }

    #[test]
    fn from_segments_checks_segments() {
        let td = TrustDomain::new("lab.veil").unwrap();
        let id = SpiffeId::from_segments(&td, &["ns", "shop", "sa", "frontend"]).unwrap();
        assert_eq!(
            id,
            SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/frontend").unwrap()
        );
        assert_eq!(
            SpiffeId::from_segments(&td, &["a", ""]),
            Err(IdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::from_segments(&td, &[".."]),
            Err(IdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::from_segments(&td, &["a/b"]),
            Err(IdError::BadPathChar('/'))
        );
    }

    #[test]
    fn matching_is_exact() {
        let a = SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/frontend").unwrap();
        for other in [
            "spiffe://lab.veil/ns/shop/sa/frontend2",
            "spiffe://lab.veil/ns/shop/sa/Frontend",
            "spiffe://lab.veil/ns/shop/sa",
            "spiffe://lab.veil2/ns/shop/sa/frontend",
        ] {
            assert_ne!(a, SpiffeId::parse(other).unwrap());
        }
    }

    #[test]
    fn serde_round_trip_and_rejects_invalid() {
        let id = SpiffeId::parse("spiffe://lab.veil/a").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://lab.veil/a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://lab.veil/a/\"").is_err());
        let td: TrustDomain = serde_json::from_str("\"lab.veil\"").unwrap();
        assert_eq!(td.as_str(), "lab.veil");
        assert!(serde_json::from_str::<TrustDomain>("\"Lab\"").is_err());
    }
}
