//! Loopback integration tests: real TCP, real TLS, dev PKIs. Each node is a distinct loopback
//! address (127.0.0.N), so the server's source-address check runs as in production.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot};
use veil_transport::PrivateKey;

use super::channel::{Channel, ChannelConfig, ChannelEvent, Deps, LocalNode};
use super::client::{self, ClientConfig};
use super::node_handshake::{EpochBook, NodeKeys};
use super::server::{Server, ServerConfig, ServerStats};
use super::testing::Pki;
use super::tls::{KxGroup, NodeCredentials, TlsConfig};
use super::workload::SigningKeys;
use super::{AuthFailure, AuthTriple, Error, NodeInfo, StaticDirectory, StaticWorkloads};

const FRONTEND: u32 = 300;
const BACKEND: u32 = 301;
const INTRUDER: u32 = 302;

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Nodes: node-a (1, 127.0.0.2), node-b (2, .3), node-c..node-f (3..6, .4..7).
fn nodes(pki: &Pki) -> Vec<NodeInfo> {
    ["node-a", "node-b", "node-c", "node-d", "node-e", "node-f"]
        .iter()
        .enumerate()
        .map(|(i, name)| NodeInfo {
            name: (*name).to_owned(),
            id: i as u32 + 1,
            spiffe_id: pki.node_id(name),
            addr: ip(i as u8 + 2),
        })
        .collect()
}

struct Lab {
    pki: Pki,
    nodes: Vec<NodeInfo>,
    dir: StaticDirectory,
    frontend: Arc<veil_identity::Svid>,
    backend: Arc<veil_identity::Svid>,
    intruder: Arc<veil_identity::Svid>,
}

impl Lab {
    fn new() -> Self {
        let pki = Pki::new("lab.veil");
        let nodes = nodes(&pki);
        let hour = Duration::from_secs(3600);
        let frontend = pki.workload("shop", "frontend", hour);
        let backend = pki.workload("shop", "backend", hour);
        let intruder = pki.workload("shop", "intruder", hour);
        let mut dir = StaticDirectory::new();
        for n in &nodes {
            dir.add_node(n.clone());
        }
        dir.add_workload(1, frontend.spiffe_id().clone(), FRONTEND);
        dir.add_workload(2, backend.spiffe_id().clone(), BACKEND);
        dir.add_workload(3, intruder.spiffe_id().clone(), INTRUDER);
        Self {
            pki,
            nodes,
            dir,
            frontend,
            backend,
            intruder,
        }
    }

    fn node(&self, name: &str) -> NodeInfo {
        self.nodes.iter().find(|n| n.name == name).unwrap().clone()
    }

    fn deps(
        &self,
        name: &str,
        creds: NodeCredentials,
        dir: StaticDirectory,
        workloads: StaticWorkloads,
    ) -> (Deps, mpsc::Receiver<ChannelEvent>) {
        let (tx, rx) = mpsc::channel(4096);
        let n = self.node(name);
        (
            Deps {
                local: LocalNode {
                    name: n.name.clone(),
                    id: n.id,
                },
                trust_domain: self.pki.td.clone(),
                creds,
                bundles: self.pki.bundles.clone(),
                directory: Arc::new(dir),
                workloads: Arc::new(workloads),
                wg_key: Arc::new(ArcSwap::from_pointee(PrivateKey::generate().public_key())),
                epochs: Arc::new(EpochBook::new()),
                signing_keys: Arc::new(SigningKeys::new()),
                events: tx,
                published: tokio::sync::watch::channel(Default::default()).1,
            },
            rx,
        )
    }

    fn node_a(&self) -> (Deps, mpsc::Receiver<ChannelEvent>) {
        self.deps(
            "node-a",
            self.pki.node_creds("node-a"),
            self.dir.clone(),
            StaticWorkloads([(FRONTEND, self.frontend.clone())].into()),
        )
    }

    fn node_b(&self) -> (Deps, mpsc::Receiver<ChannelEvent>) {
        self.deps(
            "node-b",
            self.pki.node_creds("node-b"),
            self.dir.clone(),
            StaticWorkloads([(BACKEND, self.backend.clone())].into()),
        )
    }
}

