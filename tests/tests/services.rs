//! End-to-end: Services balanced at the socket (services issue). A ClusterIP is translated to a
//! ready backend by the cgroup sock_addr programs once per connection (per datagram for
//! unconnected UDP); the application still sees the ClusterIP (getpeername, recvfrom); policy is
//! decided on the backend; flow records name the Service; a Service without a ready backend
//! refuses at once.

use std::time::Duration;

use veil_tests::{http_url, Lab};

/// Only frontend may reach backend, on TCP 8080.
const INGRESS: &str = include_str!("../../examples/policies/backend-ingress.yaml");

/// Connects to ADDR:PORT over TCP, prints getpeername() and the first line of an HTTP GET's
/// answer body; or `refused` / the error's name.
const TCP_PROBE: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((host, port))
except ConnectionRefusedError:
    print("refused"); sys.exit(0)
except OSError as e:
    print("error", e.__class__.__name__, e.errno); sys.exit(0)
peer = s.getpeername()
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
print(peer[0], peer[1], body)
"#;

/// Sends one UDP datagram unconnected to ADDR:PORT and prints where the answer came from
/// (recvfrom) and what it said.
const UDP_PROBE: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"ping-via-service", (host, port))
data, src = s.recvfrom(2048)
print(src[0], src[1], data.decode())
"#;

fn tcp_probe(lab: &Lab, pod: &str, host: &str, port: u16) -> String {
    lab.exec_ok(pod, &["python3", "-c", TCP_PROBE, host, &port.to_string()])
        .trim()
        .to_string()
}

#[test]
fn clusterip_reaches_the_backend_shows_the_service_and_policy_applies_to_the_backend() {
    let lab = Lab::up(&[]);
    let svc = lab.service("backend");
    assert_eq!(svc.namespace, "shop");
    // From the service CIDR of the lab's first family (IPv6 in an IPv6-only lab).
    assert!(
        svc.cluster_ip.starts_with("198.18.16.") || svc.cluster_ip.starts_with("fd00:198:16::"),
        "ClusterIP from the service CIDR: {}",
        svc.cluster_ip
    );
    assert_eq!(
        svc.cluster_ips,
        std::slice::from_ref(&svc.cluster_ip),
        "single stack"
    );
    assert_eq!(
        (
            svc.ports[0].port,
            svc.ports[0].target_port,
            svc.ports[0].protocol.as_str()
        ),
        (80, 8080, "TCP")
    );
    let backend_ip = lab.pod_ip("backend");
    assert_eq!(svc.backends.len(), 1, "{:?}", svc.backends);
    assert_eq!(svc.backends[0].pod, "shop/backend");
    assert_eq!(svc.backends[0].ip, backend_ip);
    let vip = svc.cluster_ip.clone();

    // Through the ClusterIP, across nodes (frontend on node-a, backend on node-b); the socket
    // still names the ClusterIP and port 80.
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip, 80),
        format!("{vip} 80 hello from shop/backend")
    );
    // A dual-stack socket reaching an IPv4 ClusterIP as an IPv4-mapped address.
    if !vip.contains(':') {
        assert_eq!(
            tcp_probe(&lab, "frontend", &format!("::ffff:{vip}"), 80),
            format!("::ffff:{vip} 80 hello from shop/backend")
        );
    }
    assert_eq!(
        lab.http_get("frontend", &http_url(&vip, 80)),
        "hello from shop/backend\n"
    );

    // The flow record names the Service; the direct one does not.
    lab.http_get("intruder", &lab.pod_url("backend", 8080));
    let flows = lab.observe(&["--node", "node-a"]);
    let via = flows
        .iter()
        .find(|f| f["src"]["pod"] == "frontend" && f["dst"]["pod"] == "backend")
        .unwrap_or_else(|| panic!("no frontend -> backend flow in {flows:#?}"));
    assert_eq!(via["service"], "shop/backend", "{via:#}");
    assert_eq!(via["dst"]["port"], 8080);
    assert_eq!(via["encrypted"], true);
    let direct = flows
        .iter()
        .find(|f| f["src"]["pod"] == "intruder" && f["dst"]["pod"] == "backend")
        .unwrap_or_else(|| panic!("no intruder -> backend flow in {flows:#?}"));
    assert!(direct.get("service").is_none(), "{direct:#}");

    // Every node balances the Service; status lists it and the socket programs.
    for node in ["node-a", "node-b"] {
        let st = lab.status(node);
        let s = st
            .services
            .iter()
            .find(|s| s.name == "backend")
            .unwrap_or_else(|| panic!("{node}: no service in status: {:?}", st.services));
        assert_eq!(s.cluster_ip, vip);
        assert_eq!(s.backends[0].ip, backend_ip);
        let sock = &st.socket_programs;
        assert_eq!(sock.len(), 8, "{node}: socket programs {sock:?}");
    }

    // A restarted agent replaces its socket links (make before break) and Services keep
    // working.
    let before = lab.status("node-a");
    let after = lab.restart_agent(
        "restarted agent",
        "node-a",
        before.agent.pid,
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(after.socket_programs.len(), 8);
    assert!(
        after.socket_programs.iter().all(|p| p.adopted),
        "{:?}",
        after.socket_programs
    );
    let cgroup = &after.socket_programs[0].interface;
    let attached = std::process::Command::new("bpftool")
        .args(["cgroup", "show", cgroup])
        .output()
        .expect("run bpftool");
    let listing = String::from_utf8_lossy(&attached.stdout);
    assert_eq!(
        listing.matches("cgroup_inet4_connect").count(),
        1,
        "the earlier agent's link is still attached:\n{listing}"
    );
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip, 80),
        format!("{vip} 80 hello from shop/backend")
    );

    // Policy is decided on the backend: intruder may not reach it through the ClusterIP.
    lab.apply_policy_ok(INGRESS);
    lab.expect_drops(&["policy-denied"]);
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip, 80),
        format!("{vip} 80 hello from shop/backend")
    );
    assert!(
        lab.try_get("intruder", &http_url(&vip, 80)).is_err(),
        "intruder reached backend through the ClusterIP despite the policy"
    );
    let drops = lab.observe(&["--node", "node-b", "--verdict", "DROPPED"]);
    let denied = drops
        .iter()
        .find(|f| f["src"]["pod"] == "intruder" && f["dst"]["pod"] == "backend")
        .unwrap_or_else(|| panic!("no intruder -> backend drop in {drops:#?}"));
    assert_eq!(denied["drop_reason"], "policy-denied");
}

