//! The clients against the dev server over real gRPC on unix sockets, and the `spiffe` and
//! `spire-api` crates' own clients against the dev server (conformance).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod common;

use common::{init_tracing, run_client, wait_until};
use tokio::sync::watch;
use veil_identity::{IdentitySnapshot, SelectorSet, SvidError, SvidSource, TrustDomain};
use veil_spire::{
    ClientConfig, DevNodeConfig, DevServer, DevServerConfig, IdentityClientHandle, PodRegistration,
    RotateTarget,
};

/// A socket directory removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "veil-spire-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn sock(&self, node: &str) -> PathBuf {
        self.0.join(format!("{node}.sock"))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("lab.veil").unwrap()
}

fn config(dir: &TestDir, ttl: Duration) -> DevServerConfig {
    let mut c = DevServerConfig::new(td());
    c.svid_ttl = ttl;
    c.nodes = ["node-a", "node-b"]
        .iter()
        .map(|n| DevNodeConfig {
            name: n.to_string(),
            socket: dir.sock(n),
        })
        .collect();
    c
}

fn pod(node: &str, name: &str) -> PodRegistration {
    PodRegistration {
        node: node.into(),
        namespace: "shop".into(),
        name: name.into(),
        service_account: name.into(),
    }
}

fn selectors(name: &str) -> SelectorSet {
    SelectorSet::k8s_pod("shop", name, name).unwrap()
}

/// A client on `socket` with fast reconnects, running until the returned sender fires.
fn start_client(socket: &Path) -> (IdentityClientHandle, watch::Sender<bool>) {
    run_client(ClientConfig::new(socket), Duration::from_millis(400))
}

/// SVIDs that outlive every test.
const HOUR: Duration = Duration::from_secs(3600);

/// Tracing, a fresh socket directory `name` and a dev server of `config(dir, ttl)` with `pods`
/// registered.
async fn start_dev(name: &str, ttl: Duration, pods: &[PodRegistration]) -> (TestDir, DevServer) {
    init_tracing();
    let dir = TestDir::new(name);
    let dev = DevServer::start(config(&dir, ttl)).await.unwrap();
    for p in pods {
        dev.register_pod(p.clone()).unwrap();
    }
    (dir, dev)
}

/// A client on node-a's socket watching `pods` (of node-a), once it has published its node SVID
/// and theirs (within `limit`).
async fn node_a_client(
    dir: &TestDir,
    pods: &[&str],
    limit: Duration,
) -> (IdentityClientHandle, watch::Sender<bool>, IdentitySnapshot) {
    let (client, stop) = start_client(&dir.sock("node-a"));
    for p in pods {
        client.watch_workload(selectors(p));
    }
    let snap = wait_until(&client, limit, "svids", |s| {
        s.node.is_some() && pods.iter().all(|p| pod_serial(s, p).is_some())
    })
    .await;
    (client, stop, snap)
}