struct Running {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    events: mpsc::Receiver<ChannelEvent>,
    _stop: oneshot::Sender<()>,
}

async fn serve(deps: (Deps, mpsc::Receiver<ChannelEvent>), cfg: ServerConfig) -> Running {
    let (deps, events) = deps;
    let listen = SocketAddr::new(ip(3), 0);
    let server = Server::bind(ServerConfig { listen, ..cfg }, deps)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stats,
        events,
        _stop: stop,
    }
}

fn client_cfg(from: u8) -> ClientConfig {
    ClientConfig {
        bind: Some(ip(from)),
        ..ClientConfig::default()
    }
}

async fn dial(
    lab: &Lab,
    deps: &Deps,
    from: u8,
    peer: &str,
    addr: SocketAddr,
) -> Result<(Channel, NodeKeys), Error> {
    client::connect_to(&client_cfg(from), deps, &lab.node(peer), addr).await
}

/// The next event matching `pred`, within 5 s.
async fn next_event<T>(
    rx: &mut mpsc::Receiver<ChannelEvent>,
    mut pred: impl FnMut(ChannelEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ev = rx.recv().await.expect("event channel open");
            if let Some(t) = pred(ev) {
                return t;
            }
        }
    })
    .await
    .expect("expected event within 5 s")
}

