//! The lab's Kubernetes control plane (`control_plane: kubernetes`): etcd and kube-apiserver in
//! the lab's underlay namespace, a CA and certificates the lab makes, RBAC on, and the shipped
//! `deploy/` manifests (CRDs, the agent's ServiceAccount and ClusterRole, the node guard)
//! applied verbatim. Each node's agent reaches the apiserver over the underlay with a token of
//! that ServiceAccount bound to its Node, as a DaemonSet pod would; the host reaches it through
//! a loopback forwarder (`veil lab api-proxy`), so the admin kubeconfig works where `veil lab`
//! runs. The lab plays kubelet for its nodes (`kubelet.rs`).
//!
//! Addresses: the apiserver listens on 198.18.0.253:6443 (the underlay bridge), etcd on the
//! underlay namespace's own loopback; Services take 198.18.16.0/20. Nothing leaves the lab.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use super::{
    spec::{self, LabSpec},
    supervisor::Managed,
    Error, LabPaths, Progress, Result, Wait,
};
use crate::sys;

/// The apiserver's address on the underlay bridge.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 253);
/// The same on an IPv6 underlay (an IPv6-only lab).
pub const API_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0xfd);

/// The apiserver's address in a lab of `family`: on the underlay's family.
pub fn api_ip(family: spec::IpFamily) -> IpAddr {
    if family.v6_underlay() {
        API_IP6.into()
    } else {
        API_IP.into()
    }
}

/// `https://<apiserver>:6443`, an IPv6 address in brackets.
pub fn api_url(family: spec::IpFamily) -> String {
    format!("https://{}", SocketAddr::new(api_ip(family), API_PORT))
}
pub const API_PORT: u16 = 6443;
/// The agents' ServiceAccount, as `deploy/rbac.yaml` ships it.
pub const AGENT_NAMESPACE: &str = "veil-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "veil";

/// What `deploy/` ships, applied as it is.
const DEPLOY: [(&str, &str); 6] = [
    (
        "namespace.yaml",
        include_str!("../../../deploy/namespace.yaml"),
    ),
    (
        "crds/cilium.io_ciliumnetworkpolicies.yaml",
        include_str!("../../../deploy/crds/cilium.io_ciliumnetworkpolicies.yaml"),
    ),
    (
        "crds/cilium.io_ciliumclusterwidenetworkpolicies.yaml",
        include_str!("../../../deploy/crds/cilium.io_ciliumclusterwidenetworkpolicies.yaml"),
    ),
    (
        "crds/veil.dev_veilidentities.yaml",
        include_str!("../../../deploy/crds/veil.dev_veilidentities.yaml"),
    ),
    ("rbac.yaml", include_str!("../../../deploy/rbac.yaml")),
    (
        "node-guard.yaml",
        include_str!("../../../deploy/node-guard.yaml"),
    ),
];

pub fn dir(paths: &LabPaths) -> PathBuf {
    paths.root.join("kube")
}

pub fn admin_kubeconfig(paths: &LabPaths) -> PathBuf {
    dir(paths).join("admin.kubeconfig")
}

pub fn node_kubeconfig(paths: &LabPaths, node: &str) -> PathBuf {
    dir(paths).join(format!("{node}.kubeconfig"))
}

/// Written once the control plane is bootstrapped: the kubelets start after it.
/// kube-controller-manager's kubeconfig: the apiserver on the underlay, the admin credentials
/// (a lab shortcut: a cluster gives it its own identity).
fn controller_kubeconfig(paths: &LabPaths) -> PathBuf {
    dir(paths).join("controller-manager.kubeconfig")
}

pub fn bootstrapped(paths: &LabPaths) -> PathBuf {
    dir(paths).join("bootstrapped")
}

fn proxy_port_file(paths: &LabPaths) -> PathBuf {
    dir(paths).join("api-proxy.port")
}

/// A Kubernetes binary (`etcd`, `kube-apiserver`, `kubectl`, ...) ([`super::tool`]).
pub fn tool(name: &str) -> std::result::Result<PathBuf, String> {
    super::tool(name)
        .map_err(|e| format!("`control_plane: kubernetes` needs {e}; or use --control-plane files"))
}

