//! The agent's Kubernetes cluster source (`cluster::kubernetes`) against a real kube-apiserver
//! and etcd (`scripts/kube-apiserver.sh`, the binaries `scripts/setup.sh` builds), with veil's
//! CRDs from `deploy/crds/` and objects made with the real kubectl.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use veil_agent::cluster::{
    kubernetes::{KubeConfig, KubeSource},
    ClusterSource, ClusterState,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An apiserver of its own for one test, stopped (and its directory removed) on drop.
struct Apiserver {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    /// The apiserver this test started again (`restart_apiserver`), reaped on drop.
    restarted: std::cell::RefCell<Option<std::process::Child>>,
}

impl Apiserver {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("veil-kube-{name}-{}", std::process::id()));
        let out = Command::new(repo().join("scripts/kube-apiserver.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/kube-apiserver.sh");
        let me = Self {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            restarted: Default::default(),
            kubectl: veil_agent::lab::tool("kubectl").unwrap_or_else(|e| panic!("{e}")),
        };
        assert!(
            out.status.success(),
            "kube-apiserver.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        me
    }

    /// Runs kubectl with `stdin`; panics with its output when it fails.
    fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        veil_tests::kubectl(&self.kubectl, &self.kubeconfig, args, stdin)
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], yaml);
    }

    fn pid(&self, process: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("{process}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Kills kube-apiserver (SIGKILL: a crash, no graceful drain) and starts it again with the
    /// same command line, port and etcd; returns once it is ready again.
    fn restart_apiserver(&self) {
        let pid = self.pid("kube-apiserver");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for("kube-apiserver to exit", || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        // Its threads may outlive the zombie leader for a moment, the listener with them.
        let port = args
            .iter()
            .position(|a| a == "--secure-port")
            .map(|i| args[i + 1].clone())
            .expect("the apiserver's --secure-port");
        wait_for("the apiserver's port to be released", || {
            Command::new("ss")
                .args(["-Htln", &format!("sport = :{port}")])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
        });
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("kube-apiserver.log"))
            .unwrap();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(self.dir.join("kube-apiserver.pid"), child.id().to_string()).unwrap();
        *self.restarted.borrow_mut() = Some(child);
        self.wait_ready();
    }

    /// SIGSTOP or SIGCONT to etcd: the apiserver's store hangs, as when etcd is unreachable.
    fn signal_etcd(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid("etcd")), signal).unwrap();
    }

    fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("kube-apiserver.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "the apiserver is not ready after 60 s; its log, last lines first:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn source(&self, node: &str) -> KubeSource {
        KubeSource::new(KubeConfig {
            kubeconfig: Some(self.kubeconfig.clone()),
            cluster: "kube-test".into(),
            trust_domain: "veil.test".into(),
            node: node.into(),
            // Short, so that the test sees an unused identity collected.
            identity_gc_age: Duration::from_secs(1),
        })
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/kube-apiserver.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
        // Stopped by its pid file above; reaped here.
        if let Some(mut child) = self.restarted.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `cond` every 100 ms for up to 60 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `read` every 100 ms until `done` holds of the reading, for up to 30 s; returns it.
async fn poll(what: &str, read: impl Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = read();
        if done(&got) {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the snapshot satisfies `cond`; panics with the last snapshot after `secs`.
async fn until(
    rx: &mut watch::Receiver<Arc<ClusterState>>,
    what: &str,
    cond: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = rx.borrow_and_update().clone();
        if cond(&s) {
            return s;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; last snapshot: {s:#?}");
        }
    }
}

fn node_yaml(name: &str, n: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: 198.19.{n}.0/24, podCIDRs: [198.19.{n}.0/24]}}\n"
    )
}

fn pod_yaml(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {app}\n  containers: [{{name: main, image: none, command: [sleep, infinity]}}]\n"
    )
}

