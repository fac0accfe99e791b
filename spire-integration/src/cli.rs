//! The `spire-server` command line as veil drives it beside real SPIRE (the lab's `identity:
//! spire`, and `tests/real_spire.rs`): the arguments of a registration entry, and reading the
//! `Name: value` lines the CLI prints. One writer, so the lab and the test cannot drift apart.

use std::time::Duration;

/// `spire-server entry create`'s arguments (without `-socketPath`): `spiffe_id` under
/// `parent_id`, for a workload matching every one of `selectors`, its X.509-SVIDs living
/// `x509_svid_ttl` (whole seconds) when given, else the server's default.
pub fn entry_create_args(
    parent_id: &str,
    spiffe_id: &str,
    selectors: &[&str],
    x509_svid_ttl: Option<Duration>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "entry",
        "create",
        "-parentID",
        parent_id,
        "-spiffeID",
        spiffe_id,
    ]
    .map(String::from)
    .into();
    if let Some(ttl) = x509_svid_ttl {
        args.extend(["-x509SVIDTTL".to_string(), ttl.as_secs().to_string()]);
    }
    for s in selectors {
        args.extend(["-selector".to_string(), s.to_string()]);
    }
    args
}

/// The values of the `Name: value` / `Name   : value` lines named `name` of spire-server's text
/// output, in order (`entry show` prints a block per entry).
pub fn fields<'a>(out: &'a str, name: &'a str) -> impl Iterator<Item = String> + 'a {
    out.lines().filter_map(move |l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_carries_its_ttl_and_every_selector() {
        let args = entry_create_args(
            "spiffe://td/spire/agent/join_token/x",
            "spiffe://td/ns/shop/sa/frontend",
            &["k8s:ns:shop", "k8s:sa:frontend"],
            Some(Duration::from_secs(90)),
        );
        assert_eq!(
            args.join(" "),
            "entry create -parentID spiffe://td/spire/agent/join_token/x \
             -spiffeID spiffe://td/ns/shop/sa/frontend -x509SVIDTTL 90 \
             -selector k8s:ns:shop -selector k8s:sa:frontend"
        );
        let no_ttl = entry_create_args("p", "s", &["unix:uid:0"], None);
        assert_eq!(
            no_ttl.join(" "),
            "entry create -parentID p -spiffeID s -selector unix:uid:0"
        );
    }

    #[test]
    fn fields_are_read_by_name_whatever_the_padding() {
        let out = "Entry ID         : a1\nSPIFFE ID        : spiffe://td/x\nSelector         : unix:uid:0\nSelector         : unix:gid:7\n\nEntry ID         : b2\nToken: t0k:en\n";
        assert_eq!(fields(out, "Entry ID").collect::<Vec<_>>(), ["a1", "b2"]);
        assert_eq!(
            fields(out, "Selector").collect::<Vec<_>>(),
            ["unix:uid:0", "unix:gid:7"]
        );
        assert_eq!(fields(out, "Token").next().as_deref(), Some("t0k:en"));
        assert_eq!(fields(out, "Serial number").next(), None);
    }
}
