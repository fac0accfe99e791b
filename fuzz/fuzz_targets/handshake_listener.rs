//! What an unauthenticated peer reaches on the control channel's listener (TCP 4250): the TLS
//! 1.3 server with veil's node-certificate verifier (`veil::auth::tls::server_config`, node-b's
//! dev SVID, any node of the trust domain admitted), and the node handshake that runs inside the
//! channel (`veil::auth::node_handshake`, the frames a peer sends after TLS). The first input
//! byte picks which:
//! - even: the rest is what a client sends to the listener, fed to a fresh rustls server
//!   connection. No bytes without a client certificate signed by the dev CA and its key can
//!   complete the handshake: the server must still be handshaking, with no peer certificate
//!   and no application data, after every record.
//! - odd: the rest is a stream of control frames from node-a (authenticated by TLS) to node-b's
//!   node handshake, over a deterministic stand-in for the TLS exporter. Established only after
//!   node-a's Hello and a Confirm carrying our own check value, with node-a's valid key, the
//!   larger epoch, and the PSK both sides derive; never twice; bad frames are errors.
//!
//! `VEIL_FUZZ_WRITE_SEEDS=<dir>` writes seeds: a real ClientHello of node-a's control channel
//! client and a complete node handshake from node-a.
#![no_main]

use std::{
    io::Read,
    sync::{Arc, OnceLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use veil_agent::auth::{
    node_handshake::{derive_psk, NodeHandshake, Progress},
    tls::{self, ExpectedPeer, Exporter, NodeCredentials, TlsConfig},
    wire::{decode_frame, encode, Message},
};
use veil_certs_dev::{node_id, DevCa};
use veil_identity::{BundleSet, TrustDomain};
use veil_transport::{PrivateKey, PublicKey};

const LOCAL_EPOCH: u64 = 5;

/// A deterministic exporter (FNV-1a of label and context, spread over the output): the two ends
/// of one "session" agree, and seeds made in one process work in the next.
struct FakeExporter;

impl Exporter for FakeExporter {
    fn export(&self, label: &[u8], ctx: &[u8], out: &mut [u8]) -> Result<(), rustls::Error> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.iter().chain(ctx) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = (h >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
        Ok(())
    }
}

struct Setup {
    server: Arc<rustls::ServerConfig>,
    local_key: PublicKey,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let td = TrustDomain::new("lab.veil").unwrap();
        let ca = DevCa::new(td.clone()).expect("dev ca");
        let bundles = BundleSet::new();
        bundles
            .set_roots(td.clone(), ca.bundle())
            .expect("dev bundle");
        let svid = |n: &str| Arc::new(ca.issue_node_svid(n, Duration::from_secs(3600)).unwrap());
        let creds = NodeCredentials::from_svid(svid("node-b")).expect("node-b creds");
        let server = tls::server_config(
            &TlsConfig::default(),
            &creds,
            &bundles,
            ExpectedPeer::AnyNodeOf(td.clone()),
        )
        .expect("server config");
        let s = Setup {
            server,
            local_key: PrivateKey::from_bytes([0x42; 32]).public_key(),
        };
        if let Some(dir) = std::env::var_os("VEIL_FUZZ_WRITE_SEEDS") {
            let dir = std::path::Path::new(&dir);
            std::fs::create_dir_all(dir).unwrap();
            let client_creds = NodeCredentials::from_svid(svid("node-a")).unwrap();
            let cfg = tls::client_config(
                &TlsConfig::default(),
                &client_creds,
                &bundles,
                node_id(&td, "node-b").unwrap(),
            )
            .unwrap();
            let mut client =
                rustls::ClientConnection::new(cfg, tls::server_name_for("node-b")).unwrap();
            let mut hello = vec![0u8];
            while client.wants_write() {
                client.write_tls(&mut hello).unwrap();
            }
            std::fs::write(dir.join("client-hello"), hello).unwrap();
            std::fs::write(dir.join("node-handshake"), node_handshake_seed(s.local_key)).unwrap();
        }
        s
    })
}

/// node-a's side of a complete node handshake with node-b, as frames.
fn node_handshake_seed(local_key: PublicKey) -> Vec<u8> {
    let peer_key = PrivateKey::from_bytes([0x24; 32]).public_key();
    let (mut peer, peer_hello) = NodeHandshake::start("node-a", peer_key, 7, "node-b").unwrap();
    let (_, our_hello) = NodeHandshake::start("node-b", local_key, LOCAL_EPOCH, "node-a").unwrap();
    let Ok(Progress::Send(peer_confirm)) = peer.handle(our_hello, &FakeExporter) else {
        panic!("node-a did not answer node-b's hello");
    };
    let mut out = vec![1u8];
    out.extend(encode(&peer_hello));
    out.extend(encode(&peer_confirm));
    out
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        tls_listener(s, rest);
    } else {
        node_handshake(s, rest);
    }
});

fn tls_listener(s: &Setup, mut rd: &[u8]) {
    let mut server = rustls::ServerConnection::new(s.server.clone()).expect("server connection");
    let mut sink = Vec::new();
    while !rd.is_empty() {
        match server.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let processed = server.process_new_packets();
        assert!(
            server.is_handshaking(),
            "a handshake completed without the dev CA's key"
        );
        assert!(
            server.peer_certificates().is_none(),
            "a client certificate was accepted"
        );
        let mut plain = [0u8; 64];
        assert!(
            !matches!(server.reader().read(&mut plain), Ok(n) if n > 0),
            "application data before authentication"
        );
        while server.wants_write() {
            sink.clear();
            if server.write_tls(&mut sink).is_err() {
                break;
            }
        }
        if processed.is_err() {
            break;
        }
    }
}

fn node_handshake(s: &Setup, mut buf: &[u8]) {
    let (mut hs, _hello) =
        NodeHandshake::start("node-b", s.local_key, LOCAL_EPOCH, "node-a").expect("start");
    let mut sent_check = None;
    let mut peer_epoch = None;
    let mut established = false;
    while let Ok(Some((msg, used))) = decode_frame(buf) {
        buf = &buf[used..];
        let (hello_epoch, confirm) = match &msg {
            Message::Hello(h) => (Some(h.epoch), None),
            Message::Confirm(c) => (None, Some(c.clone())),
            _ => (None, None),
        };
        match hs.handle(msg, &FakeExporter) {
            Ok(Progress::Send(Message::Confirm(c))) => {
                assert!(sent_check.is_none() && !established, "confirm sent twice");
                peer_epoch = hello_epoch;
                let epoch = hello_epoch.expect("a confirm answers a hello");
                assert_eq!(c.epoch, epoch.max(LOCAL_EPOCH));
                sent_check = Some(c);
            }
            Ok(Progress::Send(other)) => panic!("unexpected answer {other:?}"),
            Ok(Progress::Established(keys)) => {
                assert!(!established, "established twice");
                established = true;
                let ours = sent_check.as_ref().expect("established before our confirm");
                let theirs = confirm.expect("established on a confirm");
                assert_eq!(&theirs, ours, "established on another check value");
                assert_eq!(keys.peer_node, "node-a");
                assert_eq!(keys.epoch, peer_epoch.unwrap().max(LOCAL_EPOCH));
                assert!(keys.epoch != 0 && keys.epoch != u64::MAX);
                let k = keys.peer_wg_key;
                assert!(k.as_bytes() != &[0; 32] && !k.is_low_order() && k != s.local_key);
                let psk = derive_psk(&FakeExporter, &s.local_key, &k, keys.epoch).unwrap();
                assert_eq!(keys.psk, psk);
                assert!(hs.is_done());
            }
            Err(_) => {}
        }
    }
}
