//! The UAPI protocol (`veil_transport::uapi`): what a client of veil-wg's control socket sends
//! (`read_request`, `parse_request`) and what the agent reads back (`parse_get`, `parse_errno`).
//! Checked on every input:
//! - bad input is an error, never a panic; the reader never returns more than one request;
//! - a `set` that parses, formatted again by the agent's client (`format_set`), reads and parses
//!   back to the same request (a removed peer carries only its key);
//! - the device's `get` answer after applying that `set` parses back to the same device: keys,
//!   port, fwmark, and each peer's key, endpoint, allowed IPs, keepalive and PSK presence.
#![no_main]

use std::{io::Cursor, time::Duration};

use libfuzzer_sys::fuzz_target;
use veil_transport::{
    uapi::{
        format_get, format_set, parse_errno, parse_get, parse_request, read_request, DeviceConfig,
        PeerChange, Request, SetRequest,
    },
    DeviceState, PeerState,
};

fuzz_target!(|data: &[u8]| {
    let mut rd = Cursor::new(data);
    if let Ok(Some(text)) = read_request(&mut rd, Duration::from_secs(5), |_| Ok(())) {
        assert!(!text.contains("\n\n"), "one request holds a blank line");
        check(&text);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
        let _ = parse_get(text);
        let _ = parse_errno(text);
    }
});

fn check(text: &str) {
    let Ok(Request::Set(req)) = parse_request(text) else {
        return;
    };
    let formatted = format_set(&req);
    let mut rd = Cursor::new(formatted.as_bytes());
    let again = read_request(&mut rd, Duration::from_secs(5), |_| Ok(()))
        .expect("a formatted set reads")
        .expect("a formatted set is a request");
    match parse_request(&again) {
        Ok(Request::Set(back)) => assert_eq!(normal(back), normal(req.clone()), "{formatted:?}"),
        other => panic!("a formatted set parses as {other:?}: {formatted:?}"),
    }
    let cfg = DeviceConfig::default().apply(&req);
    let state = DeviceState {
        public_key: None,
        listen_port: cfg.listen_port,
        fwmark: cfg.fwmark,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerState {
                public_key: Some(p.public_key),
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: p.persistent_keepalive,
                ..PeerState::default()
            })
            .collect(),
    };
    let get = format_get(&cfg, &state);
    let st =
        parse_get(&get).unwrap_or_else(|e| panic!("the get answer does not parse: {e}: {get:?}"));
    assert_eq!(
        st.public_key,
        cfg.private_key.as_ref().map(|k| k.public_key())
    );
    assert_eq!((st.listen_port, st.fwmark), (cfg.listen_port, cfg.fwmark));
    assert_eq!(st.peers.len(), cfg.peers.len());
    for (s, p) in st.peers.iter().zip(&cfg.peers) {
        assert_eq!(s.public_key, Some(p.public_key));
        assert_eq!(s.endpoint, p.endpoint);
        assert_eq!(s.allowed_ips, p.allowed_ips);
        assert_eq!(
            s.persistent_keepalive,
            p.persistent_keepalive.filter(|k| *k > 0)
        );
        assert_eq!(
            s.has_preshared_key,
            p.preshared_key.as_ref().is_some_and(|k| !k.is_zero())
        );
    }
}

/// A removed peer's other fields are not sent (the device ignores them).
fn normal(mut req: SetRequest) -> SetRequest {
    for p in &mut req.peers {
        if p.remove {
            *p = PeerChange {
                remove: true,
                ..PeerChange::new(p.public_key)
            };
        }
    }
    req
}
