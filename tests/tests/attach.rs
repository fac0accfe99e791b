//! End-to-end: the clsact fallback for kernels without tcx (issue 19). This kernel has tcx, so
//! the lab's agents are told to use clsact (`VEIL_ATTACH_MODE=clsact`, inherited from `veil lab
//! up` through the supervisor); the same programs, policy and restart adoption must hold.

use veil_tests::Lab;

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-ingress, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

/// veil's cls_bpf filters on a node's interface (`tc filter show`), as (hook, program id).
fn filters(lab: &Lab, node: &str, dev: &str, dir: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_netns(node),
            "tc",
            "filter",
            "show",
            "dev",
            dev,
            dir,
        ])
        .output()
        .expect("tc filter show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("handle 0xe11"))
        .map(str::to_string)
        .collect()
}

#[test]
fn clsact_mode_enforces_policy_and_survives_an_agent_restart() {
    // SAFETY: each nextest test runs in its own process; nothing else reads the environment
    // concurrently here.
    unsafe { std::env::set_var("VEIL_ATTACH_MODE", "clsact") };
    let lab = Lab::up(&[]);
    let st = lab.status("node-a");
    assert!(!st.programs.is_empty());
    for p in &st.programs {
        assert!(
            p.hook.starts_with("clsact-"),
            "{} on {} hooked {}",
            p.name,
            p.interface,
            p.hook
        );
    }
    let fe = st
        .programs
        .iter()
        .find(|p| p.pod.as_deref() == Some("shop/frontend"))
        .expect("frontend's program")
        .clone();
    let before = filters(&lab, "node-a", &fe.interface, "ingress");
    assert_eq!(before.len(), 1, "one veil filter expected: {before:?}");
    assert!(
        before[0].contains(&format!("id {}", fe.program_id)),
        "{before:?}"
    );

    let url = lab.pod_url("backend", 8080);
    assert_eq!(lab.http_get("frontend", &url), "hello from shop/backend\n");
    lab.apply_policy_ok(POLICY);
    assert!(lab.try_get("intruder", &url).is_err(), "intruder admitted");
    assert_eq!(lab.http_get("frontend", &url), "hello from shop/backend\n");

    // A restarted agent replaces its filter in place: still one filter, a new program,
    // reported as adopted, policy still enforced.
    // The agent is down for a moment: `veil status` fails until it is back.
    let after = lab.restart_agent(
        "restarted agent",
        "node-a",
        st.agent.pid,
        nix::sys::signal::Signal::SIGKILL,
    );
    let fe2 = after
        .programs
        .iter()
        .find(|p| p.pod.as_deref() == Some("shop/frontend"))
        .expect("frontend's program after the restart");
    assert!(fe2.adopted, "not adopted: {fe2:?}");
    assert_ne!(fe2.program_id, fe.program_id);
    let now = filters(&lab, "node-a", &fe.interface, "ingress");
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(
        now[0].contains(&format!("id {}", fe2.program_id)),
        "{now:?}"
    );
    assert!(
        lab.try_get("intruder", &url).is_err(),
        "intruder admitted after restart"
    );
    assert_eq!(lab.http_get("frontend", &url), "hello from shop/backend\n");
}