/// Two backends, a Service without any, a UDP Service and a ClientIP-affinity Service.
const LAB: &str = "pods:
- {name: frontend, namespace: shop, node: node-a, labels: {app: frontend}}
- {name: backend, namespace: shop, node: node-b, labels: {app: backend, echo: 'yes'}, serve: [{port: 8080, kind: http}, {port: 9000, kind: echo}]}
- {name: backend-2, namespace: shop, node: node-a, labels: {app: backend}, serve: [{port: 8080, kind: http}]}
services:
- {name: backend, namespace: shop, selector: {app: backend}, ports: [{port: 80, target_port: 8080}]}
- {name: sticky, namespace: shop, selector: {app: backend}, ports: [{port: 80, target_port: 8080}], session_affinity: ClientIP}
- {name: nobody, namespace: shop, selector: {app: nothing}, ports: [{port: 80, target_port: 8080}]}
- {name: echo, namespace: shop, selector: {echo: 'yes'}, ports: [{port: 53, target_port: 9000, protocol: UDP}]}
";

#[test]
fn backends_are_spread_affinity_sticks_no_backend_refuses_and_udp_answers_from_the_service() {
    let lab = Lab::up_with_file(LAB, &[]);
    let spread = lab.service("backend").cluster_ip.clone();
    let sticky = lab.service("sticky").cluster_ip.clone();
    let nobody = lab.service("nobody").cluster_ip.clone();
    assert_eq!(lab.service("backend").backends.len(), 2);
    assert!(lab.service("nobody").backends.is_empty());
    assert_eq!(lab.service("sticky").session_affinity, "ClientIP");

    // Random choice per connection: 24 connections reach both backends (all on one: 2^-23).
    let bodies: std::collections::BTreeSet<String> = (0..24)
        .map(|_| lab.http_get("frontend", &http_url(&spread, 80)))
        .collect();
    assert_eq!(
        bodies.into_iter().collect::<Vec<_>>(),
        ["hello from shop/backend\n", "hello from shop/backend-2\n"],
        "connections to the ClusterIP were not spread over both backends"
    );
    // ClientIP affinity: every connection from frontend's namespace lands on one backend.
    let sticky_bodies: std::collections::BTreeSet<String> = (0..12)
        .map(|_| lab.http_get("frontend", &http_url(&sticky, 80)))
        .collect();
    assert_eq!(sticky_bodies.len(), 1, "affinity broke: {sticky_bodies:?}");

    // No ready backend: refused at once (ECONNREFUSED), not a connection that hangs, counted.
    assert_eq!(tcp_probe(&lab, "frontend", &nobody, 80), "refused");
    assert!(
        lab.drop_count("node-a", "service-no-backend") >= 1,
        "the refusal was not counted"
    );
    lab.expect_drops(&["service-no-backend"]);

    // Unconnected UDP: translated per datagram, the answer seems to come from the Service.
    let echo = lab.service("echo").cluster_ip.clone();
    let out = lab.exec_ok("frontend", &["python3", "-c", UDP_PROBE, &echo, "53"]);
    assert_eq!(out.trim(), format!("{echo} 53 ping-via-service"));

    // A pod's own traffic to a pod IP is never translated (the backend answers as itself).
    let direct = lab.pod_ip("backend");
    assert_eq!(
        tcp_probe(&lab, "frontend", &direct, 8080),
        format!("{direct} 8080 hello from shop/backend")
    );
}