/// What a kubelet and the CNI plugin write once a pod runs.
fn set_pod_ip(api: &Apiserver, name: &str, ip: &str) {
    let status =
        format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
    let args = [
        &["-n", "shop"][..],
        &veil_tests::status_patch("pod", name, &status),
    ]
    .concat();
    api.kubectl(&args, "");
}

fn policy_status(api: &Apiserver, name: &str, node: &str) -> String {
    api.kubectl(
        &[
            "-n",
            "shop",
            "get",
            "cnp",
            name,
            "-o",
            &format!("jsonpath={{.status.nodes.{node}}}"),
        ],
        "",
    )
}

/// CRDs, node-a and node-b (InternalIP 198.18.0.n, pod CIDR 198.19.n.0/24), namespace shop with
/// frontend on node-a and backend on node-b, running with their IPs (as kubelet and CNI write).
fn two_nodes_two_pods(api: &Apiserver) {
    api.kubectl(
        &["apply", "-f", repo().join("deploy/crds").to_str().unwrap()],
        "",
    );
    api.kubectl(
        &[
            "wait",
            "--for",
            "condition=established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        "",
    );
    for (name, n) in [("node-a", 1u8), ("node-b", 2)] {
        api.apply(&node_yaml(name, n));
        let status = format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"198.18.0.{n}"}}]}}}}"#
        );
        api.kubectl(&veil_tests::status_patch("node", name, &status), "");
    }
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for sa in ["frontend", "backend"] {
        api.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: shop}}\n"
        ));
    }
    api.apply(&pod_yaml("frontend", "frontend", "node-a"));
    api.apply(&pod_yaml("backend", "backend", "node-b"));
    set_pod_ip(api, "frontend", "198.19.1.10");
    set_pod_ip(api, "backend", "198.19.2.10");
}