pub fn check_tools() -> std::result::Result<(), String> {
    for t in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ] {
        tool(t)?;
    }
    Ok(())
}

/// The `kubernetes` block of `veil lab show -o json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubeView {
    pub kubeconfig: PathBuf,
    pub server: String,
    pub version: String,
    pub kubectl: PathBuf,
}

/// The block for a running lab (`version` is the kube-apiserver binary's, read once at up).
pub fn view(paths: &LabPaths) -> Option<KubeView> {
    let port = std::fs::read_to_string(proxy_port_file(paths)).ok()?;
    Some(KubeView {
        kubeconfig: admin_kubeconfig(paths),
        server: format!("https://127.0.0.1:{}", port.trim()),
        version: std::fs::read_to_string(dir(paths).join("version"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default(),
        kubectl: tool("kubectl").unwrap_or_else(|_| "kubectl".into()),
    })
}

fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    sys::write_atomic(path, data.as_ref()).map_err(Error::from)
}

fn pki_err(what: &str, e: rcgen::Error) -> Error {
    Error::Prerequisite(format!("making the lab's Kubernetes {what}: {e}"))
}

/// A certificate signed by `ca`, its key, as PEM.
fn issue(
    ca: &Issuer<'_, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(|e| pki_err("key", e))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, ca).map_err(|e| pki_err(cn, e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA, the apiserver's serving certificate, the admin client certificate (group
/// system:masters), the service-account signing key, the admin kubeconfig and the port of the
/// loopback forwarder. Everything under `kube/` in the lab directory (0600 keys).
pub fn prepare(spec: &LabSpec, paths: &LabPaths) -> Result<()> {
    let d = dir(paths);
    std::fs::create_dir_all(d.join("pki")).map_err(|source| Error::Write {
        path: d.join("pki"),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(|e| pki_err("CA key", e))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("veil lab {} kubernetes CA", paths.name),
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).map_err(|e| pki_err("CA", e))?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let ip = |a: IpAddr| SanType::IpAddress(a);
    let dns = |n: &str| SanType::DnsName(n.try_into().expect("static DNS name"));
    let (srv, srv_key) = issue(
        &issuer,
        "kube-apiserver",
        None,
        vec![
            ip(api_ip(spec.ip_family)),
            ip(Ipv4Addr::LOCALHOST.into()),
            // The `kubernetes` Service: the first address of the first service CIDR.
            ip(kubernetes_service_ip(spec.ip_family)),
            dns("localhost"),
            dns("kubernetes"),
            dns("kubernetes.default"),
            dns("kubernetes.default.svc"),
            dns("kubernetes.default.svc.cluster.local"),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (adm, adm_key) = issue(
        &issuer,
        "veil-lab-admin",
        Some("system:masters"),
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let sa_key = KeyPair::generate().map_err(|e| pki_err("service-account key", e))?;
    let pki = d.join("pki");
    write(&pki.join("ca.crt"), &ca_pem)?;
    write(&pki.join("apiserver.crt"), &srv)?;
    write(&pki.join("apiserver.key"), &srv_key)?;
    write(&pki.join("admin.crt"), &adm)?;
    write(&pki.join("admin.key"), &adm_key)?;
    write(&pki.join("sa.key"), sa_key.serialize_pem())?;
    write(&pki.join("sa.pub"), sa_key.public_key_pem())?;
    // The admin's client certificate: for the host's kubectl (through the forwarder below) and
    // for kube-controller-manager (straight to the apiserver on the underlay).
    let admin_user = format!(
        "    client-certificate: {}\n    client-key: {}\n",
        pki.join("admin.crt").display(),
        pki.join("admin.key").display()
    );
    write(
        &controller_kubeconfig(paths),
        kubeconfig(&api_url(spec.ip_family), &pki.join("ca.crt"), &admin_user),
    )?;

    // The forwarder's port: a free one now, below the ephemeral range (32768-60999) so no
    // outgoing connection takes it before `api-proxy` binds it (a lost race to another listener
    // fails `up` with the proxy's log).
    let port = (0..200)
        .map(|_| rand::random_range(20000..32000u16))
        .find(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).is_ok())
        .ok_or_else(|| Error::Prerequisite("no free port on 127.0.0.1 in 20000-31999".into()))?;
    write(&proxy_port_file(paths), format!("{port}\n"))?;
    write(
        &admin_kubeconfig(paths),
        kubeconfig(
            &format!("https://127.0.0.1:{port}"),
            &pki.join("ca.crt"),
            &admin_user,
        ),
    )?;
    let version = Command::new(tool("kube-apiserver").map_err(Error::Prerequisite)?)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    write(
        &d.join("version"),
        version.trim_start_matches("Kubernetes ").to_string() + "\n",
    )?;
    Ok(())
}

/// A kubeconfig trusting the lab's CA (a file path) with `user` lines for the credentials.
fn kubeconfig(server: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: user\n  user:\n{user}contexts:\n- name: lab\n  \
         context: {{cluster: lab, user: user}}\ncurrent-context: lab\n",
        ca.display()
    )
}

/// etcd and kube-apiserver (underlay namespace), the loopback forwarder (host) and one kubelet
/// per node (host; each starts once the control plane is bootstrapped).
pub fn managed(spec: &LabSpec, paths: &LabPaths, exe: &Path) -> Vec<Managed> {
    let ul = spec::underlay_netns(&spec.name);
    let d = dir(paths);
    let pki = d.join("pki");
    let s = |p: PathBuf| p.display().to_string();
    let bin = |t: &str| s(tool(t).unwrap_or_else(|_| t.into()));
    let cg = paths.cgroup.join("kube");
    let mut out = vec![
        Managed::new(
            paths,
            "etcd".into(),
            vec![
                bin("etcd"),
                "--name".into(),
                "lab".into(),
                "--data-dir".into(),
                s(d.join("etcd")),
                "--listen-client-urls".into(),
                "http://127.0.0.1:2379".into(),
                "--advertise-client-urls".into(),
                "http://127.0.0.1:2379".into(),
                "--listen-peer-urls".into(),
                "http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls".into(),
                "http://127.0.0.1:2380".into(),
                "--initial-cluster".into(),
                "lab=http://127.0.0.1:2380".into(),
                "--unsafe-no-fsync".into(),
                "--log-level".into(),
                "warn".into(),
            ],
            Some(ul.clone()),
            cg.join("etcd"),
        ),
        Managed::new(
            paths,
            "kube-apiserver".into(),
            vec![
                bin("kube-apiserver"),
                "--etcd-servers".into(),
                "http://127.0.0.1:2379".into(),
                "--bind-address".into(),
                api_ip(spec.ip_family).to_string(),
                "--secure-port".into(),
                API_PORT.to_string(),
                "--advertise-address".into(),
                api_ip(spec.ip_family).to_string(),
                "--tls-cert-file".into(),
                s(pki.join("apiserver.crt")),
                "--tls-private-key-file".into(),
                s(pki.join("apiserver.key")),
                "--client-ca-file".into(),
                s(pki.join("ca.crt")),
                "--cert-dir".into(),
                s(d.join("cert-dir")),
                "--authorization-mode".into(),
                "Node,RBAC".into(),
                "--allow-privileged=true".into(),
                "--service-account-key-file".into(),
                s(pki.join("sa.pub")),
                "--service-account-signing-key-file".into(),
                s(pki.join("sa.key")),
                "--service-account-issuer".into(),
                "https://kubernetes.default.svc.cluster.local".into(),
                "--service-cluster-ip-range".into(),
                service_cidrs(spec.ip_family),
                "--profiling=false".into(),
                // No kube-controller-manager runs here, so no namespace gets its `default`
                // ServiceAccount: without this, a Pod made with kubectl in a new namespace would
                // be refused. (The agents' tokens come from the TokenRequest API, unaffected.)
                "--disable-admission-plugins=ServiceAccount".into(),
            ],
            Some(ul.clone()),
            cg.join("kube-apiserver"),
        ),
        // Only the EndpointSlice controller: Services' backends, from the Pods' readiness.
        Managed {
            start_after: Some(bootstrapped(paths)),
            ..Managed::new(
                paths,
                "kube-controller-manager".into(),
                vec![
                    bin("kube-controller-manager"),
                    "--kubeconfig".into(),
                    s(controller_kubeconfig(paths)),
                    "--controllers=endpointslice".into(),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                    "--concurrent-service-endpoint-syncs=2".into(),
                ],
                Some(ul),
                cg.join("kube-controller-manager"),
            )
        },
        Managed::new(
            paths,
            "api-proxy".into(),
            vec![
                s(exe.to_path_buf()),
                "lab".into(),
                "api-proxy".into(),
                "--name".into(),
                spec.name.clone(),
            ],
            None,
            cg.join("api-proxy"),
        ),
    ];
    for n in &spec.nodes {
        out.push(Managed {
            start_after: Some(bootstrapped(paths)),
            ..Managed::new(
                paths,
                format!("kubelet-{}", n.name),
                vec![
                    s(exe.to_path_buf()),
                    "lab".into(),
                    "kubelet".into(),
                    "--name".into(),
                    spec.name.clone(),
                    "--node".into(),
                    n.name.clone(),
                ],
                None,
                paths.node_cgroup(&n.name).join("kubelet"),
            )
        });
    }
    out
}

/// The cgroups the control plane's processes run in (created by `lab up`).
pub fn cgroups(spec: &LabSpec, paths: &LabPaths) -> Vec<PathBuf> {
    let cg = paths.cgroup.join("kube");
    let mut v = vec![
        cg.clone(),
        cg.join("etcd"),
        cg.join("kube-apiserver"),
        cg.join("kube-controller-manager"),
        cg.join("api-proxy"),
    ];
    v.extend(
        spec.nodes
            .iter()
            .map(|n| paths.node_cgroup(&n.name).join("kubelet")),
    );
    v
}

/// `veil lab api-proxy`: forwards 127.0.0.1:<port> on the host to the apiserver in the underlay
/// namespace, one thread pair per connection (TLS passes through untouched). Runs until killed.
pub fn api_proxy(spec: &LabSpec, paths: &LabPaths) -> Result<()> {
    let port: u16 = std::fs::read_to_string(proxy_port_file(paths))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| {
            Error::Prerequisite("kube/api-proxy.port is missing or unreadable".into())
        })?;
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|source| Error::Write {
            path: proxy_port_file(paths),
            source,
        })?;
    let api = SocketAddr::new(api_ip(spec.ip_family), API_PORT);
    eprintln!(
        "api-proxy: 127.0.0.1:{port} -> {api} in {}",
        spec::underlay_netns(&spec.name)
    );
    let ul = spec::underlay_netns(&spec.name);
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let ul = ul.clone();
        std::thread::spawn(move || {
            let upstream = sys::in_netns(&ul, move || {
                TcpStream::connect_timeout(&api, Duration::from_secs(5))
            });
            match upstream {
                Ok(Ok(up)) => splice(client, up),
                Ok(Err(e)) => eprintln!("api-proxy: connect {api}: {e}"),
                Err(e) => eprintln!("api-proxy: enter {ul}: {e}"),
            }
        });
    }
    Ok(())
}

/// Copies both directions until either side closes.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    };
    let t = std::thread::spawn(move || pump(a2, b));
    pump(b2, a);
    let _ = t.join();
}

/// Runs the real kubectl with the admin kubeconfig; its stderr is the error.
pub fn kubectl(paths: &LabPaths, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let bin = tool("kubectl").map_err(Error::Prerequisite)?;
    let cfg = admin_kubeconfig(paths);
    let mut all = vec!["--kubeconfig", cfg.to_str().expect("lab paths are UTF-8")];
    all.extend_from_slice(args);
    sys::run(
        bin.to_str().expect("tool paths are UTF-8"),
        &all,
        stdin.map(str::as_bytes),
    )
    .map_err(Error::from)
}

/// After the apiserver answers: the shipped manifests, the lab's nodes as Node objects
/// (podCIDR, InternalIP), a Node-bound ServiceAccount token and kubeconfig per agent, the pods'
/// namespaces and ServiceAccounts, and the default topology's pods as Pods. Then the kubelets'
/// start gate.
pub(crate) fn bootstrap(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    wait: &Wait<'_>,
) -> Result<()> {
    loop {
        if matches!(kubectl(paths, &["get", "--raw", "/readyz", "--request-timeout", "3s"], None), Ok(ref o) if o.trim() == "ok")
        {
            break;
        }
        wait.keep_waiting(|waited| {
            Error::not_ready("kube-apiserver", waited, paths.log("kube-apiserver"))
        })?;
        std::thread::sleep(Duration::from_millis(200));
    }
    progress.step(format!(
        "kube-apiserver ready at {} (etcd in {})",
        api_url(spec.ip_family),
        spec::underlay_netns(&spec.name)
    ));
    let all: String = DEPLOY
        .iter()
        .map(|(_, y)| format!("{}\n---\n", y.trim_end()))
        .collect();
    kubectl(paths, &["apply", "--server-side", "-f", "-"], Some(&all))?;
    kubectl(
        paths,
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout",
            "60s",
            "crd/ciliumnetworkpolicies.cilium.io",
            "crd/ciliumclusterwidenetworkpolicies.cilium.io",
            "crd/veilidentities.veil.dev",
        ],
        None,
    )?;
    progress.step("deploy/ applied: CRDs, RBAC, node guard");
    let ca = dir(paths).join("pki/ca.crt");
    for n in &spec.nodes {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
            "spec": {"podCIDR": n.pod_cidr,
                     "podCIDRs": n.pod_cidrs()},
        });
        kubectl(
            paths,
            &["apply", "--server-side", "-f", "-"],
            Some(&node.to_string()),
        )?;
        // Every underlay address is an InternalIP (a dual-stack underlay's node has two).
        let mut addresses: Vec<serde_json::Value> = n
            .underlay_ips()
            .iter()
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        addresses.push(serde_json::json!({"type": "Hostname", "address": n.name}));
        let status = serde_json::json!({"status": {
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "VeilLab",
                            "message": "the lab plays kubelet"}],
        }});
        kubectl(
            paths,
            &[
                "patch",
                "node",
                &n.name,
                "--subresource",
                "status",
                "--type",
                "merge",
                "-p",
                &status.to_string(),
            ],
            None,
        )?;
        let token = kubectl(
            paths,
            &[
                "create",
                "token",
                AGENT_SERVICE_ACCOUNT,
                "-n",
                AGENT_NAMESPACE,
                "--bound-object-kind",
                "Node",
                "--bound-object-name",
                &n.name,
                "--duration",
                "720h",
            ],
            None,
        )?;
        write(
            &node_kubeconfig(paths, &n.name),
            kubeconfig(
                &api_url(spec.ip_family),
                &ca,
                &format!("    token: {}\n", token.trim()),
            ),
        )?;
    }
    progress.step(format!(
        "{} Node object(s), one agent token each",
        spec.nodes.len()
    ));
    let mut objects = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in &spec.pods {
        if seen.insert(p.namespace.clone()) {
            objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": p.namespace}}));
        }
        if seen.insert(format!("{}/{}", p.namespace, p.service_account)) {
            objects.push(
                serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": p.service_account, "namespace": p.namespace}}),
            );
        }
    }
    let exe = std::env::current_exe().map_err(|source| Error::Write {
        path: "/proc/self/exe".into(),
        source,
    })?;
    objects.extend(spec.pods.iter().map(|p| pod_object(paths, p, &exe)));
    for svc in &spec.services {
        if seen.insert(svc.namespace.clone()) {
            objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": svc.namespace}}));
        }
        objects.push(service_object(svc));
    }
    if !objects.is_empty() {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
        kubectl(
            paths,
            &["apply", "--server-side", "-f", "-"],
            Some(&list.to_string()),
        )?;
    }
    write(&bootstrapped(paths), b"ok\n")?;
    progress.step(format!(
        "{} pod(s) created as Pods, {} Service(s); kubelets started",
        spec.pods.len(),
        spec.services.len()
    ));
    Ok(())
}