async fn established(rx: &mut mpsc::Receiver<ChannelEvent>) -> (Channel, NodeKeys) {
    next_event(rx, |e| match e {
        ChannelEvent::Established { channel, keys } => Some((channel, keys)),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn good_pair_authenticates_with_the_hybrid_group_and_agrees_on_the_psk() {
    let lab = Lab::new();
    let (a, _a_events) = lab.node_a();
    let mut b = serve(lab.node_b(), ServerConfig::default()).await;
    let (ch_a, keys_a) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    let (ch_b, keys_b) = established(&mut b.events).await;
    assert_eq!(ch_a.negotiated_group(), Some(KxGroup::X25519MLKEM768));
    assert_eq!(ch_b.negotiated_group(), Some(KxGroup::X25519MLKEM768));
    assert_eq!(keys_a.psk, keys_b.psk, "both ends derived the same psk");
    assert!(!keys_a.psk.is_zero());
    assert_eq!(keys_a.epoch, keys_b.epoch);
    assert_eq!(keys_a.peer_node, "node-b");
    assert_eq!(keys_b.peer_node, "node-a");
    assert_eq!(keys_b.peer_wg_key, **a.wg_key.load());
    assert_eq!(ch_b.peer().name, "node-a");

    // A workload handshake: entries on both sides.
    let ok = ch_a.authenticate(FRONTEND, BACKEND).await.unwrap();
    assert_eq!(
        ok.triple,
        AuthTriple {
            local_identity: FRONTEND,
            remote_identity: BACKEND,
            remote_node: 2
        }
    );
    assert_eq!(&ok.remote_spiffe_id, lab.backend.spiffe_id());
    let inbound = next_event(&mut b.events, |e| match e {
        ChannelEvent::Inbound { result, .. } => Some(result),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(
        inbound.triple,
        AuthTriple {
            local_identity: BACKEND,
            remote_identity: FRONTEND,
            remote_node: 1
        }
    );
    assert_eq!(inbound.expires, ok.expires);
    // The channel is symmetric: the accepting side can initiate too.
    let back = ch_b.authenticate(BACKEND, FRONTEND).await.unwrap();
    assert_eq!(back.triple.remote_node, 1);

    // Revocations and re-key requests reach the peer.
    ch_a.send_revoke(lab.frontend.spiffe_id()).await.unwrap();
    let revoked = next_event(&mut b.events, |e| match e {
        ChannelEvent::RemoteRevoked {
            spiffe_id,
            peer_node,
        } => Some((spiffe_id, peer_node)),
        _ => None,
    })
    .await;
    assert_eq!(&revoked.0, lab.frontend.spiffe_id());
    assert_eq!(revoked.1, 1);
    ch_a.request_rekey().await.unwrap();
    next_event(&mut b.events, |e| {
        matches!(e, ChannelEvent::RekeyRequested { peer_node: 1 }).then_some(())
    })
    .await;

    // A second node handshake (re-key) gives a new epoch and a new PSK, agreed on both ends.
    let (_ch_a2, keys_a2) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    let (_ch_b2, keys_b2) = established(&mut b.events).await;
    assert_eq!(keys_a2.psk, keys_b2.psk);
    assert_ne!(keys_a2.psk, keys_a.psk);
    assert_eq!(keys_a2.epoch, keys_a.epoch + 1);

    // Closing one end closes the other and fails its requests as unreachable.
    ch_a.close();
    next_event(&mut b.events, |e| {
        matches!(e, ChannelEvent::Closed { peer_node: 1, .. }).then_some(())
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), ch_b.closed())
        .await
        .unwrap();
    assert_eq!(
        ch_b.authenticate(BACKEND, FRONTEND).await,
        Err(AuthFailure::PeerUnreachable)
    );
}

#[tokio::test]
async fn a_rotated_node_svid_is_presented_on_the_next_connection() {
    let lab = Lab::new();
    let b_creds = lab.pki.node_creds("node-b");
    let b_deps = lab.deps(
        "node-b",
        b_creds.clone(),
        lab.dir.clone(),
        StaticWorkloads([(BACKEND, lab.backend.clone())].into()),
    );
    let mut b = serve(b_deps, ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    let (ch1, k1) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    let (_, kb1) = established(&mut b.events).await;
    let first = b_creds.svid().unwrap();
    assert_eq!(ch1.peer_svid_serial(), first.serial());
    // Rotation: the next node handshake runs on a new connection with the new SVID, and
    // yields a new PSK; the old channel keeps working until the daemon closes it.
    b_creds.set(lab.pki.node_svid("node-b")).unwrap();
    let second = b_creds.svid().unwrap();
    assert_ne!(first.serial(), second.serial());
    let (ch2, k2) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    let (_, kb2) = established(&mut b.events).await;
    assert_eq!(ch2.peer_svid_serial(), second.serial());
    assert_eq!((k1.psk == kb1.psk, k2.psk == kb2.psk), (true, true));
    assert_ne!(k1.psk, k2.psk);
    assert!(ch1.authenticate(FRONTEND, BACKEND).await.is_ok());
    assert!(ch2.authenticate(FRONTEND, BACKEND).await.is_ok());
}

#[tokio::test]
async fn node_from_another_trust_domain_cannot_peer() {
    let lab = Lab::new();
    let evil = Pki::new("evil.veil");
    let mut b = serve(lab.node_b(), ServerConfig::default()).await;
    // As a client: the server refuses it with the reason.
    let (a, _) = lab.deps(
        "node-a",
        evil.node_creds("node-a"),
        lab.dir.clone(),
        StaticWorkloads::default(),
    );
    assert!(dial(&lab, &a, 2, "node-b", b.addr).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.stats.rejected_for(AuthFailure::WrongTrustDomain), 1);
    assert_eq!(
        b.stats
            .established
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(b.events.try_recv().is_err(), "no channel, no keys");
    // As a server: the dialling side refuses it with the reason.
    let evil_b = lab.deps(
        "node-b",
        evil.node_creds("node-b"),
        lab.dir.clone(),
        StaticWorkloads::default(),
    );
    let evil_server = serve(evil_b, ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    let err = dial(&lab, &a, 2, "node-b", evil_server.addr)
        .await
        .unwrap_err();
    assert_eq!(err.failure(), AuthFailure::WrongTrustDomain, "{err}");
}

#[tokio::test]
async fn wrong_node_identity_is_refused_on_both_sides() {
    let lab = Lab::new();
    let b = serve(lab.node_b(), ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    // We dial "node-c" but node-b's agent answers at that address.
    let err = dial(&lab, &a, 2, "node-c", b.addr).await.unwrap_err();
    assert_eq!(err.failure(), AuthFailure::WrongSpiffeId, "{err}");
    // node-c's SVID from node-a's address: the server expects node-a there.
    let (c, _) = lab.deps(
        "node-c",
        lab.pki.node_creds("node-c"),
        lab.dir.clone(),
        StaticWorkloads::default(),
    );
    assert!(dial(&lab, &c, 2, "node-b", b.addr).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.stats.rejected_for(AuthFailure::WrongSpiffeId), 1);
    // A source that is no node's address never reaches TLS.
    assert!(dial(&lab, &a, 99, "node-b", b.addr).await.is_err());
    assert_eq!(
        b.stats
            .refused_unknown_source
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn expired_workload_svid_is_refused_with_its_reason() {
    let lab = Lab::new();
    let expired = Arc::new(
        lab.pki
            .ca
            .issue_bad(veil_certs_dev::BadVariant::Expired, lab.backend.spiffe_id())
            .unwrap()
            .into_svid()
            .unwrap(),
    );
    let b_deps = lab.deps(
        "node-b",
        lab.pki.node_creds("node-b"),
        lab.dir.clone(),
        StaticWorkloads([(BACKEND, expired)].into()),
    );
    let mut b = serve(b_deps, ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    let (ch, _) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    assert_eq!(
        ch.authenticate(FRONTEND, BACKEND).await,
        Err(AuthFailure::ExpiredSvid)
    );
    let inbound = next_event(&mut b.events, |e| match e {
        ChannelEvent::Inbound { result, triple, .. } => Some((triple, result)),
        _ => None,
    })
    .await;
    assert_eq!(inbound.1, Err(AuthFailure::ExpiredSvid));
    assert_eq!(inbound.0.local_identity, BACKEND);
    // No SVID at all for the local side is its own reason.
    assert_eq!(
        ch.authenticate(INTRUDER, BACKEND).await,
        Err(AuthFailure::NoLocalSvid)
    );
}

#[tokio::test]
async fn a_node_claiming_a_workload_it_does_not_host_is_refused() {
    let lab = Lab::new();
    let mut b = serve(lab.node_b(), ServerConfig::default()).await;
    // node-a holds the intruder's SVID and believes (its own view) it hosts it; the cluster
    // (node-b's view) places the intruder on node-c.
    let mut a_view = lab.dir.clone();
    a_view.add_workload(1, lab.intruder.spiffe_id().clone(), INTRUDER);
    let (a, _) = lab.deps(
        "node-a",
        lab.pki.node_creds("node-a"),
        a_view,
        StaticWorkloads([(INTRUDER, lab.intruder.clone())].into()),
    );
    let (ch, _) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    assert_eq!(
        ch.authenticate(INTRUDER, BACKEND).await,
        Err(AuthFailure::NotHosted)
    );
    let inbound = next_event(&mut b.events, |e| match e {
        ChannelEvent::Inbound { result, .. } => Some(result),
        _ => None,
    })
    .await;
    assert_eq!(inbound, Err(AuthFailure::NotHosted));
    // And node-b never answers for a workload it does not host.
    assert_eq!(
        ch.authenticate(INTRUDER, FRONTEND).await,
        Err(AuthFailure::NotHosted)
    );
}

#[tokio::test]
async fn hostile_clients_do_not_stop_a_legitimate_handshake() {
    let lab = Lab::new();
    let cfg = ServerConfig {
        channel: ChannelConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ChannelConfig::default()
        },
        max_unauthenticated: 128,
        max_unauthenticated_per_source: 8,
        ..ServerConfig::default()
    };
    let b = serve(lab.node_b(), cfg).await;
    let connect_from = |n: u8| {
        let addr = b.addr;
        async move {
            let s = TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(ip(n), 0)).unwrap();
            s.connect(addr).await
        }
    };
    let mut hold = Vec::new();
    // 1,000 half-open connections (TCP up, nothing sent) from node-c's address.
    for _ in 0..1000 {
        if let Ok(s) = connect_from(4).await {
            hold.push(s);
        }
    }
    // Garbage from node-d's address.
    for _ in 0..5 {
        let mut s = connect_from(5).await.unwrap();
        // Not a TLS content type at byte 0, so the server can tell at once.
        let mut junk = b"GET / HTTP/1.1\r\n".to_vec();
        let mut rest = vec![0u8; 512];
        aws_lc_rs::rand::fill(&mut rest).unwrap();
        junk.extend_from_slice(&rest);
        let _ = s.write_all(&junk).await;
        hold.push(s);
    }
    // A truncated TLS record (header promises 16 KiB, 100 bytes follow) from node-e's.
    for _ in 0..3 {
        let mut s = connect_from(6).await.unwrap();
        let mut rec = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        rec.extend_from_slice(&[1; 100]);
        s.write_all(&rec).await.unwrap();
        hold.push(s);
    }
    // A slowloris from node-f's address: one byte of a ClientHello every 100 ms.
    let slow_addr = b.addr;
    let slowloris = tokio::spawn(async move {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(ip(7), 0)).unwrap();
        let mut s = s.connect(slow_addr).await.unwrap();
        for b in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01]
            .iter()
            .cycle()
            .take(100)
        {
            if s.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    // Unknown sources.
    for _ in 0..20 {
        if let Ok(s) = connect_from(50).await {
            hold.push(s);
        }
    }
    // Half-open connections from node-a's own address (another process on that host): they
    // fill node-a's pending slots, which the real agent's connection must still get through.
    for _ in 0..50 {
        if let Ok(s) = connect_from(2).await {
            hold.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The legitimate handshake completes, quickly, while all of that is going on.
    let (a, _) = lab.node_a();
    let started = std::time::Instant::now();
    let (ch, _) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "legitimate handshake took {took:?}"
    );
    assert!(ch.authenticate(FRONTEND, BACKEND).await.is_ok());
    eprintln!("legitimate node handshake under attack: {took:?}");

    // The hostile ones were bounded: per-source limit, timeouts, TLS failures, no channels.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(slowloris.await.unwrap(), "slowloris was cut off");
    let s = &b.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // Older pending connections of a source at its cap were closed to make room: node-c's
    // flood and node-a's (the legitimate dial evicted one of node-a's half-open ones).
    assert!(get(&s.evicted_pending) > (1000 - 8) + (50 - 8), "{s:?}");
    assert_eq!(get(&s.refused_unknown_source), 20, "{s:?}");
    assert!(get(&s.tls_failures) >= 5, "{s:?}");
    // 8 half-open slots + 3 truncated records + 1 slowloris.
    assert!(get(&s.handshake_timeouts) >= 12, "{s:?}");
    assert_eq!(get(&s.established), 1, "{s:?}");
    // The legitimate channel is still healthy after the attackers were dropped.
    assert!(ch.authenticate(FRONTEND, BACKEND).await.is_ok());
    drop(hold);
}

#[tokio::test]
async fn a_client_allowing_classical_still_gets_the_hybrid_group() {
    let lab = Lab::new();
    let b = serve(lab.node_b(), ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    let classical = ClientConfig {
        tls: TlsConfig {
            allow_classical: true,
        },
        ..client_cfg(2)
    };
    // Allowing classical never downgrades a pair that can do better (the refusal of a
    // classical-only peer is tested in tls.rs with an in-memory handshake).
    let (ch, _) = client::connect_to(&classical, &a, &lab.node("node-b"), b.addr)
        .await
        .unwrap();
    assert_eq!(ch.negotiated_group(), Some(KxGroup::X25519MLKEM768));
}

/// Rough throughput of workload handshakes over one channel (printed, not asserted: timing
/// targets live in benchmarks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_handshake_throughput() {
    let lab = Lab::new();
    let mut b = serve(lab.node_b(), ServerConfig::default()).await;
    let (a, _) = lab.node_a();
    let (ch, _) = dial(&lab, &a, 2, "node-b", b.addr).await.unwrap();
    // Drain inbound events so the responder never waits on the event queue.
    tokio::spawn(async move { while b.events.recv().await.is_some() {} });
    let total = 2000usize;
    let concurrency = 64usize;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for _ in (w..total).step_by(concurrency) {
                if ch.authenticate(FRONTEND, BACKEND).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(ok, total, "every handshake succeeded");
    eprintln!(
        "workload handshakes: {total} in {secs:.2} s = {:.0}/s over one channel \
         (both agents in this process, 2 worker threads)",
        total as f64 / secs
    );
}