#[test]
fn kubernetes_source_follows_nodes_pods_identities_keys_and_policies_on_a_real_apiserver() {
    let api = Apiserver::start("source");
    two_nodes_two_pods(&api);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b) = (api.source("node-a"), api.source("node-b"));
        // Both agents start at once and race to allocate the same two label sets.
        let (ra, rb) = tokio::join!(a.watch(), b.watch());
        let (mut ra, mut rb) = (ra.expect("node-a watches"), rb.expect("node-b watches"));
        let both_pods = |s: &ClusterState| s.pods.len() == 2 && s.nodes.len() == 2;
        let sa = until(&mut ra, "node-a's first snapshot", both_pods).await;
        let sb = until(&mut rb, "node-b's first snapshot", both_pods).await;
        let ids = |s: &ClusterState| -> Vec<(String, u32)> {
            s.pods.iter().map(|p| (p.name.clone(), p.identity)).collect()
        };
        assert_eq!(ids(&sa), ids(&sb), "both agents see the same identities");
        assert!(sa.pods.iter().all(|p| p.identity >= 256));
        assert_ne!(sa.pods[0].identity, sa.pods[1].identity);
        let objects = api.kubectl(&["get", "veilidentities", "-o", "name"], "");
        assert_eq!(
            objects.lines().count(),
            2,
            "racing agents made one VeilIdentity per label set: {objects}"
        );
        let node_a = sa.node("node-a").unwrap();
        assert_eq!(node_a.underlay_ip.to_string(), "198.18.0.1");
        assert_eq!(node_a.pod_cidr, "198.19.1.0/24");
        assert_eq!(sa.trust_domain, "veil.test");

        // Each agent keeps status.lastSeen of its own pods' identities fresh.
        poll(
            "lastSeen on both identities",
            || {
                api.kubectl(
                    &["get", "veilidentities", "-o", "jsonpath={.items[*].status.lastSeen}"],
                    "",
                )
            },
            |o| o.split_whitespace().filter(|t| t.ends_with('Z')).count() == 2,
        )
        .await;

        // Namespace labels are part of the identity: relabelling the namespace moves its pods
        // to new identities carrying io.cilium.k8s.namespace.labels.team on both agents.
        api.kubectl(&["label", "namespace", "shop", "team=a"], "");
        let relabelled = |s: &ClusterState| {
            s.pods.len() == 2
                && s.pods.iter().all(|p| {
                    s.identities.iter().any(|i| {
                        i.id == p.identity
                            && i.namespace_labels.get("team").map(String::as_str) == Some("a")
                    })
                })
        };
        let sa2 = until(&mut ra, "team=a in node-a's identities", relabelled).await;
        let sb2 = until(&mut rb, "team=a in node-b's identities", relabelled).await;
        assert_eq!(ids(&sa2), ids(&sb2), "both agents agree on the new identities");
        for (before, after) in ids(&sa).iter().zip(ids(&sa2).iter()) {
            assert_ne!(before, after, "a new namespace label, a new identity");
        }
        let table = sa2.identity_table();
        assert!(
            table.iter().all(|(_, l)| l.get("io.cilium.k8s.namespace.labels.team") == Some("a")),
            "{table:?}"
        );

        // A node key published by one agent reaches the other through the Node object.
        a.publish_node_key("node-a", "S0VZMQ==", Some("S0VZMg=="))
            .unwrap();
        until(&mut rb, "node-a's keys at node-b", |s| {
            s.node("node-a").is_some_and(|n| {
                n.wg_public_key.as_deref() == Some("S0VZMQ==")
                    && n.wg_next_public_key.as_deref() == Some("S0VZMg==")
            })
        })
        .await;
        a.publish_node_key("node-a", "S0VZMg==", None).unwrap();
        until(&mut rb, "node-a's rotated key alone", |s| {
            s.node("node-a").is_some_and(|n| {
                n.wg_public_key.as_deref() == Some("S0VZMg==") && n.wg_next_public_key.is_none()
            })
        })
        .await;

        // kubectl apply of a policy: in every snapshot, ok in its status from each node.
        let policy = std::fs::read_to_string(repo().join("examples/policies/backend-ingress.yaml"))
            .unwrap();
        api.apply(&policy);
        let has_policy = |s: &ClusterState| s.policies.len() == 1;
        let before = until(&mut ra, "the policy at node-a", has_policy).await;
        until(&mut rb, "the policy at node-b", has_policy).await;
        let name = before.policies[0].metadata.name.clone();
        for node in ["node-a", "node-b"] {
            poll(
                &format!("{node}'s status"),
                || policy_status(&api, &name, node),
                |st| st.contains(r#""ok":true"#) && st.contains(r#""enforcing":true"#),
            )
            .await;
        }

        // A version veil cannot enforce (an HTTP rule whose path is not a regular expression)
        // is refused in the status; the accepted version stays in force.
        let l7 = policy.replacen(
            "    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n",
            "    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"/api/[\"\n",
            1,
        );
        assert_ne!(l7, policy, "the L7 edit applies to the example");
        api.apply(&l7);
        let st = poll(
            "node-a's status",
            || policy_status(&api, &name, "node-a"),
            |st| st.contains(r#""ok":false"#),
        )
        .await;
        assert!(st.contains("rules.http"), "{st}");
        let now = ra.borrow().clone();
        assert_eq!(now.policies, before.policies, "the accepted version stays");

        // A Kubernetes NetworkPolicy joins the set as networkpolicy.<name>; an ipBlock rule
        // veil cannot enforce leaves the accepted version in force.
        let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: backend-np, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: backend}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: frontend}}}]\n    ports: [{port: 8080}]\n";
        api.apply(np);
        let with_np = until(&mut rb, "the NetworkPolicy at node-b", |s| {
            s.policies
                .iter()
                .any(|p| p.metadata.name == "networkpolicy.backend-np")
        })
        .await;
        api.apply(&np.replace(
            "{podSelector: {matchLabels: {app: frontend}}}",
            "{ipBlock: {cidr: 198.18.0.0/15}}",
        ));
        // A change made after it, to wait on: by then the refused version has been read.
        api.kubectl(&["-n", "shop", "label", "pod", "frontend", "probe=1"], "");
        until(&mut rb, "frontend's new label", |s| {
            s.pods
                .iter()
                .any(|p| p.labels.get("probe").is_some_and(|v| v == "1"))
        })
        .await;
        assert_eq!(
            rb.borrow().policies,
            with_np.policies,
            "the refused NetworkPolicy version leaves the accepted one"
        );
        api.kubectl(&["-n", "shop", "delete", "networkpolicy", "backend-np"], "");

        // Deleting a pod removes it; deleting the policy removes it.
        api.kubectl(&["-n", "shop", "delete", "pod", "backend", "--wait=false"], "");
        until(&mut ra, "backend gone at node-a", |s| {
            s.pods.iter().all(|p| p.name != "backend")
        })
        .await;
        // Identities no pod uses any more (backend's, frontend's before its new label) are
        // collected; frontend's current one stays.
        // frontend's identity now: its new label made it a new one, and the old one unused.
        let frontend_id = ra
            .borrow()
            .pods
            .iter()
            .find(|p| p.name == "frontend")
            .unwrap()
            .identity;
        let objects = poll(
            "not collected",
            || api.kubectl(&["get", "veilidentities", "-o", "name"], ""),
            |o| o.lines().count() == 1,
        )
        .await;
        assert!(objects.contains(&frontend_id.to_string()), "{objects}");
        api.kubectl(&["-n", "shop", "delete", "cnp", &name], "");
        until(&mut rb, "the policy gone at node-b", |s| s.policies.is_empty()).await;
    });
}