/// A dual-stack Service (both families) and an IPv6-only one in a dual-stack lab.
const DUAL_LAB: &str = "ip_family: dual
pods:
- {name: frontend, namespace: shop, node: node-a, labels: {app: frontend}}
- {name: backend, namespace: shop, node: node-b, labels: {app: backend}, serve: [{port: 8080, kind: http}, {port: 9000, kind: echo}]}
services:
- {name: backend, namespace: shop, selector: {app: backend}, ip_family_policy: RequireDualStack, ports: [{name: http, port: 80, target_port: 8080}, {name: echo, port: 53, target_port: 9000, protocol: UDP}]}
- {name: six, namespace: shop, selector: {app: backend}, cluster_ip: 'fd00:198:16::66', ports: [{port: 80, target_port: 8080}]}
";

/// Each ClusterIP of a dual-stack Service is balanced over the backends' addresses of its own
/// family: an IPv6 client reaches the backend over IPv6 through the IPv6 ClusterIP, still sees
/// the ClusterIP, and the flow record names the Service.
#[test]
fn a_dual_stack_service_balances_each_cluster_ip_over_the_backends_of_its_family() {
    let lab = Lab::up_with_file(DUAL_LAB, &[]);
    let svc = lab.service("backend");
    assert_eq!(svc.cluster_ips.len(), 2, "{svc:?}");
    let (vip4, vip6) = (svc.cluster_ips[0].clone(), svc.cluster_ips[1].clone());
    assert_eq!(svc.cluster_ip, vip4);
    assert!(vip4.starts_with("198.18.16."), "{vip4}");
    assert!(vip6.starts_with("fd00:198:16::"), "{vip6}");
    let (be4, be6) = (lab.pod_ip("backend"), lab.pod_ip6("backend"));
    let mut backends: Vec<&str> = svc.backends.iter().map(|b| b.ip.as_str()).collect();
    backends.sort_unstable();
    let mut both = [be4.as_str(), be6.as_str()];
    both.sort_unstable();
    assert_eq!(backends, both, "one backend per family");

    // IPv6 first (flow events of one identity pair and port are throttled to one a second).
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip6, 80),
        format!("{vip6} 80 hello from shop/backend")
    );
    let via6 = lab.wait_for_flow(
        "node-a's record of frontend -> backend over IPv6",
        &["--node", "node-a"],
        |f| f["src"]["pod"] == "frontend" && f["dst"]["pod"] == "backend" && f["dst"]["ip"] == be6,
    );
    assert_eq!(via6["service"], "shop/backend", "{via6:#}");
    assert_eq!(via6["dst"]["port"], 8080);
    assert_eq!(via6["encrypted"], true);
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip4, 80),
        format!("{vip4} 80 hello from shop/backend")
    );
    // Unconnected UDP over IPv6: translated per datagram, answered as the ClusterIP.
    let out = lab.exec_ok("frontend", &["python3", "-c", UDP_PROBE, &vip6, "53"]);
    assert_eq!(out.trim(), format!("{vip6} 53 ping-via-service"));

    // The IPv6-only Service: its one ClusterIP is the given one, its backends IPv6 only.
    let six = lab.service("six");
    assert_eq!(six.cluster_ips, ["fd00:198:16::66"]);
    assert_eq!(
        six.backends
            .iter()
            .map(|b| b.ip.as_str())
            .collect::<Vec<_>>(),
        [be6.as_str()]
    );
    assert_eq!(
        tcp_probe(&lab, "frontend", "fd00:198:16::66", 80),
        "fd00:198:16::66 80 hello from shop/backend"
    );
    // An address of the IPv6 service CIDR that is no Service is left alone (no route: an
    // error, not a translation).
    assert_ne!(
        tcp_probe(&lab, "frontend", "fd00:198:16::67", 80),
        "fd00:198:16::67 80 hello from shop/backend"
    );
}