fn pod_serial(s: &IdentitySnapshot, name: &str) -> Option<String> {
    s.workloads
        .get(&selectors(name))
        .map(|v| v[0].serial().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_fetch_node_and_pod_svids() {
    let (dir, dev) = start_dev("first", HOUR, &[pod("node-a", "frontend")]).await;
    // backend lives on node-b: node-a's socket must not hand it out.
    dev.register_pod(pod("node-b", "backend")).unwrap();

    let (client, _stop) = start_client(&dir.sock("node-a"));
    client.watch_workload(selectors("frontend"));
    client.watch_workload(selectors("backend"));
    let snap = wait_until(
        &client,
        Duration::from_secs(10),
        "node + frontend svids",
        |s| s.node.is_some() && s.workloads.contains_key(&selectors("frontend")),
    )
    .await;

    let node = snap.node.as_ref().unwrap();
    assert_eq!(
        node.spiffe_id().as_str(),
        "spiffe://lab.veil/veil/node/node-a"
    );
    assert_eq!(node.serial(), dev.node_svid("node-a").unwrap().serial());
    let fe = &snap.workloads[&selectors("frontend")];
    assert_eq!(fe.len(), 1);
    assert_eq!(
        fe[0].spiffe_id().as_str(),
        "spiffe://lab.veil/ns/shop/sa/frontend"
    );
    assert_eq!(
        fe[0].serial(),
        dev.pod_svid("shop", "frontend").unwrap().serial()
    );
    assert!(!snap.workloads.contains_key(&selectors("backend")));
    assert_eq!(snap.bundles.get(&td()).unwrap().to_vec(), dev.bundle());
    // What is published validates against what is published.
    for (_, s) in snap.svids() {
        s.validate(&snap.bundles, SystemTime::now()).unwrap();
    }

    // Unwatching removes the pod's SVID at once.
    client.unwatch_workload(&selectors("frontend"));
    wait_until(
        &client,
        Duration::from_secs(2),
        "frontend gone after unwatch",
        |s| s.workloads.is_empty(),
    )
    .await;
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_at_half_ttl_within_jitter() {
    init_tracing();
    let dir = TestDir::new("rotate");
    let ttl = Duration::from_secs(4);
    let cfg = config(&dir, ttl);
    let jitter = cfg.jitter();
    let dev = DevServer::start(cfg).await.unwrap();
    dev.register_pod(pod("node-a", "frontend")).unwrap();
    let issued = dev.pod_issued("shop", "frontend").unwrap();
    let (lo, hi) = (ttl / 2 - jitter, ttl / 2 + jitter);
    let scheduled = issued.rotate_at.duration_since(issued.issued_at).unwrap();
    assert!(
        scheduled >= lo && scheduled <= hi,
        "scheduled at {scheduled:?}"
    );

    let (client, _stop) = start_client(&dir.sock("node-a"));
    client.watch_workload(selectors("frontend"));
    let first = wait_until(&client, Duration::from_secs(3), "first svid", |s| {
        pod_serial(s, "frontend").is_some()
    })
    .await;
    let first_serial = pod_serial(&first, "frontend").unwrap();
    assert_eq!(first_serial, issued.svid.serial());

    // Twice in a row: each new serial arrives TTL/2 ± jitter after the previous issuance
    // (plus delivery slack), well before the old one expires.
    let mut prev_serial = first_serial;
    let mut prev_issued = issued.issued_at;
    for round in 0..2 {
        let snap = wait_until(&client, ttl, "rotated serial", |s| {
            pod_serial(s, "frontend").is_some_and(|x| x != prev_serial)
        })
        .await;
        let seen = SystemTime::now().duration_since(prev_issued).unwrap();
        assert!(
            seen >= lo && seen <= hi + Duration::from_millis(700),
            "round {round}: rotation seen {seen:?} after issuance, want {lo:?}..={hi:?}"
        );
        let svid = snap.workloads[&selectors("frontend")][0].clone();
        assert!(svid.not_after() > SystemTime::now() + ttl / 2 - Duration::from_secs(1));
        prev_serial = svid.serial().to_owned();
        prev_issued = dev.pod_issued("shop", "frontend").unwrap().issued_at;
        assert_eq!(
            dev.pod_svid("shop", "frontend").unwrap().serial(),
            prev_serial
        );
    }
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_rotation_reaches_the_client() {
    let (dir, dev) = start_dev("force", HOUR, &[pod("node-a", "frontend")]).await;
    let (client, _stop, snap) = node_a_client(&dir, &["frontend"], Duration::from_secs(5)).await;
    let (node0, pod0) = (
        snap.node.as_ref().unwrap().serial().to_owned(),
        pod_serial(&snap, "frontend").unwrap(),
    );
    dev.rotate(RotateTarget::Pod {
        namespace: "shop".into(),
        name: "frontend".into(),
    })
    .unwrap();
    let s = wait_until(&client, Duration::from_secs(2), "pod rotated", |s| {
        pod_serial(s, "frontend").is_some_and(|x| x != pod0)
    })
    .await;
    assert_eq!(s.node.as_ref().unwrap().serial(), node0, "node untouched");
    dev.rotate(RotateTarget::Node("node-a".into())).unwrap();
    wait_until(&client, Duration::from_secs(2), "node rotated", |s| {
        s.node.as_ref().is_some_and(|n| n.serial() != node0)
    })
    .await;
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_absent_at_start_then_appearing() {
    init_tracing();
    let dir = TestDir::new("absent");
    let (client, _stop) = start_client(&dir.sock("node-a"));
    client.watch_workload(selectors("frontend"));
    // No server: the client waits and publishes nothing (fails closed, no placeholder). Time
    // must pass for "nothing": 1.5 s of failed connection attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let snap = client.current();
    assert_eq!(snap.generation, 0, "nothing published: {snap:?}");
    assert!(snap.node.is_none() && snap.workloads.is_empty());

    let dev = DevServer::start(config(&dir, HOUR)).await.unwrap();
    dev.register_pod(pod("node-a", "frontend")).unwrap();
    let started = Instant::now();
    let snap = wait_until(&client, Duration::from_secs(5), "recovered", |s| {
        s.node.is_some() && pod_serial(s, "frontend").is_some()
    })
    .await;
    // Capped backoff: reconnect within about the cap.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        pod_serial(&snap, "frontend").unwrap(),
        dev.pod_svid("shop", "frontend").unwrap().serial()
    );
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_gone_mid_run_keeps_last_good_until_expiry() {
    let (dir, dev) = start_dev("gone", Duration::from_secs(4), &[pod("node-a", "frontend")]).await;
    let (client, _stop, _) = node_a_client(&dir, &["frontend"], Duration::from_secs(3)).await;
    dev.shutdown().await;
    assert!(!dir.sock("node-a").exists(), "socket removed");

    // The last good SVIDs stay, both of them, the same ones, until the earlier of the two
    // expires…
    let held = client.current();
    let node = held.node.clone().expect("node svid kept");
    let fe = held.workloads[&selectors("frontend")][0].clone();
    assert!(node.not_after() > SystemTime::now());
    let expiry = node.not_after().min(fe.not_after());
    let until_expiry = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    // Time must pass: the check is just before the earlier expiry.
    tokio::time::sleep(until_expiry.saturating_sub(Duration::from_millis(300))).await;
    let s = client.current();
    assert!(
        SystemTime::now() < expiry,
        "checked too late to tell: {:?} past the earlier expiry",
        SystemTime::now().duration_since(expiry).unwrap_or_default()
    );
    assert_eq!(
        s.node.as_ref().map(|n| n.serial()),
        Some(node.serial()),
        "node SVID dropped or replaced before expiry"
    );
    assert_eq!(
        s.workloads
            .get(&selectors("frontend"))
            .and_then(|v| v.first())
            .map(|v| v.serial()),
        Some(fe.serial()),
        "frontend SVID dropped or replaced before expiry"
    );
    // …and are dropped once expired, with no new ones invented.
    let latest = node.not_after().max(fe.not_after());
    let limit =
        latest.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2);
    wait_until(&client, limit, "expired svids dropped", |s| {
        s.node.is_none() && s.workloads.is_empty()
    })
    .await;
    assert!(SystemTime::now() > latest, "dropped only after notAfter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_removes_the_svid_within_two_seconds() {
    let (dir, dev) = start_dev(
        "revoke",
        HOUR,
        &[pod("node-a", "frontend"), pod("node-a", "intruder")],
    )
    .await;
    let (client, _stop, _) =
        node_a_client(&dir, &["frontend", "intruder"], Duration::from_secs(5)).await;

    let revoked_at = Instant::now();
    dev.revoke_pod("shop", "frontend").unwrap();
    let s = wait_until(&client, Duration::from_secs(2), "frontend removed", |s| {
        !s.workloads.contains_key(&selectors("frontend"))
    })
    .await;
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    assert!(
        s.workloads.contains_key(&selectors("intruder")),
        "others untouched"
    );
    // It stays gone (the server stopped issuing), and comes back when re-registered. Time must
    // pass for "stays gone": 500 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!client
        .current()
        .workloads
        .contains_key(&selectors("frontend")));
    dev.register_pod(pod("node-a", "frontend")).unwrap();
    wait_until(&client, Duration::from_secs(2), "re-registered", |s| {
        s.workloads.contains_key(&selectors("frontend"))
    })
    .await;
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_overlap_then_old_root_refused() {
    init_tracing();
    let dir = TestDir::new("ca");
    let mut cfg = config(&dir, HOUR);
    cfg.with_intermediate = true;
    let dev = DevServer::start(cfg).await.unwrap();
    dev.register_pod(pod("node-a", "frontend")).unwrap();
    let (client, _stop, s0) = node_a_client(&dir, &["frontend"], Duration::from_secs(5)).await;
    let old_svid = s0.workloads[&selectors("frontend")][0].clone();
    let roots = |s: &IdentitySnapshot| s.bundles.get(&td()).map(|r| r.len()).unwrap_or(0);

    dev.ca_prepare().unwrap();
    let s1 = wait_until(&client, Duration::from_secs(2), "two roots", |s| {
        roots(s) == 2
    })
    .await;
    assert_eq!(
        pod_serial(&s1, "frontend").unwrap(),
        old_svid.serial(),
        "old CA still issues"
    );

    let old_node = s0.node.as_ref().unwrap().serial().to_owned();
    dev.ca_activate().unwrap();
    // As an operator would, wait until every SVID was re-issued from the new CA before
    // revoking the old one (revoking earlier refuses the not-yet-replaced ones at once).
    let s2 = wait_until(&client, Duration::from_secs(3), "svids from new CA", |s| {
        pod_serial(s, "frontend").is_some_and(|x| x != old_svid.serial())
            && s.node.as_ref().is_some_and(|n| n.serial() != old_node)
    })
    .await;
    let new_svid = s2.workloads[&selectors("frontend")][0].clone();
    // Overlap: both roots accepted.
    assert_eq!(roots(&s2), 2);
    old_svid.validate(&s2.bundles, SystemTime::now()).unwrap();
    new_svid.validate(&s2.bundles, SystemTime::now()).unwrap();

    dev.ca_revoke().unwrap();
    let s3 = wait_until(&client, Duration::from_secs(2), "one root", |s| {
        roots(s) == 1
    })
    .await;
    assert_eq!(
        s3.bundles.get(&td()).unwrap().to_vec(),
        vec![dev.active_root()]
    );
    // The old root is refused: an SVID it issued no longer validates against the bundle.
    assert!(matches!(
        old_svid.validate(&s3.bundles, SystemTime::now()),
        Err(SvidError::UntrustedRoot(_))
    ));
    new_svid.validate(&s3.bundles, SystemTime::now()).unwrap();
    assert_eq!(pod_serial(&s3, "frontend").unwrap(), new_svid.serial());
    assert!(s3.node.is_some());
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_spiffe_crate_workload_api_client() {
    let (dir, dev) = start_dev("spiffe", HOUR, &[]).await;
    let endpoint = format!("unix:{}", dir.sock("node-a").display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();

    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://lab.veil/veil/node/node-a"
    );
    let leaf = svid.leaf().as_bytes();
    assert_eq!(leaf, dev.node_svid("node-a").unwrap().leaf().as_ref());
    let spiffe_td = spiffe::TrustDomain::new("lab.veil").unwrap();
    let bundle = ctx
        .bundle_set()
        .get(&spiffe_td)
        .expect("bundle for lab.veil");
    assert_eq!(bundle.authorities()[0].as_bytes(), dev.bundle()[0].as_ref());

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let b = bundles.get(&spiffe_td).expect("bundle for lab.veil");
    assert_eq!(b.authorities().len(), 1);

    // The streaming API delivers a rotation.
    let stream = client.stream_x509_svids().await.unwrap();
    tokio::pin!(stream);
    use tokio_stream::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    dev.rotate(RotateTarget::Node("node-a".into())).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(first.leaf().as_bytes(), second.leaf().as_bytes());

    // The high-level X509Source too.
    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://lab.veil/veil/node/node-a"
    );
    source.shutdown().await;
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_spire_api_delegated_identity_client() {
    let (dir, dev) = start_dev("spireapi", HOUR, &[pod("node-a", "frontend")]).await;
    let endpoint = format!("unix:{}", dir.sock("node-a").display());
    let client = spire_api::DelegatedIdentityClient::connect_to(&endpoint)
        .await
        .unwrap();
    use spire_api::selectors::{K8s, Selector};
    let req = spire_api::DelegateAttestationRequest::for_selectors(vec![
        Selector::K8s(K8s::Namespace("shop".into())),
        Selector::K8s(K8s::ServiceAccount("frontend".into())),
        Selector::Generic(("k8s".into(), "pod-name:frontend".into())),
    ])
    .unwrap();
    let svid = client.fetch_x509_svid(req).await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://lab.veil/ns/shop/sa/frontend"
    );
    assert_eq!(
        svid.leaf().as_bytes(),
        dev.pod_svid("shop", "frontend").unwrap().leaf().as_ref()
    );
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("lab.veil").unwrap();
    assert!(bundles.get(&td).is_some());
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_requires_the_security_header() {
    let (dir, dev) = start_dev("header", HOUR, &[]).await;
    let path = dir.sock("node-a");
    let channel = tonic::transport::Endpoint::from_static("http://x")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    use veil_spire::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(veil_spire::proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("security header"));
    // With the header, the same call streams the node SVID.
    let mut req = tonic::Request::new(veil_spire::proto::workload::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = raw.fetch_x509svid(req).await.unwrap().into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://lab.veil/veil/node/node-a");
    let shown = format!("{:?}", msg.svids[0]);
    assert!(shown.contains("redacted"), "{shown}");
    assert!(!shown.contains(&format!("{:?}", msg.svids[0].x509_svid_key)));
    dev.shutdown().await;
}

/// Federation: a server federating with another trust domain serves that trust domain's roots
/// beside its own, through the Workload API (`federated_bundles`, as the `spiffe` crate reads
/// it) and the Delegated Identity API (veil's client); an SVID of the federated trust domain
/// then validates, anchored in its own trust domain's roots. A trust domain cannot federate
/// with itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_roots_are_served_beside_the_trust_domains_own() {
    let (dir, dev) = start_dev("federation", HOUR, &[]).await;
    let other_dir = TestDir::new("federation-other");
    let other_td = TrustDomain::new("other.example").unwrap();
    let mut other_cfg = DevServerConfig::new(other_td.clone());
    other_cfg.nodes = vec![DevNodeConfig {
        name: "node-c".into(),
        socket: other_dir.sock("node-c"),
    }];
    let other = DevServer::start(other_cfg).await.unwrap();
    let (client, _stop, s0) = node_a_client(&dir, &[], Duration::from_secs(5)).await;
    assert!(s0.bundles.get(&other_td).is_none());
    let foreign = other.node_svid("node-c").unwrap();
    assert!(matches!(
        foreign.validate(&s0.bundles, SystemTime::now()),
        Err(SvidError::NoBundle(_))
    ));

    assert!(dev.federate_with(td(), dev.bundle()).is_err());
    dev.federate_with(other_td.clone(), other.bundle()).unwrap();
    let s1 = wait_until(&client, Duration::from_secs(2), "federated roots", |s| {
        s.bundles.get(&other_td).is_some()
    })
    .await;
    assert_eq!(s1.bundles.get(&other_td).unwrap().to_vec(), other.bundle());
    assert_eq!(s1.bundles.get(&td()).unwrap().to_vec(), dev.bundle());
    foreign.validate(&s1.bundles, SystemTime::now()).unwrap();

    let endpoint = format!("unix:{}", dir.sock("node-a").display());
    let spiffe_client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let ctx = spiffe_client.fetch_x509_context().await.unwrap();
    let federated = ctx
        .bundle_set()
        .get(&spiffe::TrustDomain::new("other.example").unwrap())
        .expect("the federated bundle in the Workload API's X.509 context");
    assert_eq!(
        federated.authorities()[0].as_bytes(),
        other.bundle()[0].as_ref()
    );
    other.shutdown().await;
    dev.shutdown().await;
}
