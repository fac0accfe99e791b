//! End to end in Kubernetes mode (issue 15): `veil lab up --control-plane kubernetes` runs a
//! real etcd and kube-apiserver, the agents read it through the Kubernetes source, and the lab
//! plays kubelet through veil-cni and host-local. Pods, CiliumNetworkPolicies and
//! NetworkPolicies are made with the real kubectl; traffic is real WireGuard on the underlay.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use veil_tests::{contains, http_url, rand_suffix, veil, Lab};

fn curl(lab: &Lab, from: &str, url: &str) -> Result<String, String> {
    // `-g`: an IPv6 URL's brackets are the address, not a glob.
    let out = lab.exec(from, &["curl", "-sS", "-g", "--max-time", "2", url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls (20 ms) until `f` holds; fails the test after `timeout`. Returns how long it took.
fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// Applies a CiliumNetworkPolicy with kubectl and waits (30 s at most) until both nodes report
/// it enforced.
fn apply_enforced(lab: &Lab, cnp: &str, name: &str) {
    lab.kubectl(&["apply", "-f", "-"], cnp);
    until(
        &format!("the CNP {name} enforced on both nodes"),
        Duration::from_secs(30),
        || enforced_everywhere(lab, "cnp", name),
    );
}

/// An underlay capture that never holds `marker` in clear and shows WireGuard between the nodes.
fn assert_encrypted(lab: &Lab, raw: &[u8], lines: &[String], marker: &str) {
    assert!(
        !contains(raw, marker.as_bytes()),
        "the marker crossed the underlay in clear"
    );
    let wg = format!(
        "{}.51820 > {}.51820: UDP",
        lab.node_underlay_addr(1),
        lab.node_underlay_addr(2)
    );
    assert!(
        lines.iter().any(|l| l.contains(&wg)),
        "no WireGuard between the nodes ({wg}): {lines:#?}"
    );
}

/// Both nodes report the policy enforced in its status.
fn enforced_everywhere(lab: &Lab, kind: &str, name: &str) -> bool {
    let out = lab.kubectl(&["get", kind, "-n", "shop", name, "-o", "json"], "");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    ["node-a", "node-b"].iter().all(|n| {
        v["status"]["nodes"][n]["enforcing"] == true && v["status"]["nodes"][n]["ok"] == true
    })
}

const WEB2_FROM_FRONTEND: &str = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
  "metadata": {"name": "web2-from-frontend", "namespace": "shop"},
  "spec": {"endpointSelector": {"matchLabels": {"app": "web2"}},
           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}"#;

const WEB2_FROM_FRONTEND_AUTH: &str = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
  "metadata": {"name": "web2-from-frontend-auth", "namespace": "shop"},
  "spec": {"endpointSelector": {"matchLabels": {"app": "web2"}},
           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                        "authentication": {"mode": "required"},
                        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}"#;

const WEB2_NETPOL: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
  "metadata": {"name": "web2", "namespace": "shop"},
  "spec": {"podSelector": {"matchLabels": {"app": "web2"}}, "policyTypes": ["Ingress"],
           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                        "ports": [{"port": 8080, "protocol": "TCP"}]}]}}"#;

/// Admits pods of namespaces labelled `team=trusted`, whichever namespace that is.
const WEB2_NETPOL_TRUSTED_NS: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
  "metadata": {"name": "web2-trusted", "namespace": "shop"},
  "spec": {"podSelector": {"matchLabels": {"app": "web2"}}, "policyTypes": ["Ingress"],
           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "trusted"}}}]}]}}"#;

