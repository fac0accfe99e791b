//! l7::rules: HTTP rules as Cilium documents them, compiled once and matched per request.
//!
//! - `method`, `path` and `host` are extended regular expressions matched against the whole
//!   value (anchored: `/api` does not admit `/api/x` or `/x/api`), as Cilium's Envoy matches
//!   them. The path is the request target's path, without the query string.
//! - `headers` entries are `Name` (the header is present) or `Name: value` (present with exactly
//!   that value); names compare case-insensitively.
//! - A rule with no field admits every request.

use regex::Regex;

use crate::policy::parse::HttpRule;

/// A compiled [`HttpRule`].
#[derive(Debug, Clone)]
pub struct HttpMatcher {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<(String, Option<String>)>,
}

/// What one request is matched on.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// The request's headers (name, value), names in any case.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Which field of an [`HttpRule`] is bad, and why (the policy parser turns it into a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `method`, `path`, `host` or `headers[N]`.
    pub field: String,
    pub reason: String,
}

fn anchored(field: &str, re: &Option<String>) -> Result<Option<Regex>, FieldError> {
    re.as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            regex::RegexBuilder::new(&format!("^(?:{s})$"))
                .size_limit(1 << 20)
                .build()
                .map_err(|e| FieldError {
                    field: field.to_owned(),
                    reason: format!("not a valid regular expression: {e}"),
                })
        })
        .transpose()
}

/// A header name is an RFC 9110 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl HttpMatcher {
    pub fn compile(rule: &HttpRule) -> Result<Self, FieldError> {
        let mut headers = Vec::new();
        for (i, h) in rule.headers.iter().enumerate() {
            let (name, value) = match h.split_once(':') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
                None => (h.trim(), None),
            };
            if !is_token(name) {
                return Err(FieldError {
                    field: format!("headers[{i}]"),
                    reason: format!(
                        "{h:?} is not `Name` or `Name: value` with a valid header name"
                    ),
                });
            }
            headers.push((name.to_ascii_lowercase(), value));
        }
        Ok(Self {
            method: anchored("method", &rule.method)?,
            path: anchored("path", &rule.path)?,
            host: anchored("host", &rule.host)?,
            headers,
        })
    }

    pub fn matches(&self, r: &Request<'_>) -> bool {
        let re = |re: &Option<Regex>, v: Option<&str>| match (re, v) {
            (None, _) => true,
            (Some(re), Some(v)) => re.is_match(v),
            (Some(_), None) => false,
        };
        re(&self.method, Some(r.method))
            && re(&self.path, Some(r.path))
            && re(&self.host, r.host)
            && self.headers.iter().all(|(name, value)| {
                r.headers.iter().any(|(n, v)| {
                    n.eq_ignore_ascii_case(name) && value.as_deref().is_none_or(|want| want == *v)
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        method: Option<&str>,
        path: Option<&str>,
        host: Option<&str>,
        headers: &[&str],
    ) -> HttpMatcher {
        HttpMatcher::compile(&HttpRule {
            method: method.map(str::to_owned),
            path: path.map(str::to_owned),
            host: host.map(str::to_owned),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        })
        .unwrap()
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        host: Option<&'a str>,
        headers: &'a [(&'a str, &'a str)],
    ) -> Request<'a> {
        Request {
            method,
            path,
            host,
            headers,
        }
    }

    #[test]
    fn method_and_path_are_anchored_regular_expressions() {
        let r = rule(Some("GET"), Some("/api/products"), None, &[]);
        assert!(r.matches(&req("GET", "/api/products", None, &[])));
        assert!(!r.matches(&req("POST", "/api/products", None, &[])));
        assert!(!r.matches(&req("GETX", "/api/products", None, &[])));
        assert!(!r.matches(&req("GET", "/api/products/1", None, &[])));
        assert!(!r.matches(&req("GET", "/x/api/products", None, &[])));
        assert!(!r.matches(&req("GET", "/admin", None, &[])));
        let r = rule(Some("GET|HEAD"), Some("/api/.*"), None, &[]);
        assert!(r.matches(&req("HEAD", "/api/x/y", None, &[])));
        assert!(!r.matches(&req("GET", "/apix", None, &[])));
    }

    #[test]
    fn host_and_headers() {
        let r = rule(
            None,
            None,
            Some(r"backend\.shop(:8080)?"),
            &["X-Token: abc", "X-Trace"],
        );
        let hs = [("x-token", "abc"), ("X-TRACE", "1")];
        assert!(r.matches(&req("PUT", "/", Some("backend.shop:8080"), &hs)));
        assert!(!r.matches(&req("PUT", "/", Some("evil"), &hs)));
        assert!(!r.matches(&req("PUT", "/", None, &hs)));
        assert!(!r.matches(&req(
            "PUT",
            "/",
            Some("backend.shop"),
            &[("x-token", "abcd"), ("x-trace", "")]
        )));
        assert!(!r.matches(&req(
            "PUT",
            "/",
            Some("backend.shop"),
            &[("x-token", "abc")]
        )));
    }

    #[test]
    fn an_empty_rule_admits_everything() {
        assert!(rule(None, None, None, &[]).matches(&req("DELETE", "/anything", None, &[])));
        assert!(rule(Some(""), Some(""), None, &[]).matches(&req("DELETE", "/x", None, &[])));
    }

    #[test]
    fn bad_rules_name_their_field() {
        let bad = |m: Option<&str>, p: Option<&str>, h: &[&str]| {
            HttpMatcher::compile(&HttpRule {
                method: m.map(str::to_owned),
                path: p.map(str::to_owned),
                host: None,
                headers: h.iter().map(|h| (*h).to_owned()).collect(),
            })
            .unwrap_err()
        };
        assert_eq!(bad(Some("GET("), None, &[]).field, "method");
        assert_eq!(bad(None, Some("/a[b"), &[]).field, "path");
        assert_eq!(bad(None, None, &["ok", "bad name: x"]).field, "headers[1]");
        assert_eq!(bad(None, None, &[": x"]).field, "headers[0]");
    }
}