/// A Pod whose only container cannot start: it gets an address, never becomes Ready (one that
/// exits is Ready for a moment after each restart).
const CRASHING_POD: &str = r#"{"apiVersion": "v1", "kind": "Pod",
  "metadata": {"name": "crashing", "namespace": "shop", "labels": {"app": "web1"}},
  "spec": {"nodeName": "node-b", "containers": [{"name": "main", "image": "ignored", "command": ["/nonexistent/no-such-binary"]}]}}"#;

/// Kubernetes mode: Services made with kubectl, their backends from the EndpointSlices the real
/// kube-controller-manager writes (the target port as the slice gives it), a Pod that is not
/// Ready never chosen.
#[test]
fn kubernetes_services_follow_endpointslices_and_skip_pods_that_are_not_ready() {
    // Dual stack: kube-apiserver gets both service CIDRs.
    let lab = Lab::up(&["--control-plane", "kubernetes", "--ip-family", "dual"]);
    // The lab's own Service, made as a Service object with the ClusterIP the lab allocated.
    let vip = lab.service("backend").cluster_ip.clone();
    assert_eq!(
        tcp_probe(&lab, "frontend", &vip, 80),
        format!("{vip} 80 hello from shop/backend")
    );

    let web_ip = lab.make_web_pod("web1", "node-a");
    lab.kubectl(&["apply", "-f", "-"], CRASHING_POD);
    lab.kubectl(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web1"}, "ipFamilyPolicy": "PreferDualStack",
                     "ports": [{"name": "http", "port": 8081, "targetPort": 8080}]}}"#,
    );
    let web_vips = lab.kube_shop_get("service", "web", "{.spec.clusterIPs[*]}");
    let web_vip6 = web_vips
        .split_whitespace()
        .find(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no IPv6 ClusterIP in {web_vips:?}"))
        .to_string();
    assert!(web_vip6.starts_with("fd00:198:16::"), "{web_vip6}");
    let web_vip = lab.kube_shop_get("service", "web", "{.spec.clusterIP}");
    let crashing_ip = lab.wait_for(
        "the crashing pod's address",
        Duration::from_secs(30),
        || {
            let ip = lab.kube_pod_ip("crashing");
            (!ip.is_empty()).then_some(ip)
        },
    );
    // Both nodes learn both endpoints, the crashing one not ready.
    for node in ["node-a", "node-b"] {
        lab.wait_for(
            &format!("{node} balances shop/web"),
            Duration::from_secs(30),
            || {
                let st = lab.status(node);
                let s = st.services.iter().find(|s| s.name == "web")?;
                let ready = |ip: &str| s.backends.iter().find(|b| b.ip == ip).map(|b| b.ready);
                // web1's IPv6 address, from the IPv6 EndpointSlice.
                let ready6 = s.backends.iter().any(|b| b.ready && b.ip.contains(':'));
                (s.cluster_ip == web_vip
                    && s.cluster_ips.contains(&web_vip6)
                    && s.ports[0].target_port == 8080
                    && ready(&web_ip) == Some(true)
                    && ready6
                    && ready(&crashing_ip) == Some(false))
                .then_some(())
            },
        );
    }
    // Every connection goes to the ready pod (with the crashing one chosen half of them would
    // fail).
    for vip in std::iter::repeat_n([&web_vip, &web_vip6], 6).flatten() {
        assert_eq!(
            tcp_probe(&lab, "frontend", vip, 8081),
            format!("{vip} 8081 hello from shop/web1")
        );
    }
    // Without its ready pod the Service refuses at once.
    lab.kubectl(&["delete", "pod", "-n", "shop", "web1", "--wait=false"], "");
    lab.wait_for(
        "web1 gone from node-a's table",
        Duration::from_secs(30),
        || {
            let st = lab.status("node-a");
            let s = st.services.iter().find(|s| s.name == "web")?;
            s.backends.iter().all(|b| !b.ready).then_some(())
        },
    );
    assert_eq!(tcp_probe(&lab, "frontend", &web_vip, 8081), "refused");
    assert_eq!(tcp_probe(&lab, "frontend", &web_vip6, 8081), "refused");
    lab.expect_drops(&["service-no-backend"]);
}
