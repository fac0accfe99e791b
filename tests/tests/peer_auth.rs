//! End-to-end: tunnel keys live no longer than the peer node's authentication (security issue
//! §6). A peer whose agent is frozen can neither re-key nor prove its node SVID is still
//! valid; the other node removes its WireGuard peer and PSK within the key lifetime
//! (`mesh::key_deadline`: the peer's node SVID expiry, at most a few PSK rotations), traffic to
//! it is dropped `no-key`, and everything returns once the peer thaws.

use std::time::{Duration, Instant};

use veil_tests::Lab;

/// Short SVIDs and PSK rotation so the bound is tens of seconds, not hours.
const LAB: &str = "svid_ttl: 30s\npsk_rotation: 5s\n";

fn freeze(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .expect("signal the agent");
}

#[test]
fn frozen_peer_agent_loses_its_tunnel_keys_within_the_key_lifetime() {
    let lab = Lab::up_with_file(LAB, &[]);
    let url = format!("http://{}:8080/", lab.pod_ip("backend"));
    assert_eq!(lab.http_get("frontend", &url), "hello from shop/backend\n");
    let b = lab.status("node-b");
    lab.wait_for(
        "node-a to have node-b as a peer",
        Duration::from_secs(20),
        || {
            let st = lab.status("node-a");
            st.peers.iter().any(|p| p.node == "node-b").then_some(())
        },
    );

    freeze(b.agent.pid, nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    // Make sure the agent is thawed even if an assertion below fails.
    struct Thaw(u32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            freeze(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let thaw = Thaw(b.agent.pid);

    // Bound: the key lifetime (node SVID 30 s, or 30 s floor of 3 x 5 s rotations) plus a
    // reconcile; generous margin for a loaded machine.
    lab.wait_for(
        "node-a to remove node-b's tunnel peer",
        Duration::from_secs(90),
        || {
            let st = lab.status("node-a");
            (!st.peers.iter().any(|p| p.node == "node-b")).then_some(())
        },
    );
    let removed_after = frozen_at.elapsed();
    eprintln!(
        "node-b's keys removed at node-a {} ms after node-b's agent froze",
        removed_after.as_millis()
    );
    assert!(
        removed_after >= Duration::from_secs(5),
        "removed suspiciously early ({removed_after:?}): not the key lifetime"
    );
    // Traffic to node-b's pods is now dropped for want of a key, never sent in clear.
    let before = lab
        .status("node-a")
        .drops
        .get("no-key")
        .copied()
        .unwrap_or(0);
    assert!(
        lab.try_get("frontend", &url).is_err(),
        "frontend still reached backend through a peer whose authentication lapsed"
    );
    let after = lab
        .status("node-a")
        .drops
        .get("no-key")
        .copied()
        .unwrap_or(0);
    assert!(
        after > before,
        "no no-key drop counted ({before} -> {after})"
    );

    // Thawed: node-b re-authenticates, the peer comes back and traffic flows.
    drop(thaw);
    lab.wait_for(
        "traffic after node-b's agent thawed",
        Duration::from_secs(90),
        || lab.try_get("frontend", &url).ok(),
    );
    assert!(lab
        .status("node-a")
        .peers
        .iter()
        .any(|p| p.node == "node-b"));
}