/// IPv6 only (issue 19): the lab's kube-apiserver on the IPv6 underlay, Nodes with only IPv6
/// InternalIPs and pod CIDRs, a kubectl-made Pod with only an IPv6 address (veil-cni over
/// host-local's one IPv6 range), a CNP enforced, a kubectl-made Service with an IPv6 ClusterIP
/// from the apiserver and its IPv6 EndpointSlice, and nothing in clear on the underlay.
#[test]
fn ipv6_only_kubernetes_lab_runs_pods_policies_and_services_over_ipv6() {
    let lab = Lab::up(&["--control-plane", "kubernetes", "--ip-family", "ipv6"]);
    assert_eq!(lab.view.ip_family, "ipv6");
    let get = |args: &[&str]| lab.kubectl(args, "");
    assert_eq!(
        get(&[
            "get",
            "node",
            "node-b",
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#
        ]),
        "fd00:198:18::2"
    );
    assert_eq!(
        get(&["get", "node", "node-b", "-o", "jsonpath={.spec.podCIDRs}"]),
        r#"["fd00:198:19:2::/64"]"#
    );

    let ip = lab.make_web_pod("web2", "node-b");
    assert!(
        ip.starts_with("fd00:198:19:2::"),
        "web2 got {ip}, not from node-b's fd00:198:19:2::/64"
    );
    assert_eq!(
        lab.kube_shop_get("pod", "web2", "{.status.podIPs[*].ip}"),
        ip,
        "an IPv6-only pod has one address"
    );
    let web2_v4 = lab.exec("web2", &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(web2_v4.status.success(), "{web2_v4:?}");
    assert_eq!(
        String::from_utf8_lossy(&web2_v4.stdout).trim(),
        "",
        "IPv4 on web2"
    );
    let url = http_url(&ip, 8080);
    let get_from = |pod: &str, url: &str| {
        let out = lab.exec(pod, &["curl", "-sS", "-g", "--max-time", "2", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    until(
        "frontend reaches web2 over IPv6",
        Duration::from_secs(30),
        || get_from("frontend", &url).as_deref() == Some("hello from shop/web2\n"),
    );

    // A CNP made with kubectl: enforced on both nodes over IPv6.
    apply_enforced(&lab, WEB2_FROM_FRONTEND, "web2-from-frontend");
    until("intruder refused by web2", Duration::from_secs(30), || {
        get_from("intruder", &url).is_none()
    });
    assert_eq!(
        get_from("frontend", &url).as_deref(),
        Some("hello from shop/web2\n")
    );
    assert!(
        lab.drop_count("node-b", "policy-denied") >= 1,
        "intruder's IPv6 packets were not dropped policy-denied at node-b"
    );

    // A Service made with kubectl: its ClusterIP from the apiserver's IPv6 service CIDR, its
    // backend from the real controller's IPv6 EndpointSlice.
    lab.kubectl(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web2", "namespace": "shop"},
            "spec": {"selector": {"app": "web2"}, "ports": [{"port": 80, "targetPort": 8080}]}}"#,
    );
    let vip = lab.kube_shop_get("service", "web2", "{.spec.clusterIP}");
    assert!(vip.starts_with("fd00:198:16::"), "ClusterIP {vip}");
    until(
        "frontend reaches web2 through its IPv6 ClusterIP",
        Duration::from_secs(30),
        || get_from("frontend", &http_url(&vip, 80)).as_deref() == Some("hello from shop/web2\n"),
    );
    assert_eq!(
        get(&[
            "get",
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=web2",
            "-o",
            "jsonpath={.items[*].addressType}"
        ]),
        "IPv6"
    );

    // The product's leak check: only WireGuard, the control channel and the apiserver's TLS
    // cross the IPv6 underlay.
    let out = veil(&["check", "--name", &lab.name, "-o", "json"]);
    assert!(
        out.status.success(),
        "veil check failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["capture"]["marker_hits"], 0, "{report:#}");
    assert_eq!(report["capture"]["plaintext"], 0, "{report:#}");
    assert!(
        report["capture"]["wireguard"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}

/// A dual-stack underlay in Kubernetes mode, with node traffic encryption: each Node has two
/// InternalIPs, the agents' Kubernetes source reads both, node-a's peer for node-b allows node-b's
/// IPv6 address beside its IPv4 one (so traffic to it is tunnelled), and `veil check` sends its
/// node markers to both addresses and sees nothing in clear. Seen failing with the source
/// reading only the first InternalIP: node-b's IPv6 address was missing from the allowed IPs.
#[test]
fn dual_stack_underlay_nodes_have_both_internal_ips_and_node_traffic_to_both_is_tunnelled() {
    let lab = Lab::up(&[
        "--control-plane",
        "kubernetes",
        "--ip-family",
        "dual",
        "--underlay-family",
        "dual",
        "--node-encryption",
        "on",
    ]);
    let b_ips = lab.node("node-b").underlay_ips.clone();
    assert_eq!(b_ips, ["198.18.0.2", "fd00:198:18::2"], "lab show");
    let internal = lab.kubectl(
        &[
            "get",
            "node",
            "node-b",
            "-o",
            "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
        ],
        "",
    );
    assert_eq!(internal.split_whitespace().collect::<Vec<_>>(), b_ips);
    let st = lab.status("node-a");
    for want in ["198.18.0.2/32", "fd00:198:18::2/128"] {
        assert!(
            st.peers[0].allowed_ips.iter().any(|a| a == want),
            "node-b's {want} is not in node-a's peer: {:?}",
            st.peers[0].allowed_ips
        );
    }
    let out = veil(&["check", "--name", &lab.name, "-o", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "veil check failed: {report:#}");
    assert!(
        report["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "node node-a -> node node-b (IPv6)"),
        "veil check sent no node marker to node-b's IPv6 address: {report:#}"
    );
    assert_eq!(report["capture"]["marker_hits"], 0, "{report:#}");
    assert_eq!(report["capture"]["plaintext"], 0, "{report:#}");
}

#[test]
fn kubectl_pods_and_policies_on_a_kubernetes_lab() {
    let t0 = Instant::now();
    // Dual stack by its subject (IPv4 and IPv6 side by side; IPv6-only is
    // `ipv6_only_kubernetes_lab_*`).
    let lab = Lab::up(&["--control-plane", "kubernetes", "--ip-family", "dual"]);
    eprintln!("measured: kubernetes lab up in {:?}", t0.elapsed());
    assert_eq!(lab.view.control_plane, "kubernetes");
    let k = lab.view.kubernetes.clone().expect("kubernetes block");
    assert!(k.version.starts_with("v1."), "{k:?}");
    assert!(k.server.starts_with("https://127.0.0.1:"), "{k:?}");

    // The lab file's pods are Pods, Running at their addresses, made by the lab's kubelet.
    let pods: serde_json::Value =
        serde_json::from_str(&lab.kubectl(&["get", "pods", "-n", "shop", "-o", "json"], ""))
            .unwrap();
    let ips: Vec<(String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["status"]["podIP"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for name in ["frontend", "backend", "intruder"] {
        assert!(
            ips.contains(&(name.to_string(), lab.pod_ip(name))),
            "{name} is not a Pod at {}: {ips:?}",
            lab.pod_ip(name)
        );
    }

    // A Pod made with kubectl on node-b: an address from node-b's CIDR, reachable from frontend.
    let t0 = Instant::now();
    let ip = lab.make_web_pod("web2", "node-b");
    assert!(
        ip.starts_with("198.19.2."),
        "web2 got {ip}, not from node-b's 198.19.2.0/24"
    );
    let url = http_url(&ip, 8080);
    // Waits (30 s at most) until `pod` reaches web2 (`true`) or is refused (`false`).
    let reaches = |pod: &str, want: bool, when: &str| {
        let verb = if want { "reaches" } else { "is refused by" };
        let what = format!("{pod} {verb} web2 {when}");
        until(&what, Duration::from_secs(30), || {
            curl(&lab, pod, &url).is_ok() == want
        });
    };
    let frontend_is_served = || {
        assert_eq!(
            curl(&lab, "frontend", &url).as_deref(),
            Ok("hello from shop/web2\n")
        );
    };
    until("frontend reaches web2", Duration::from_secs(30), || {
        curl(&lab, "frontend", &url).is_ok_and(|b| b == "hello from shop/web2\n")
    });
    eprintln!(
        "measured: kubectl apply of a Pod -> first successful request {:?}",
        t0.elapsed()
    );
    let shown = Lab::show(&lab.name);
    let web2 = shown
        .pods
        .iter()
        .find(|p| p.name == "web2")
        .expect("lab show lists the kubectl-made pod");
    assert_eq!(web2.ip, ip);

    // Dual stack (the lab's default): node-b's Node has both pod CIDRs, web2 also got an IPv6
    // address from node-b's IPv6 range through veil-cni and host-local, its Pod status lists
    // both, and frontend reaches it over IPv6.
    assert_eq!(lab.view.ip_family, "dual");
    let cidrs = lab.kubectl(
        &["get", "node", "node-b", "-o", "jsonpath={.spec.podCIDRs}"],
        "",
    );
    assert_eq!(cidrs, r#"["198.19.2.0/24","fd00:198:19:2::/64"]"#);
    let pod_ips = lab.kube_shop_get("pod", "web2", "{.status.podIPs[*].ip}");
    let ip6 = pod_ips
        .split_whitespace()
        .find(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("web2's podIPs have no IPv6 address: {pod_ips:?}"))
        .to_string();
    assert!(
        ip6.starts_with("fd00:198:19:2::"),
        "web2 got {ip6}, not from node-b's fd00:198:19:2::/64"
    );
    assert_eq!(web2.ips, [ip.clone(), ip6.clone()], "lab show: {web2:?}");
    let url6 = format!("http://[{ip6}]:8080/");
    until(
        "frontend reaches web2 over IPv6",
        Duration::from_secs(30),
        || {
            lab.exec("frontend", &["curl", "-sS", "-g", "--max-time", "2", &url6])
                .stdout
                == b"hello from shop/web2\n"
        },
    );

    // Encrypted: a marker sent to it never crosses the underlay in clear, and WireGuard does.
    let marker = format!("VEIL-KUBE-MARKER-{}", rand_suffix());
    let cap = lab.capture_underlay();
    let body = lab.get_with_marker("frontend", &url, &marker);
    assert_eq!(body, "hello from shop/web2\n");
    let (raw, lines) = cap.stop_decoded();
    assert_encrypted(&lab, &raw, &lines, &marker);

    // The product's own leak check passes on a Kubernetes lab (the agents' apiserver traffic
    // on the underlay is control plane, not a leak).
    let check = veil_tests::veil(&["check", "--name", &lab.name, "-o", "json"]);
    assert!(
        check.status.success(),
        "veil check failed on a kubernetes lab: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A CiliumNetworkPolicy applied with kubectl admits frontend and drops intruder; its status
    // says both nodes enforce it; deleting it restores access.
    let t0 = Instant::now();
    apply_enforced(&lab, WEB2_FROM_FRONTEND, "web2-from-frontend");
    eprintln!(
        "measured: kubectl apply of a policy -> enforced on every node {:?}",
        t0.elapsed()
    );
    let denied = lab.drop_count("node-b", "policy-denied");
    assert!(
        curl(&lab, "intruder", &url).is_err(),
        "intruder reached web2 through the CNP"
    );
    assert!(
        lab.drop_count("node-b", "policy-denied") > denied,
        "intruder's SYN not counted as policy-denied"
    );
    frontend_is_served();
    lab.kubectl(&["delete", "cnp", "-n", "shop", "web2-from-frontend"], "");
    reaches("intruder", true, "after the CNP is deleted");

    // A NetworkPolicy works the same.
    lab.kubectl(&["apply", "-f", "-"], WEB2_NETPOL);
    reaches("intruder", false, "under the NetworkPolicy");
    frontend_is_served();
    lab.kubectl(&["delete", "networkpolicy", "-n", "shop", "web2"], "");
    reaches("intruder", true, "once the NetworkPolicy is gone");

    // A namespaceSelector on a namespace label follows the Namespace object: nobody is admitted
    // until shop is labelled team=trusted, everyone in shop then, nobody once relabelled.
    lab.kubectl(&["apply", "-f", "-"], WEB2_NETPOL_TRUSTED_NS);
    reaches("frontend", false, "while shop is not trusted");
    lab.kubectl(&["label", "namespace", "shop", "team=trusted"], "");
    until(
        "frontend admitted once shop is labelled team=trusted",
        Duration::from_secs(30),
        || curl(&lab, "frontend", &url).is_ok_and(|b| b == "hello from shop/web2\n"),
    );
    lab.kubectl(
        &["label", "--overwrite", "namespace", "shop", "team=other"],
        "",
    );
    reaches("frontend", false, "once shop is relabelled");
    lab.kubectl(
        &["delete", "networkpolicy", "-n", "shop", "web2-trusted"],
        "",
    );
    reaches("frontend", true, "once web2-trusted is gone");

    // `authentication: required` with a Pod made by kubectl: the lab's kubelet registered it
    // with SPIRE from its Pod object, so both ends have SVIDs and frontend is admitted (a pod
    // without one would be refused: fail closed).
    apply_enforced(&lab, WEB2_FROM_FRONTEND_AUTH, "web2-from-frontend-auth");
    until(
        "frontend reaches web2 with authentication required",
        Duration::from_secs(30),
        || curl(&lab, "frontend", &url).is_ok_and(|b| b == "hello from shop/web2\n"),
    );
    assert!(
        curl(&lab, "intruder", &url).is_err(),
        "intruder reached web2 through the auth CNP"
    );
    lab.kubectl(
        &["delete", "cnp", "-n", "shop", "web2-from-frontend-auth"],
        "",
    );

    // `veil policy` goes through the API in this mode: applied, reported per node from the
    // policy's status, listed, deleted; one veil cannot enforce (a bad HTTP rule) is reported refused.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let out = veil_tests::veil_ok(&[
        "policy",
        "apply",
        "--name",
        &lab.name,
        "-f",
        examples.join("backend-ingress.yaml").to_str().unwrap(),
    ]);
    for n in ["node-a", "node-b"] {
        assert!(
            out.contains(&format!("{n}: shop/backend-from-frontend enforced")),
            "{out}"
        );
    }
    let list = veil_tests::veil_ok(&["policy", "list", "--name", &lab.name]);
    assert!(list.contains("shop/backend-from-frontend"), "{list}");
    // An HTTP rule whose path is not a regular expression.
    let bad = std::fs::read_to_string(examples.join("frontend-to-backend-l7.yaml"))
        .expect("example")
        .replace("/api/products", "/api/[");
    let bad = veil_tests::TempFile::new(&format!("{}-bad-l7.yaml", lab.name), bad);
    let l7 = veil_tests::veil(&[
        "policy",
        "apply",
        "--name",
        &lab.name,
        "-f",
        bad.path.to_str().unwrap(),
    ]);
    // Refused before anything is sent, as in files mode (the same validation).
    let l7_err = String::from_utf8_lossy(&l7.stderr);
    assert!(
        !l7.status.success() && l7_err.contains("rules.http[0].path"),
        "{l7_err}"
    );
    veil_tests::veil_ok(&[
        "policy",
        "delete",
        "--name",
        &lab.name,
        "shop/backend-from-frontend",
    ]);
    let list = veil_tests::veil_ok(&["policy", "list", "--name", &lab.name]);
    assert!(!list.contains("shop/backend-from-frontend"), "{list}");

    // Deleting the Pod removes its namespace, releases its address and detaches the agent.
    let netns = web2.netns.clone();
    let veth = web2.host_veth.clone();
    delete_pod(&lab, "web2");
    assert!(
        !std::path::Path::new("/var/run/netns").join(&netns).exists(),
        "web2's netns {netns} is still there"
    );
    assert!(Lab::show(&lab.name).pods.iter().all(|p| p.name != "web2"));
    until(
        "node-b's agent detached from web2's veth",
        Duration::from_secs(30),
        || {
            lab.status("node-b")
                .programs
                .iter()
                .all(|p| p.interface != veth)
        },
    );
    let ipam = std::path::Path::new("/run/veil")
        .join(&lab.name)
        .join("kube/ipam/veil-node-b")
        .join(&ip);
    assert!(!ipam.exists(), "host-local still holds {ip}");
    // Its SPIRE registration is gone with it: the dev server issues no SVID for it any more.
    let control = std::path::Path::new("/run/veil")
        .join(&lab.name)
        .join("spire/control.sock");
    let dev: veil_agent::lab::spire::DevStatus = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(veil_agent::admin::get_json(&control, "/v1/status"))
        .expect("the dev SPIRE server's status");
    assert!(
        dev.svids
            .iter()
            .any(|v| v.pod.as_deref() == Some("shop/frontend")),
        "the status lists pods: {:?}",
        dev.svids
    );
    assert!(
        dev.svids
            .iter()
            .all(|v| v.pod.as_deref() != Some("shop/web2")),
        "web2 is still registered: {:?}",
        dev.svids
    );
    // The address is free again: the next Pod on node-b may take it, and it is reachable.
    let ip3 = lab.make_web_pod("web3", "node-b");
    until("frontend reaches web3", Duration::from_secs(30), || {
        curl(&lab, "frontend", &http_url(&ip3, 8080)).is_ok_and(|b| b == "hello from shop/web3\n")
    });
}

/// Scenario 23, pod churn with IP reuse, on node-a, at 100 churns a minute: `CHURNS` times a Pod
/// that web2's CNP admits (`app=frontend`) is deleted and a Pod it refuses (`app=intruder`) is
/// created at the same address. `SLOTS` addresses churn side by side, and a churn starts no
/// sooner than `PACE` after the one before, so the whole runs at 100 a minute at most (the
/// rate reached is printed). Each refused Pod sends to web2 from the moment `lab exec` finds
/// its namespace, `TRIES` fresh connections, and is never answered (NI: 0 successes, the first
/// packets included), while the admitted Pod before it was answered at that address (the
/// policy does not simply refuse everything, and the address was known as admitted).
#[test]
fn pod_churn_with_ip_reuse_admits_nothing_from_the_refused_pod() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CHURNS: usize = 100;
    const SLOTS: usize = 14;
    const PACE: Duration = Duration::from_millis(600);
    const TRIES: usize = 8;
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    let web2 = lab.make_web_pod("web2", "node-b");
    let url = http_url(&web2, 8080);
    apply_enforced(&lab, WEB2_FROM_FRONTEND, "web2-from-frontend");
    // The Pod's own address first (`ip -br`: `eth0@ifN UP <address>/32`), then fresh connections
    // with a 250 ms limit: one line per try, `200` when answered.
    let fam = if lab.view.ip_family == "ipv6" {
        "-6"
    } else {
        "-4"
    };
    let probe = format!(
        "ip {fam} -br addr show dev eth0; for i in $(seq {TRIES}); do curl -g -s -o /dev/null -w '%{{http_code}}\\n' --max-time 0.25 {url}; done; true"
    );
    // Exits 0 once answered at `$1` (60 s at most).
    let reach = format!(
        "ip {fam} -br addr show dev eth0 | grep -q \" $1/\" || exit 2; for i in $(seq 600); do curl -g -s -o /dev/null --max-time 0.25 {url} && exit 0; sleep 0.05; done; exit 1"
    );
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    // Per churn: (slot, its start after t0, time until the admitted Pod was answered, time from
    // the refused Pod's creation to its first try, its tries' output).
    let churns: Vec<(usize, Duration, Duration, Duration, String)> = std::thread::scope(|s| {
        let slots: Vec<_> = (0..SLOTS)
            .map(|slot| {
                let (lab, reach, probe, next) = (&lab, &reach, &probe, &next);
                s.spawn(move || {
                    // In node-a's pod CIDR, above the lab file's pods.
                    let reused = lab.pod_cidr_addr(1, 200 + slot as u16);
                    let (admitted, refused) = (format!("churn-a{slot}"), format!("churn-r{slot}"));
                    let mut done = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= CHURNS {
                            return done;
                        }
                        if let Some(wait) = (PACE * n as u32).checked_sub(t0.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let start = t0.elapsed();
                        lab.create_web_pod(&admitted, "node-a", "frontend", Some(&reused));
                        // Tries from inside the Pod (one `lab exec` once its namespace
                        // exists, not one per try: the churn's CPU is the machine's).
                        let answered = until(
                            &format!("{admitted} at {reused} reaches web2"),
                            Duration::from_secs(60),
                            || {
                                let argv = ["sh", "-c", reach, "reach", &reused];
                                lab.exec(&admitted, &argv).status.success()
                            },
                        );
                        delete_pod(lab, &admitted);
                        lab.create_web_pod(&refused, "node-a", "intruder", Some(&reused));
                        // From the first moment `lab exec` finds the Pod's namespace.
                        let created = Instant::now();
                        let (started, out) = loop {
                            let at = created.elapsed();
                            let out = lab.exec(&refused, &["sh", "-c", probe]);
                            if out.status.success() {
                                break (at, String::from_utf8_lossy(&out.stdout).into_owned());
                            }
                            assert!(
                                created.elapsed() < Duration::from_secs(60),
                                "no namespace for {refused}: {}",
                                String::from_utf8_lossy(&out.stderr)
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        };
                        let address = out.lines().next().unwrap_or_default();
                        assert!(
                            address.contains(&format!(" {reused}/")),
                            "{refused} is not at {reused}: {address}"
                        );
                        delete_pod(lab, &refused);
                        done.push((slot, start, answered, started, out));
                    }
                })
            })
            .collect();
        slots
            .into_iter()
            .flat_map(|h| h.join().expect("a churn slot failed"))
            .collect()
    });
    let took = t0.elapsed();
    let tries: usize = churns.iter().map(|c| c.4.lines().count() - 1).sum();
    let admitted: Vec<_> = churns
        .iter()
        .filter(|c| c.4.lines().any(|l| l == "200"))
        .collect();
    let max = |f: fn(&(usize, Duration, Duration, Duration, String)) -> Duration| {
        churns.iter().map(f).max().unwrap_or_default()
    };
    let last_start = max(|c| c.1);
    eprintln!(
        "pod churn: {} churns on {SLOTS} addresses started within {last_start:.1?} ({:.0} a \
         minute), all done in {took:.1?}; admitted Pods answered within {:?}; refused Pods \
         probed from at most {:?} after their creation; {} of {tries} tries answered",
        churns.len(),
        (churns.len() - 1) as f64 * 60.0 / last_start.as_secs_f64(),
        max(|c| c.2),
        max(|c| c.3),
        admitted
            .iter()
            .map(|c| c.4.lines().filter(|l| *l == "200").count())
            .sum::<usize>(),
    );
    assert_eq!(churns.len(), CHURNS);
    assert!(
        admitted.is_empty(),
        "refused Pods at a reused address reached web2 (slot, first try after creation, tries): {:?}",
        admitted.iter().map(|c| (c.0, c.3, &c.4)).collect::<Vec<_>>()
    );
}

/// Scenario 3, new-peer race: frontend (node-a) sends to an address on node-b before the Pod that
/// will have it exists, and goes on sending while it is created: a UDP datagram and an HTTP
/// request every round, both carrying a marker. NI: the marker never crosses the underlay in
/// clear, not in the first packets either (WireGuard does). NL: frontend is answered once the
/// Pod is known on both nodes; the time from `kubectl apply` to the first answer is printed.
#[test]
fn sends_to_a_pod_being_created_never_cross_the_underlay_in_clear() {
    use std::io::BufRead as _;
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    // In node-b's pod CIDR, above the lab file's pods.
    let new = lab.pod_cidr_addr(2, 200);
    let new_url = http_url(&new, 8080);
    let marker = format!("VEIL-NEW-PEER-{}", rand_suffix());
    let cap = lab.capture_underlay();
    // One line per round: the HTTP status (000 when not answered within 200 ms).
    let rounds = format!(
        "while :; do printf {marker} | ncat -u --send-only {new} 9999; \
         curl -g -s -o /dev/null -w '%{{http_code}}\\n' --max-time 0.2 {new_url}{marker}; done"
    );
    let mut client = lab
        .command_in("frontend", &["sh", "-c", &rounds])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn frontend's sender");
    let mut lines = std::io::BufReader::new(client.stdout.take().expect("piped")).lines();
    let mut next = || {
        lines
            .next()
            .expect("the sender ended")
            .expect("read its output")
    };
    // Sending before the Pod exists: refused, not answered.
    for _ in 0..3 {
        assert_eq!(next(), "000", "answered before the Pod exists");
    }
    let t0 = Instant::now();
    lab.create_web_pod("newcomer", "node-b", "newcomer", Some(&new));
    let mut refused = 0;
    while next() != "200" {
        refused += 1;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no answer 30 s after the Pod was applied"
        );
    }
    let answered = t0.elapsed();
    // Some more rounds on the established path, then the capture.
    for _ in 0..5 {
        next();
    }
    let _ = client.kill();
    let _ = client.wait();
    let (raw, lines) = cap.stop_decoded();
    eprintln!(
        "new peer: first answer {answered:?} after kubectl apply ({refused} rounds unanswered \
         while it was created)"
    );
    assert_encrypted(&lab, &raw, &lines, &marker);
}

/// Scenario 5, terminating pod: a Pod on node-a sends marked UDP datagrams to backend (node-b)
/// at line rate (as fast as it can; the rate is printed) while it is deleted with kubectl. NI:
/// through its whole teardown (the lab's kubelet stopping it, CNI DEL, the agent letting go of
/// its veth) nothing crosses the underlay in clear, in a capture of every frame but WireGuard's
/// that lost none; the tunnel carried the datagrams (node-a's peer counters). Then the other
/// end: a Pod on node-b that frontend sends to the same way is deleted; what still comes for its
/// address crosses encrypted and node-b drops it as `endpoint-gone`, counted.
#[test]
fn a_pod_deleted_while_sending_leaks_nothing_in_its_teardown() {
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    let marker = format!("VEIL-TEARDOWN-{}", rand_suffix());
    let backend = lab.pod_ip("backend");
    lab.make_web_pod("leaver", "node-a");
    let cap = veil_tests::Capture::start_lossless_but_wireguard(
        &lab.view.underlay.netns,
        &lab.view.underlay.bridge,
    );
    let tunnel_before = tunnel_tx(&lab);
    let mut child = send_marked_udp(&lab, "leaver", &marker, &backend);
    // Sending before the deletion: node-a's datapath counts the Pod's packets.
    until(
        "leaver's datagrams counted at its veth",
        Duration::from_secs(10),
        || sent_by(&lab, "node-a", "leaver") > 2_000,
    );
    let rate = send_rate(&lab, "leaver");
    let t0 = Instant::now();
    delete_pod(&lab, "leaver");
    let deleted = t0.elapsed();
    // The sender outlives its Pod (a process keeps its namespace); a second more of it.
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.kill();
    let _ = child.wait();
    let (raw, lines) = cap.stop_decoded();
    let carried = tunnel_tx(&lab) - tunnel_before;
    eprintln!(
        "terminating pod: sending {rate} datagrams a second, deleted in {deleted:?}; {carried} bytes through node-a's tunnel; {} frames other than WireGuard captured",
        lines.len()
    );
    assert_nothing_in_clear(&raw, &lines, &marker);
    assert!(
        carried > 2_000 * marker.len() as u64,
        "the datagrams did not go through node-a's tunnel ({carried} bytes)"
    );

    // The receiving end deleted.
    let goner = lab.make_web_pod("goner", "node-b");
    let gone_drops = |lab: &Lab| {
        let st = lab.status("node-b");
        st.drops.get("endpoint-gone").copied().unwrap_or(0)
    };
    let before = gone_drops(&lab);
    let cap = veil_tests::Capture::start_lossless_but_wireguard(
        &lab.view.underlay.netns,
        &lab.view.underlay.bridge,
    );
    // Frontend's count from before its sender started.
    let sent_before = sent_by(&lab, "node-a", "frontend");
    let mut child = send_marked_udp(&lab, "frontend", &marker, &goner);
    until(
        "frontend's datagrams to goner counted at its veth",
        Duration::from_secs(10),
        || sent_by(&lab, "node-a", "frontend") > sent_before + 2_000,
    );
    let rate = send_rate(&lab, "frontend");
    delete_pod(&lab, "goner");
    until(
        "node-b dropping frontend's datagrams for goner's address as endpoint-gone",
        Duration::from_secs(10),
        || gone_drops(&lab) > before + 1_000,
    );
    let _ = child.kill();
    let _ = child.wait();
    let (raw, lines) = cap.stop_decoded();
    eprintln!(
        "deleted receiver: frontend sending {rate} datagrams a second; {} datagrams for its address dropped endpoint-gone at node-b",
        gone_drops(&lab) - before
    );
    assert_nothing_in_clear(&raw, &lines, &marker);
}

/// Bytes node-a's tunnel sent to node-b (veil-wg's transfer counters, wire bytes).
fn tunnel_tx(lab: &Lab) -> u64 {
    lab.status("node-a")
        .peers
        .iter()
        .filter(|p| p.node == "node-b")
        .map(|p| p.tx_bytes)
        .sum()
}

/// Datagrams a second Pod `shop/<pod>` on node-a sends, over half a second of its counter.
fn send_rate(lab: &Lab, pod: &str) -> u64 {
    let (t, n) = (Instant::now(), sent_by(lab, "node-a", pod));
    std::thread::sleep(Duration::from_millis(500));
    let sent = sent_by(lab, "node-a", pod) - n;
    (sent as f64 / t.elapsed().as_secs_f64()) as u64
}

/// A capture of every frame but WireGuard's holds no marker, no pod address (198.19.0.0/16 or
/// fd00:198:19::/48; the nodes are 198.18.0.0/24 or fd00:198:18::/64) and nothing to the
/// senders' port.
fn assert_nothing_in_clear(raw: &[u8], lines: &[String], marker: &str) {
    assert!(
        !contains(raw, marker.as_bytes()),
        "the marker crossed the underlay in clear"
    );
    let clear: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(" 198.19.") || l.contains(" fd00:198:19:") || l.contains(".9999:"))
        .collect();
    assert!(clear.is_empty(), "pod traffic in clear: {clear:#?}");
}

/// Starts, in `pod`, a Python program sending datagrams holding `marker` to `dst` port 9999 as
/// fast as it can, ignoring send errors.
fn send_marked_udp(lab: &Lab, pod: &str, marker: &str, dst: &str) -> std::process::Child {
    let program = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6 if ':' in '{dst}' else socket.AF_INET, socket.SOCK_DGRAM)\n\
         while True:\n\
         \x20   try: s.sendto(b'{marker}', ('{dst}', 9999))\n\
         \x20   except OSError: pass\n"
    );
    lab.command_in(pod, &["python3", "-c", &program])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {pod}'s sender: {e}"))
}

/// Packets `node`'s datapath counted from Pod `shop/<pod>` (interface counters count what a
/// pod sends).
fn sent_by(lab: &Lab, node: &str, pod: &str) -> u64 {
    let pod = format!("shop/{pod}");
    lab.status(node)
        .interfaces
        .iter()
        .find(|i| i.pod.as_deref() == Some(pod.as_str()))
        .map_or(0, |i| i.packets)
}

/// Deletes Pod `shop/<name>` with kubectl, waiting (up to 30 s) until it is gone.
fn delete_pod(lab: &Lab, name: &str) {
    lab.kubectl(
        &["delete", "pod", "-n", "shop", name, "--timeout", "30s"],
        "",
    );
}

/// Admits service account `frontend` only, by Cilium's service-account label.
const WEB2_FROM_SA_FRONTEND: &str = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
  "metadata": {"name": "web2-from-sa-frontend", "namespace": "shop"},
  "spec": {"endpointSelector": {"matchLabels": {"app": "web2"}},
           "ingress": [{"fromEndpoints": [{"matchLabels":
                          {"k8s:io.cilium.k8s.policy.serviceaccount": "frontend"}}],
                        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}"#;

/// Scenario 24, identity attribute tampering: web2 admits service account `frontend` only.
/// intruder (service account `intruder`) labels its running Pod with the service-account and
/// namespace keys the identity is made of (`frontend`, `kube-system`) and with `app=frontend`.
/// NI: its identity takes the ordinary label (node-b's drop records show `app=frontend`, so
/// the agents saw the change) and neither reserved key, and every request from it, before and
/// after, is refused; frontend stays admitted.
#[test]
fn a_pod_labelling_itself_with_identity_keys_gains_nothing() {
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    let web2 = lab.make_web_pod("web2", "node-b");
    let url = http_url(&web2, 8080);
    apply_enforced(&lab, WEB2_FROM_SA_FRONTEND, "web2-from-sa-frontend");
    until("frontend reaches web2", Duration::from_secs(30), || {
        curl(&lab, "frontend", &url).is_ok()
    });
    assert!(curl(&lab, "intruder", &url).is_err(), "intruder admitted");
    lab.kubectl(
        &[
            "label",
            "--overwrite",
            "pod",
            "-n",
            "shop",
            "intruder",
            "app=frontend",
            "io.cilium.k8s.policy.serviceaccount=frontend",
            "io.kubernetes.pod.namespace=kube-system",
        ],
        "",
    );
    // intruder's labels as node-b's records of its refused requests show them.
    let refused_labels = || -> Option<Vec<String>> {
        assert!(
            curl(&lab, "intruder", &url).is_err(),
            "intruder admitted after labelling itself"
        );
        let flows = lab.observe(&["--node", "node-b", "--verdict", "DROPPED"]);
        let relabelled = flows.into_iter().rev().find(|f| {
            f["src"]["pod"] == "intruder"
                && f["src"]["labels"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|l| l == "app=frontend"))
        })?;
        let labels = relabelled["src"]["labels"].as_array()?;
        Some(
            labels
                .iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect(),
        )
    };
    let labels = lab.wait_for(
        "node-b refusing intruder with its new app label",
        Duration::from_secs(30),
        refused_labels,
    );
    eprintln!("intruder's identity labels after it labelled itself: {labels:?}");
    assert!(
        labels
            .iter()
            .all(|l| !l.contains("serviceaccount") && !l.contains("pod.namespace")),
        "a reserved key reached intruder's identity: {labels:?}"
    );
    for _ in 0..5 {
        assert!(curl(&lab, "intruder", &url).is_err(), "intruder admitted");
    }
    assert!(curl(&lab, "frontend", &url).is_ok(), "frontend refused");
}

/// Scenario 25, auth-state GC: frontend -> web2 under `authentication: required` (web2's ingress,
/// enforced on node-b) leaves an entry in node-b's kernel auth map. NI: deleting the policy
/// empties both nodes' maps within the agents' 10 s grace for pairs no longer needed (the time
/// is printed); with the policy back, frontend is admitted only after a new handshake (a later
/// `authenticated_unix_ms` on node-b); deleting web2 (its identity leaves the cluster) empties
/// them again; with web2 back and frontend admitted, deleting node-a's Node empties node-b's map
/// at once (within 5 s, not after the grace) and frontend is refused.
#[test]
fn auth_entries_go_with_their_policy_and_their_identity() {
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    let web2 = lab.make_web_pod("web2", "node-b");
    let url = http_url(&web2, 8080);
    let entries = |node: &str| {
        let maps = lab.status(node).maps;
        let auth = maps.iter().find(|m| m.name == "VEIL_AUTH");
        auth.expect("veil status lists VEIL_AUTH").entries
    };
    let both_empty = || entries("node-a") == 0 && entries("node-b") == 0;
    // When node-b's newest handshake for a pair completed (Unix ms).
    let handshake_at = || {
        let pairs = lab.status("node-b").auth;
        pairs
            .iter()
            .map(|p| p.authenticated_unix_ms)
            .max()
            .unwrap_or(0)
    };
    let admitted = |what: &str| {
        apply_enforced(&lab, WEB2_FROM_FRONTEND_AUTH, "web2-from-frontend-auth");
        until(what, Duration::from_secs(30), || {
            curl(&lab, "frontend", &url).is_ok()
        });
    };
    admitted("frontend admitted under the auth policy");
    assert!(entries("node-b") > 0, "no auth entry on node-b");
    let first = handshake_at();
    assert!(first > 0, "no authenticated pair on node-b");
    lab.kubectl(
        &["delete", "cnp", "-n", "shop", "web2-from-frontend-auth"],
        "",
    );
    let after_policy = until(
        "auth entries gone with the policy",
        Duration::from_secs(30),
        both_empty,
    );
    admitted("frontend admitted again with the policy back");
    let second = handshake_at();
    assert!(second > first, "no new handshake: {first} then {second}");
    delete_pod(&lab, "web2");
    let after_identity = until(
        "auth entries gone with web2",
        Duration::from_secs(30),
        both_empty,
    );
    // The node: web2 back and frontend admitted again, then frontend's Node deleted (the last
    // step of a node's removal; nothing in the lab registers it again): node-b forgets node-a
    // and every entry that names it.
    let web2 = lab.make_web_pod("web2", "node-b");
    let url = http_url(&web2, 8080);
    until(
        "frontend admitted with web2 back",
        Duration::from_secs(30),
        || curl(&lab, "frontend", &url).is_ok(),
    );
    assert!(
        entries("node-b") > 0,
        "no auth entry on node-b with web2 back"
    );
    lab.kubectl(&["delete", "node", "node-a", "--timeout", "30s"], "");
    // At once, not after the 10 s grace of pairs no longer needed (a pair of a node that left
    // cannot be used again).
    let after_node = until(
        "node-b's auth entries gone with node-a",
        Duration::from_secs(5),
        || entries("node-b") == 0,
    );
    let st = lab.status("node-b");
    eprintln!(
        "auth GC: entries gone {after_policy:?} after the policy's deletion, \
         {after_identity:?} after web2's, {after_node:?} after node-a's; node-b then: {:?}; node-a: {:?}",
        st.auth,
        lab.try_status("node-a").map(|s| (s.ready, s.auth.len())),
    );
    assert!(
        curl(&lab, "frontend", &url).is_err(),
        "frontend still admitted without its node"
    );
}

#[test]
fn kubernetes_lab_leak_pair_plaintext_shows_marker() {
    // The other half of the leak pair: with encryption off, the same capture sees the marker.
    let lab = Lab::up(&["--control-plane", "kubernetes", "--encryption", "off"]);
    let ip = lab.make_web_pod("web2", "node-b");
    let url = http_url(&ip, 8080);
    until("frontend reaches web2", Duration::from_secs(30), || {
        curl(&lab, "frontend", &url).is_ok()
    });
    let marker = format!("VEIL-KUBE-MARKER-{}", rand_suffix());
    let cap = lab.capture_underlay();
    lab.get_with_marker("frontend", &url, &marker);
    let (raw, lines) = cap.stop_decoded();
    assert!(
        contains(&raw, marker.as_bytes()),
        "the capture did not see the marker: {lines:#?}"
    );
}

/// The pid of the lab's process whose command line starts with `program` and names `needle`.
fn pid_of(program: &str, needle: &str) -> i32 {
    let out = Command::new("pgrep")
        .args(["-f", &format!("^\\S*{program} .*{needle}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {program} process naming {needle}"))
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

#[test]
fn a_kubernetes_lab_rides_out_an_apiserver_restart_and_an_etcd_stop() {
    use nix::sys::signal::Signal;
    let lab = Lab::up(&["--control-plane", "kubernetes"]);
    let kube_dir = format!("/run/veil/{}/kube", lab.name);
    // frontend may reach backend's HTTP and echo ports; intruder nothing.
    let policy = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
      "metadata": {"name": "backend-from-frontend", "namespace": "shop"},
      "spec": {"endpointSelector": {"matchLabels": {"app": "backend"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"},
                                                   {"port": "9000", "protocol": "ANY"}]}]}]}}"#;
    apply_enforced(&lab, policy, "backend-from-frontend");
    let backend = lab.pod_url("backend", 8080);
    assert!(curl(&lab, "intruder", &backend).is_err());
    let agents: Vec<u32> = ["node-a", "node-b"]
        .iter()
        .map(|n| lab.status(n).agent.pid)
        .collect();
    let load = lab.echo_load("frontend", 500, 100);
    load.wait_flowing(&lab);

    // kube-client logs each failed request of the agents' watches at ERROR while the
    // apiserver is away ("failed with error …") or etcd stopped (the apiserver's own 5xx:
    // "failed with status …").
    lab.expect_log_lines(&["failed with error", "failed with status 5"]);
    // kube-apiserver killed (the lab's supervisor starts it again): enforcement stays.
    signal(pid_of("kube-apiserver", &kube_dir), Signal::SIGKILL);
    assert!(
        curl(&lab, "intruder", &backend).is_err(),
        "intruder admitted while the apiserver was down"
    );
    until("kube-apiserver back", Duration::from_secs(60), || {
        let k = lab.view.kubernetes.as_ref().unwrap();
        Command::new(&k.kubectl)
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args(["get", "--raw", "/readyz", "--request-timeout", "2s"])
            .output()
            .is_ok_and(|o| o.status.success())
    });

    // etcd stopped for 30 s: the agents keep their last state, traffic flows, intruder stays out.
    let etcd = pid_of("etcd", &kube_dir);
    signal(etcd, Signal::SIGSTOP);
    veil_tests::sample_for(Duration::from_secs(30), Duration::from_secs(3), |_| {
        assert!(
            curl(&lab, "intruder", &backend).is_err(),
            "intruder admitted while etcd was stopped"
        );
    });
    signal(etcd, Signal::SIGCONT);

    // A change made once the control plane is back reaches the agents.
    lab.kubectl(
        &["delete", "cnp", "-n", "shop", "backend-from-frontend"],
        "",
    );
    until(
        "intruder admitted after the CNP is deleted",
        Duration::from_secs(60),
        || curl(&lab, "intruder", &backend).is_ok(),
    );
    let (tcp, udp) = load.finish();
    veil_tests::assert_all_echoed(&tcp, &udp, 500);
    let after: Vec<u32> = ["node-a", "node-b"]
        .iter()
        .map(|n| lab.status(n).agent.pid)
        .collect();
    assert_eq!(agents, after, "an agent restarted");
    for n in ["node-a", "node-b"] {
        assert!(
            lab.status(n).ready,
            "{n}'s agent not ready after the faults"
        );
    }
}

/// (entries, capacity) of one of a node's maps as its `veil status` reports them.
fn map_fill(lab: &Lab, node: &str, map: &str) -> (usize, u32) {
    lab.status(node)
        .maps
        .iter()
        .find(|m| m.name == map)
        .map(|m| (m.entries, m.capacity))
        .unwrap_or_else(|| panic!("{map} in {node}'s status"))
}

/// [`map_fill`] of the ipcache (the identity table: address → identity, node).
fn ipcache_fill(lab: &Lab, node: &str) -> (usize, u32) {
    map_fill(lab, node, veil_common::maps::IPCACHE)
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent's stat");
    // After the command's closing parenthesis, utime and stime are the 12th and 13th fields,
    // in clock ticks (100 a second).
    let after = &stat[stat.rfind(')').expect("stat's command") + 2..];
    let f: Vec<u64> = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|t| t.parse().expect("a tick count"))
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// node-b's ipcache made with room for `IPCACHE_ROOM` entries (its agent's `map_max_entries`).
const SMALL_IPCACHE_LAB: &str = "control_plane: kubernetes
nodes: [{name: node-a}, {name: node-b, map_max_entries: {VEIL_IPCACHE: 24}}]
";
const IPCACHE_ROOM: usize = 24;

/// Scenario 34, the identity table (ipcache) full at runtime. node-b's ipcache is made small
/// (`map_max_entries`, 24 entries) and filled with real Pods on node-a, while web2 (node-b)
/// admits `app=frontend`. Then:
/// - a new Pod `newcomer` labelled `app=frontend` cannot get its entry on node-b, which judges
///   its address by node-a's pod-CIDR entry (unknown identity) and refuses it, counted
///   `policy-denied` on node-b (NI: fail closed; no entry is evicted to make room); frontend,
///   known before, stays admitted (NL). The failure is raised: node-b's `veil status` names
///   the ipcache in `reconcile_error`, and `veil_reconcile_failing` is 1;
/// - an admitted Pod at 198.19.1.201 is deleted: the entry it frees goes to newcomer, which is
///   admitted; a refused Pod (`app=intruder`) created at the same address finds no room and is
///   refused (the admitted Pod's identity did not stay with the address);
/// - the agent warned once for all of it (its counts moved at every pass);
/// - two filler Pods deleted, the refused Pod gets its own entry and is still refused, and the
///   reconcile error clears.
#[test]
fn a_full_identity_table_refuses_new_pods_and_keeps_known_ones() {
    let lab = Lab::up_with_file(SMALL_IPCACHE_LAB, &[]);
    let reused = lab.pod_cidr_addr(1, 201);
    assert_eq!(ipcache_fill(&lab, "node-b").1 as usize, IPCACHE_ROOM);
    let web2 = lab.make_web_pod("web2", "node-b");
    let url = http_url(&web2, 8080);
    apply_enforced(&lab, WEB2_FROM_FRONTEND, "web2-from-frontend");
    lab.create_web_pod("churn-admitted", "node-a", "frontend", Some(&reused));
    until(
        "the admitted Pod reaches web2",
        Duration::from_secs(30),
        || curl(&lab, "churn-admitted", &url).is_ok(),
    );
    curl(&lab, "frontend", &url).expect("frontend served before the table is full");

    // Real Pods on node-a fill node-b's table: their entries are the cluster's, so the agent
    // keeps them (an entry written from outside it would remove as stale).
    let mut fillers = 0;
    while ipcache_fill(&lab, "node-b").0 < IPCACHE_ROOM {
        let before = ipcache_fill(&lab, "node-b").0;
        lab.create_web_pod(&format!("filler-{fillers}"), "node-a", "filler", None);
        fillers += 1;
        until(
            "node-b's ipcache to take the filler Pod",
            Duration::from_secs(30),
            || ipcache_fill(&lab, "node-b").0 > before,
        );
    }
    assert!(
        fillers >= 2,
        "node-b's ipcache was full after {fillers} filler Pods"
    );
    eprintln!("node-b's ipcache full with {fillers} filler Pods");

    // A new Pod node-b cannot learn.
    lab.create_web_pod("newcomer", "node-a", "frontend", None);
    let denied_before = lab.drop_count("node-b", "policy-denied");
    until(
        "newcomer's requests to reach node-b and be refused there",
        Duration::from_secs(30),
        || {
            assert!(
                curl(&lab, "newcomer", &url).is_err(),
                "newcomer was admitted with node-b's identity table full"
            );
            lab.drop_count("node-b", "policy-denied") > denied_before
        },
    );
    for _ in 0..10 {
        assert!(
            curl(&lab, "newcomer", &url).is_err(),
            "newcomer was admitted with node-b's identity table full"
        );
    }
    curl(&lab, "frontend", &url).expect("frontend refused with the table full");
    let st = lab.status("node-b");
    assert_eq!(ipcache_fill(&lab, "node-b").0, IPCACHE_ROOM);
    let error = assert_reconcile_failing(&lab, "node-b", "ipcache");
    let (pid, cpu0, at0) = (st.agent.pid, cpu_time(st.agent.pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let failing_cpu = (cpu_time(pid) - cpu0).as_secs_f64() / at0.elapsed().as_secs_f64();

    // The admitted Pod goes: newcomer takes its entry; a refused Pod at its address finds no
    // room.
    delete_pod(&lab, "churn-admitted");
    let deleted = Instant::now();
    until("newcomer to be admitted", Duration::from_secs(30), || {
        curl(&lab, "newcomer", &url).is_ok()
    });
    let newcomer_in = deleted.elapsed();
    lab.create_web_pod("churn-refused", "node-a", "intruder", Some(&reused));
    let mut refused = 0;
    until(
        "churn-refused's requests to be refused",
        Duration::from_secs(30),
        || {
            let out = lab.exec("churn-refused", &["curl", "-sS", "--max-time", "0.5", &url]);
            assert!(
                !out.status.success(),
                "churn-refused at {reused} reached web2 with the table full"
            );
            // Counted once its namespace exists (`lab exec` finds it).
            if String::from_utf8_lossy(&out.stderr).contains("curl:") {
                refused += 1;
            }
            refused >= 10
        },
    );
    assert_eq!(lab.kube_pod_ip("churn-refused"), reused);
    assert!(
        lab.status("node-b").reconcile_error.is_some(),
        "node-b took churn-refused's entry with its table full"
    );

    // The agent said so once per failure, not at every pass whose counts moved. (IPv6-only, a
    // Pod takes one entry, not two: newcomer's admission fits the table and the failure ends,
    // logged as recovered, before churn-refused starts a second one.)
    let log = std::fs::read_to_string(&lab.node("node-b").agent_log).expect("node-b's agent log");
    let warned = log.matches("reconcile failed; retrying").count();
    let recovered = log.matches("reconcile recovered").count();
    assert_eq!(
        warned,
        recovered + 1,
        "node-b warned {warned} times of its full ipcache and recovered {recovered} times"
    );
    assert!(
        warned <= 2,
        "node-b warned {warned} times of its full ipcache"
    );

    // Room again (a Pod takes two entries, IPv4 and IPv6: churn-refused's and what is left of
    // the last filler's need two Pods gone).
    delete_pod(&lab, "filler-0");
    delete_pod(&lab, "filler-1");
    until(
        "node-b's reconcile error to clear",
        Duration::from_secs(15),
        || lab.status("node-b").reconcile_error.is_none(),
    );
    assert!(
        curl(&lab, "churn-refused", &url).is_err(),
        "churn-refused admitted once node-b knew it"
    );
    curl(&lab, "frontend", &url).expect("frontend refused after the table had room");
    println!(
        "node-b's ipcache ({IPCACHE_ROOM} entries) full with {fillers} filler Pods: newcomer \
         refused (policy-denied on node-b), frontend served, reconcile_error {error:?}; node-b's \
         agent used {:.1} % of a core while failing; the admitted Pod deleted, newcomer admitted \
         {newcomer_in:?} later; churn-refused at the freed address refused {refused} times",
        failing_cpu * 100.0
    );
}

/// node-b's node table (VEIL_NODES) with room for the lab's two nodes and one more.
const SMALL_NODE_TABLE_LAB: &str = "control_plane: kubernetes
nodes: [{name: node-a}, {name: node-b, map_max_entries: {VEIL_NODES: 3}}]
";

/// A Node object as a kubelet would leave it (podCIDR, InternalIP, Ready), with no kubelet or
/// agent behind it: nothing answers at its address.
fn add_simulated_node(lab: &Lab, name: &str, pod_cidr: &str, underlay_ip: &str) {
    lab.kubectl(
        &["apply", "-f", "-"],
        &format!(
            r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{name}"}},
               "spec": {{"podCIDR": "{pod_cidr}", "podCIDRs": ["{pod_cidr}"]}}}}"#
        ),
    );
    let status = format!(
        r#"{{"status": {{"addresses": [{{"type": "InternalIP", "address": "{underlay_ip}"}}],
           "conditions": [{{"type": "Ready", "status": "True", "reason": "Simulated",
                           "message": "no kubelet"}}]}}}}"#
    );
    lab.kubectl(&veil_tests::status_patch("node", name, &status), "");
}

/// `node`'s reconcile fails naming `map`, in `veil status` and in `veil_reconcile_failing`; the
/// error.
fn assert_reconcile_failing(lab: &Lab, node: &str, map: &str) -> String {
    let error = lab.status(node).reconcile_error.unwrap_or_default();
    assert!(error.contains(map), "{node}'s reconcile error: {error:?}");
    assert!(
        lab.metrics(node)
            .lines()
            .any(|l| l == "veil_reconcile_failing 1"),
        "{node}: veil_reconcile_failing is not 1"
    );
    error
}

/// [`map_fill`] of the node table.
fn node_table_fill(lab: &Lab, node: &str) -> (usize, u32) {
    map_fill(lab, node, veil_common::maps::NODES)
}

/// The keys of map `name` as `node`'s kernel holds them (bpftool's JSON of its pin).
fn pinned_keys(lab: &Lab, node: &str, name: &str) -> Vec<serde_json::Value> {
    let pin = format!("{}/{name}", lab.status(node).agent.pin_dir);
    let out = veil_tests::run_ok(
        std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned", &pin]),
    );
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).expect("bpftool's JSON");
    let mut keys: Vec<_> = entries.into_iter().map(|e| e["key"].clone()).collect();
    keys.sort_by_key(|k| k.to_string());
    keys
}

/// Scenario 34, the node table (the WireGuard peers' side of the datapath) full at runtime.
/// node-b's VEIL_NODES has room for 3 nodes (`map_max_entries`); the lab has 2. A Node joins
/// with kubectl and takes the last entry; a second cannot get one. NI: traffic from backend
/// (node-b) to the second Node's pod CIDR is dropped on node-b (`no-key`, counted) and nothing
/// crosses the underlay in clear (a lossless capture of every frame but WireGuard's); no entry
/// is evicted for it. NL: frontend (node-a) -> backend stays served. The failure is raised: the
/// reconcile error names the node table and `veil_reconcile_failing` is 1. The first extra Node
/// deleted, the second takes its entry and the error clears.
#[test]
fn a_full_node_table_refuses_new_nodes_and_keeps_known_ones() {
    let lab = Lab::up_with_file(SMALL_NODE_TABLE_LAB, &[]);
    assert_eq!(node_table_fill(&lab, "node-b"), (2, 3));
    let url = lab.pod_url("backend", 8080);
    curl(&lab, "frontend", &url).expect("frontend served before");

    // A simulated node `id`: its pod CIDR and underlay address in the lab's family.
    let sim = |name: &str, id: u8| {
        let cidr = if lab.view.ip_family == "ipv6" {
            format!("fd00:198:19:{id}::/64")
        } else {
            format!("198.19.{id}.0/24")
        };
        add_simulated_node(&lab, name, &cidr, &lab.node_underlay_addr(id));
    };
    sim("sim-1", 61);
    until(
        "node-b's node table to take sim-1",
        Duration::from_secs(15),
        || node_table_fill(&lab, "node-b").0 == 3,
    );
    assert_eq!(lab.status("node-b").reconcile_error, None);
    let keys_full = pinned_keys(&lab, "node-b", veil_common::maps::NODES);
    assert_eq!(keys_full.len(), 3, "{keys_full:?}");
    sim("sim-2", 62);
    lab.wait_for(
        "node-b to report its node table full",
        Duration::from_secs(15),
        || lab.status("node-b").reconcile_error,
    );
    let error = assert_reconcile_failing(&lab, "node-b", "node table");
    assert_eq!(
        pinned_keys(&lab, "node-b", veil_common::maps::NODES),
        keys_full,
        "an entry of node-b's full node table was replaced for sim-2"
    );

    // Traffic for the Node without an entry: dropped on node-b, never in clear.
    let cap = veil_tests::Capture::start_lossless_but_wireguard(
        &lab.view.underlay.netns,
        &lab.view.underlay.bridge,
    );
    let no_key_before = lab.drop_count("node-b", "no-key");
    let marker = format!("VEIL-NODE-TABLE-{}", rand_suffix());
    let mut sender = send_marked_udp(&lab, "backend", &marker, &lab.pod_cidr_addr(62, 10));
    until(
        "node-b dropping backend's datagrams for sim-2 as no-key",
        Duration::from_secs(10),
        || lab.drop_count("node-b", "no-key") > no_key_before + 1_000,
    );
    let _ = sender.kill();
    let _ = sender.wait();
    let (raw, lines) = cap.stop_decoded();
    assert_nothing_in_clear(&raw, &lines, &marker);
    let dropped = lab.drop_count("node-b", "no-key") - no_key_before;
    // The known node keeps its entry, with its key: frontend stays served.
    for _ in 0..5 {
        curl(&lab, "frontend", &url).expect("frontend refused with node-b's node table full");
    }

    // Room again: sim-2 takes sim-1's entry, the error clears.
    lab.kubectl(&["delete", "node", "sim-1"], "");
    until(
        "node-b's reconcile error to clear",
        Duration::from_secs(15),
        || lab.status("node-b").reconcile_error.is_none(),
    );
    assert_eq!(node_table_fill(&lab, "node-b"), (3, 3));
    curl(&lab, "frontend", &url).expect("frontend served after");
    println!(
        "node-b's node table (3 entries) full with sim-1: sim-2 refused, reconcile_error \
         {error:?}; {dropped} datagrams for sim-2's pod CIDR dropped no-key on node-b, none in \
         clear; frontend served throughout; sim-1 deleted, sim-2 took its entry"
    );
}