/// Annotation carrying a lab-file pod's IPv4 address: the lab's kubelet asks host-local for it.
pub const REQUESTED_IP: &str = "veil.dev/lab-ip";
/// The same for a lab-file pod's IPv6 address (dual-stack or IPv6-only).
pub const REQUESTED_IP6: &str = "veil.dev/lab-ip6";

/// A lab-file pod as a Pod: its node, labels and ServiceAccount, and one container per server
/// (`veil lab serve`), or one that only waits.
fn pod_object(paths: &LabPaths, p: &spec::PodSpec, exe: &Path) -> serde_json::Value {
    let exe = exe.display().to_string();
    let mut containers: Vec<serde_json::Value> = p
        .serve
        .iter()
        .map(|s| {
            let kind = match s.kind {
                spec::ServeKind::Http => "http",
                spec::ServeKind::Echo => "echo",
            };
            serde_json::json!({
                "name": format!("serve-{}", s.port),
                "image": "veil.dev/lab/none",
                "command": [exe, "lab", "serve", "--kind", kind, "--port", s.port.to_string(),
                            "--pod", p.qualified_name(),
                            "--ready-file", super::serve::ready_file(paths, p, s.port).display().to_string()],
            })
        })
        .collect();
    if containers.is_empty() {
        containers.push(
            serde_json::json!({"name": "main", "image": "veil.dev/lab/none",
                                            "command": ["sleep", "infinity"]}),
        );
    }
    // Each address under its family's key (an IPv6-only pod has only the IPv6 one).
    let mut annotations = serde_json::json!({});
    for a in p.addrs() {
        let key = if a.is_ipv4() {
            REQUESTED_IP
        } else {
            REQUESTED_IP6
        };
        annotations[key] = serde_json::json!(a.to_string());
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels,
                     "annotations": annotations},
        "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                 "automountServiceAccountToken": false, "containers": containers},
    })
}

