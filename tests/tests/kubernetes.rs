//! The agent's Kubernetes cluster source (`cluster::kubernetes`) against a real kube-apiserver
//! and etcd (`scripts/kube-apiserver.sh`, the binaries `scripts/setup.sh` builds), with veil's
//! CRDs from `deploy/crds/` and objects made with the real kubectl.

use std::{
    io::Write as _,
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
            kubectl: std::env::var_os("VEIL_TOOLS_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/veil/bin")
                })
                .join("kubectl"),
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
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], yaml);
    }

    fn source(&self, node: &str) -> KubeSource {
        KubeSource::new(KubeConfig {
            kubeconfig: Some(self.kubeconfig.clone()),
            cluster: "kube-test".into(),
            trust_domain: "veil.test".into(),
            node: node.into(),
        })
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/kube-apiserver.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
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
    api.kubectl(
        &[
            "-n",
            "shop",
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
            ),
        ],
        "",
    );
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

#[test]
fn kubernetes_source_follows_nodes_pods_identities_keys_and_policies_on_a_real_apiserver() {
    let api = Apiserver::start("source");
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
        api.kubectl(
            &[
                "patch",
                "node",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &format!(r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"198.18.0.{n}"}}]}}}}"#),
            ],
            "",
        );
    }
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for sa in ["frontend", "backend"] {
        api.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: shop}}\n"
        ));
    }
    api.apply(&pod_yaml("frontend", "frontend", "node-a"));
    api.apply(&pod_yaml("backend", "backend", "node-b"));
    set_pod_ip(&api, "frontend", "198.19.1.10");
    set_pod_ip(&api, "backend", "198.19.2.10");

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
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let st = policy_status(&api, &name, node);
                if st.contains(r#""ok":true"#) && st.contains(r#""enforcing":true"#) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{node}'s status: {st}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // A version veil cannot enforce (L7 rules) is refused in the status; the accepted
        // version stays in force.
        let l7 = policy.replacen(
            "    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n",
            "    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n",
            1,
        );
        assert_ne!(l7, policy, "the L7 edit applies to the example");
        api.apply(&l7);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = policy_status(&api, &name, "node-a");
            if st.contains(r#""ok":false"#) {
                assert!(st.contains("rules.http"), "{st}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node-a's status: {st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let now = ra.borrow().clone();
        assert_eq!(now.policies, before.policies, "the accepted version stays");

        // Deleting a pod removes it; deleting the policy removes it.
        api.kubectl(&["-n", "shop", "delete", "pod", "backend", "--wait=false"], "");
        until(&mut ra, "backend gone at node-a", |s| {
            s.pods.iter().all(|p| p.name != "backend")
        })
        .await;
        api.kubectl(&["-n", "shop", "delete", "cnp", &name], "");
        until(&mut rb, "the policy gone at node-b", |s| s.policies.is_empty()).await;
    });
}