#[test]
fn kubernetes_source_keeps_its_state_through_an_apiserver_restart_and_an_etcd_stop() {
    // The source's and the watchers' logs, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("veil_daemon=debug,kube_runtime=debug")
        .with_test_writer()
        .try_init();
    let api = Apiserver::start("faults");
    two_nodes_two_pods(&api);
    let policy =
        std::fs::read_to_string(repo().join("examples/policies/backend-ingress.yaml")).unwrap();
    api.apply(&policy);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let source = api.source("node-a");
        let mut rx = source.watch().await.expect("node-a watches");
        let before = until(&mut rx, "pods and the policy", |s| {
            s.pods.len() == 2 && s.policies.len() == 1
        })
        .await;

        // The apiserver goes away and comes back: the snapshot in force does not change, and a
        // change made right after it is back arrives (the watch resumed or relisted).
        // (Blocking here is fine: the runtime has other worker threads for the source.)
        tokio::task::block_in_place(|| api.restart_apiserver());
        assert_eq!(
            rx.borrow().pods,
            before.pods,
            "pods kept while the apiserver was away"
        );
        assert_eq!(rx.borrow().policies, before.policies);
        api.apply(&pod_yaml("extra", "frontend", "node-b"));
        set_pod_ip(&api, "extra", "198.19.2.11");
        until(&mut rx, "a pod made after the apiserver restart", |s| {
            s.pods.iter().any(|p| p.name == "extra")
        })
        .await;

        // etcd stops answering for 30 s: the snapshot stays; once it answers again, a policy
        // deleted then reaches the agent.
        api.signal_etcd(nix::sys::signal::Signal::SIGSTOP);
        let frozen = rx.borrow().clone();
        let held = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                rx.changed().await.unwrap();
                let s = rx.borrow().clone();
                if s.pods != frozen.pods || s.policies != frozen.policies {
                    return s;
                }
            }
        })
        .await;
        api.signal_etcd(nix::sys::signal::Signal::SIGCONT);
        assert!(
            held.is_err(),
            "the snapshot changed while etcd was stopped: {held:?}"
        );
        tokio::task::block_in_place(|| api.wait_ready());
        let name = before.policies[0].metadata.name.clone();
        api.kubectl(&["-n", "shop", "delete", "cnp", &name], "");
        until(&mut rx, "the policy deleted after etcd came back", |s| {
            s.policies.is_empty()
        })
        .await;
    });
}