/// The `kubernetes` Service's ClusterIP: the first host of the first service CIDR.
fn kubernetes_service_ip(family: spec::IpFamily) -> IpAddr {
    if family.has_v4() {
        Ipv4Addr::from(u32::from(spec::SERVICE_CIDR.0) + 1).into()
    } else {
        Ipv6Addr::from(u128::from(spec::SERVICE_CIDR_V6.0) + 1).into()
    }
}

/// kube-apiserver's `--service-cluster-ip-range`: the lab's IPv4 service CIDR, then the IPv6
/// one in a dual-stack lab (the first is the family of Services that name none).
fn service_cidrs(family: spec::IpFamily) -> String {
    let (v4, len4) = spec::SERVICE_CIDR;
    let (v6, len6) = spec::SERVICE_CIDR_V6;
    match family {
        spec::IpFamily::Ipv4 => format!("{v4}/{len4}"),
        spec::IpFamily::Dual => format!("{v4}/{len4},{v6}/{len6}"),
        spec::IpFamily::Ipv6 => format!("{v6}/{len6}"),
    }
}

/// A lab Service as a Service object, with the ClusterIP the lab allocated (the apiserver takes
/// it from the same CIDR); kube-controller-manager writes its EndpointSlices.
fn service_object(svc: &spec::ServiceSpec) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = svc
        .ports
        .iter()
        .map(|p| {
            let mut o = serde_json::json!({"port": p.port, "targetPort": p.target_port,
                                           "protocol": p.protocol});
            if !p.name.is_empty() {
                o["name"] = p.name.clone().into();
            }
            o
        })
        .collect();
    let ips: Vec<IpAddr> = svc.cluster_ips().collect();
    let families: Vec<&str> = ips
        .iter()
        .map(|a| if a.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let mut spec = serde_json::json!({
        "clusterIP": svc.cluster_ip.to_string(), "clusterIPs": ips, "ipFamilies": families,
        "ipFamilyPolicy": if ips.len() > 1 { "RequireDualStack" } else { "SingleStack" },
        "selector": svc.selector, "ports": ports,
        "sessionAffinity": if svc.affinity_timeout_s.is_some() { "ClientIP" } else { "None" },
    });
    if let Some(t) = svc.affinity_timeout_s {
        spec["sessionAffinityConfig"] = serde_json::json!({"clientIP": {"timeoutSeconds": t}});
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc.name, "namespace": svc.namespace},
        "spec": spec,
    })
}

/// The `kubectl` resource name of a policy's kind.
fn resource_of(kind: &str) -> &'static str {
    if kind == "CiliumClusterwideNetworkPolicy" {
        "ciliumclusterwidenetworkpolicies.cilium.io"
    } else {
        "ciliumnetworkpolicies.cilium.io"
    }
}

/// (policy, node, its verdict or why none came).
pub type PolicyReport = (String, String, std::result::Result<NodeVerdict, String>);

/// One policy's verdict on one node, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeVerdict {
    Enforced,
    Refused(String),
}

/// `veil policy apply` with Kubernetes: the documents go to the apiserver as they are
/// (server-side apply, as `kubectl apply --server-side` would), then every node's verdict on
/// the applied generation is read back from each policy's status (`timeout` at most).
/// `policies` are (kind, namespace, name) of the documents, already validated by the caller.
pub fn apply_policies(
    paths: &LabPaths,
    spec: &LabSpec,
    yaml: &str,
    policies: &[(String, String, String)],
    timeout: Duration,
) -> Result<Vec<PolicyReport>> {
    kubectl(
        paths,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(yaml),
    )?;
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    for (kind, ns, name) in policies {
        let mut args = vec!["get", resource_of(kind), name.as_str(), "-o", "json"];
        if kind != "CiliumClusterwideNetworkPolicy" {
            args.extend(["-n", ns.as_str()]);
        }
        let label = if ns.is_empty() {
            name.clone()
        } else {
            format!("{ns}/{name}")
        };
        for n in &spec.nodes {
            let verdict = loop {
                let v: serde_json::Value = kubectl(paths, &args, None)
                    .ok()
                    .and_then(|o| serde_json::from_str(&o).ok())
                    .unwrap_or_default();
                let gen = v["metadata"]["generation"].as_i64();
                let st = &v["status"]["nodes"][&n.name];
                if gen.is_some() && st["localPolicyRevision"].as_i64() == gen {
                    break Ok(if st["ok"] == true {
                        NodeVerdict::Enforced
                    } else {
                        NodeVerdict::Refused(st["error"].as_str().unwrap_or("refused").to_string())
                    });
                }
                if std::time::Instant::now() > deadline {
                    break Err(format!("no verdict after {timeout:?}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            out.push((label.clone(), n.name.clone(), verdict));
        }
    }
    Ok(out)
}

/// `veil policy delete` with Kubernetes: (kind, namespace, name); a missing one is an error.
pub fn delete_policies(paths: &LabPaths, policies: &[(String, String, String)]) -> Result<()> {
    for (kind, ns, name) in policies {
        let mut args = vec!["delete", resource_of(kind), name.as_str()];
        if kind != "CiliumClusterwideNetworkPolicy" {
            args.extend(["-n", ns.as_str()]);
        }
        kubectl(paths, &args, None)?;
    }
    Ok(())
}

/// `veil policy list` with Kubernetes: every CNP and CCNP, as (namespace/name, kind).
pub fn list_policies(paths: &LabPaths) -> Result<Vec<(String, String)>> {
    let out = kubectl(
        paths,
        &[
            "get",
            "ciliumnetworkpolicies.cilium.io,ciliumclusterwidenetworkpolicies.cilium.io",
            "-A",
            "-o",
            "json",
        ],
        None,
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        Error::Prerequisite(format!("kubectl get policies: unreadable answer: {e}"))
    })?;
    Ok(v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    let m = &i["metadata"];
                    let name = match m["namespace"].as_str() {
                        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
                        None => m["name"].as_str().unwrap_or("").to_string(),
                    };
                    (name, i["kind"].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default())
}
