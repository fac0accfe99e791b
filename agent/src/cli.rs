//! cli: what the `veil` commands print. Tables for people, `-o json` for scripts (shapes in
//! `api` and `lab::LabView`).

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{api, lab::LabView};

/// Output format flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// One auth pair, as `veil status` and `veil auth list` print it.
pub fn format_auth_pair(a: &api::AuthPair) -> String {
    let expiry = if a.expires_unix == 0 {
        "not authenticated".to_string()
    } else {
        format!("expires in {}s", a.expires_unix.saturating_sub(unix_now()))
    };
    format!(
        "{} -> {} via {}  {}  last {}",
        a.src_identity,
        a.dst_identity,
        a.node,
        expiry,
        a.last_result.as_deref().unwrap_or("-")
    )
}

/// `veil auth list`: a node's matching pairs under a line that counts them.
pub fn format_auth_list(l: &api::AuthPairList) -> String {
    let mut s = format!("{}: {} of {} auth pairs match", l.node, l.matching, l.total);
    if l.pairs.len() < l.matching {
        let _ = write!(s, " (the first {} listed)", l.pairs.len());
    }
    s.push('\n');
    for a in &l.pairs {
        let _ = writeln!(s, "  {}", format_auth_pair(a));
    }
    s
}

pub fn format_lab(v: &LabView) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "lab {}  trust domain {}  encryption {}  backend {}  pod MTU {}",
        v.name,
        v.trust_domain,
        match (v.encryption, v.node_encryption) {
            (true, true) => "on (pods and nodes)",
            (true, false) => "on (pods)",
            (false, _) => "off",
        },
        v.backend,
        v.pod_mtu
    );
    let _ = writeln!(
        s,
        "underlay  netns {}  bridge {}  {}",
        v.underlay.netns, v.underlay.bridge, v.underlay.cidr
    );
    let _ = writeln!(
        s,
        "\n{:<10} {:<18} {:<14} {:<16} ADMIN",
        "NODE", "NETNS", "UNDERLAY", "POD CIDR"
    );
    for n in &v.nodes {
        let _ = writeln!(
            s,
            "{:<10} {:<18} {:<14} {:<16} {}",
            n.name, n.netns, n.underlay_ip, n.pod_cidr, n.agent_admin
        );
    }
    let _ = writeln!(
        s,
        "\n{:<22} {:<10} {:<14} {:<24} LABELS",
        "POD", "NODE", "IP", "NETNS"
    );
    for p in &v.pods {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "{:<22} {:<10} {:<14} {:<24} {}",
            format!("{}/{}", p.namespace, p.name),
            p.node,
            p.ip,
            p.netns,
            labels.join(",")
        );
    }
    s
}

pub fn format_status(st: &api::Status) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "node {}  (cluster {}, agent pid {}, {})",
        st.node,
        st.cluster,
        st.agent.pid,
        if st.ready { "ready" } else { "NOT READY" }
    );
    let _ = writeln!(
        s,
        "  encryption: {}  backend: {}  interface: {}  listen port: {}  strict: {}",
        match (st.encryption, st.node_encryption) {
            (true, true) => "on (pods and nodes)",
            (true, false) => "on (pods)",
            (false, _) => "OFF",
        },
        st.backend,
        st.interface,
        st.listen_port,
        st.strict
    );
    if let Some(e) = &st.reconcile_error {
        let _ = writeln!(s, "  RECONCILE FAILING (retried every 5 s): {e}");
    }
    let full: Vec<String> = st
        .maps
        .iter()
        .filter(|m| m.capacity > 0 && m.entries as u64 * 10 >= u64::from(m.capacity) * 9)
        .map(|m| format!("{} {}/{}", m.name, m.entries, m.capacity))
        .collect();
    if !full.is_empty() {
        let _ = writeln!(s, "  maps 90 % full or more: {}", full.join(", "));
    }
    if let Some(k) = &st.public_key {
        let _ = writeln!(s, "  public key: {k}");
    }
    if st.tunnel_restarts.total > 0 {
        let recent: Vec<String> = st
            .tunnel_restarts
            .recent
            .iter()
            .map(|r| {
                format!(
                    "{} {}s ago",
                    r.reason,
                    unix_now().saturating_sub(r.time_unix)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "  tunnel restarts: {} ({})",
            st.tunnel_restarts.total,
            recent.join(", ")
        );
    }
    if !st.peers.is_empty() {
        let _ = writeln!(s, "  peers:");
        for p in &st.peers {
            let hs = p
                .last_handshake_unix
                .map(|t| format!("{}s ago", unix_now().saturating_sub(t)))
                .unwrap_or_else(|| "never".into());
            let _ = writeln!(
                s,
                "    {:<10} {}  endpoint {}  allowed {}  handshake {}  rx {} tx {}",
                p.node,
                p.public_key,
                p.endpoint.as_deref().unwrap_or("-"),
                p.allowed_ips.join(","),
                hs,
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes)
            );
        }
    }
    if !st.svids.is_empty() {
        let _ = writeln!(s, "  svids:");
        for v in &st.svids {
            let now = unix_now();
            let left = v.not_after_unix.saturating_sub(now);
            let renew = if v.rotates_at_unix == 0 {
                String::new()
            } else if v.rotates_at_unix > now {
                format!("  renews in {}s", v.rotates_at_unix - now)
            } else {
                "  renewal due".to_string()
            };
            let issuer = match (&v.issuer, &v.authority_id) {
                (Some(i), Some(a)) => format!("  issuer {i} (authority {a})"),
                (Some(i), None) => format!("  issuer {i}"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "    {}  serial {}  expires in {}s{renew}{issuer}",
                v.spiffe_id, v.serial, left
            );
        }
    }
    if !st.channels.is_empty() {
        let _ = writeln!(
            s,
            "  control channels (mTLS, port {}):",
            crate::auth::DEFAULT_PORT
        );
        for c in &st.channels {
            let _ = writeln!(
                s,
                "    {:<10} {:<15} {}  psk epoch {}  up {}s  peer svid {}",
                c.node,
                c.address,
                c.group.as_deref().unwrap_or("?"),
                c.epoch,
                unix_now().saturating_sub(c.established_unix),
                c.peer_svid_serial
            );
        }
    }
    let l = &st.listener;
    // Shown once the listener has turned something away; a healthy node's count equals its
    // channels made.
    if l.accepted > l.established {
        let outcomes: Vec<String> = l
            .outcomes()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(outcome, n)| format!("{outcome}={n}"))
            .collect();
        let _ = writeln!(
            s,
            "  control-channel listener: {} accepted: {}",
            l.accepted,
            outcomes.join(" ")
        );
    }
    if !st.auth.is_empty() {
        let c = &st.auth_pairs;
        let shown = if c.total > st.auth.len() {
            format!(", the first {} listed", st.auth.len())
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  auth pairs: {} ({} authenticated, {} failing, {} desired{shown}):",
            c.total.max(st.auth.len()),
            c.authenticated,
            c.failing,
            c.desired
        );
        for a in &st.auth {
            let _ = writeln!(s, "    {}", format_auth_pair(a));
        }
        if c.total > st.auth.len() {
            let _ = writeln!(s, "    (all of them: veil auth list --node {})", st.node);
        }
    }
    if !st.auth_failures.is_empty() {
        let f: Vec<String> = st
            .auth_failures
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        let _ = writeln!(s, "  auth failures: {}", f.join(" "));
    }
    let h = &st.hold;
    if h.held + h.overflow + h.unclassified > 0 {
        let _ = writeln!(
            s,
            "  held for auth: {} packets ({} released, {} timed out, {} overflowed, {} unclassified)",
            h.held, h.released, h.timed_out, h.overflow, h.unclassified
        );
    }
    let _ = writeln!(s, "  programs:");
    for p in &st.programs {
        let _ = writeln!(
            s,
            "    {:<18} {:<12} {:<12} prog {:<5} link {:<5} {}{}",
            p.name,
            p.interface,
            p.hook,
            p.program_id,
            p.link_id,
            p.pod.as_deref().unwrap_or(""),
            if p.adopted { " (adopted)" } else { "" }
        );
    }
    if let Some(first) = st.socket_programs.first() {
        let names: Vec<&str> = st
            .socket_programs
            .iter()
            .map(|p| p.name.trim_start_matches("veil_sock_"))
            .collect();
        let _ = writeln!(
            s,
            "  socket programs on {}: {}",
            first.interface,
            names.join(" ")
        );
    }
    if let Some(p) = &st.proxy {
        let state = match (p.running, p.pid, &p.last_error) {
            (true, Some(pid), _) => format!("running (pid {pid})"),
            (_, _, Some(e)) => format!(
                "NOT RUNNING (L7-policed connections are dropped: proxy-unavailable; cannot start: {e})"
            ),
            _ => "NOT RUNNING (L7-policed connections are dropped: proxy-unavailable)".into(),
        };
        let _ = writeln!(
            s,
            "  l7 proxy: {state} on 127.0.0.1:{}, {} requests ({} denied), {} restarts, policy generation {}",
            p.listen_port, p.requests, p.denied, p.restarts, p.config_generation
        );
    }
    if let Some(why) = &st.services_unavailable {
        let _ = writeln!(s, "  services: not balanced on this node: {why}");
    } else if !st.services.is_empty() {
        let _ = writeln!(s, "  services (balanced at the socket):");
        for svc in &st.services {
            let ports: Vec<String> = svc
                .ports
                .iter()
                .map(|p| format!("{}->{}/{}", p.port, p.target_port, p.protocol))
                .collect();
            let backends: Vec<String> = svc
                .backends
                .iter()
                .map(|b| {
                    let who = if b.pod.is_empty() { &b.ip } else { &b.pod };
                    if b.ready {
                        format!("{who} ({})", b.ip)
                    } else {
                        format!("{who} ({}, not ready)", b.ip)
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "    {}/{:<20} {:<15} {}{}  -> {}",
                svc.namespace,
                svc.name,
                if svc.cluster_ips.len() > 1 {
                    svc.cluster_ips.join(",")
                } else {
                    svc.cluster_ip.clone()
                },
                ports.join(","),
                if svc.session_affinity == "ClientIP" {
                    "  affinity ClientIP"
                } else {
                    ""
                },
                if backends.is_empty() {
                    "no backends (refused)".to_string()
                } else {
                    backends.join(", ")
                }
            );
        }
    }
    let _ = writeln!(s, "  counters:");
    for i in &st.interfaces {
        let _ = writeln!(
            s,
            "    {:<12} {:<16} {:>10} pkts {:>10}",
            i.interface,
            i.pod.as_deref().unwrap_or("-"),
            i.packets,
            human_bytes(i.bytes)
        );
    }
    let _ = writeln!(s, "  drops: {}", nonzero_counts(&st.drops));
    // veil-wg's own drops (traffic for a peer without keys, forged or replayed packets, ...);
    // kernel WireGuard reports none.
    if st.backend == "userspace" {
        let _ = writeln!(s, "  tunnel drops: {}", nonzero_counts(&st.tunnel_drops));
    }
    s
}

/// `reason=count` for every non-zero counter, or `none`.
fn nonzero_counts(counts: &BTreeMap<String, u64>) -> String {
    let nonzero: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    if nonzero.is_empty() {
        "none".to_string()
    } else {
        nonzero.join(" ")
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{self, spec};

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn lab_view_json_has_the_contract_fields() {
        let spec = spec::resolve(
            "veil",
            spec::LabFile::default(),
            &spec::Overrides::default(),
        )
        .unwrap();
        let paths = lab::LabPaths {
            name: "veil".into(),
            root: "/run/veil/veil".into(),
            cgroup: "/sys/fs/cgroup/veil/veil".into(),
            bpf: "/sys/fs/bpf/veil/veil".into(),
        };
        let v: serde_json::Value = serde_json::to_value(lab::view(&spec, &paths)).unwrap();
        for k in ["name", "trust_domain", "underlay", "nodes", "pods"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["underlay"]["netns"], "veil-underlay");
        assert_eq!(v["underlay"]["bridge"], "veil-br0");
        let node = &v["nodes"][0];
        for k in ["name", "netns", "underlay_ip", "pod_cidr", "agent_admin"] {
            assert!(node.get(k).is_some(), "node missing {k}");
        }
        assert_eq!(
            node["agent_admin"],
            "/run/veil/veil/nodes/node-a/admin.sock"
        );
        assert_eq!(node["underlay_ip"], "198.18.0.1");
        let pod = &v["pods"][1];
        for k in ["name", "namespace", "node", "netns", "ip", "labels"] {
            assert!(pod.get(k).is_some(), "pod missing {k}");
        }
        assert_eq!(pod["name"], "backend");
        assert_eq!(pod["ip"], "198.19.2.10");
        assert_eq!(pod["labels"]["app"], "backend");
        let table = format_lab(&lab::view(&spec, &paths));
        assert!(table.contains("shop/frontend") && table.contains("198.19.1.10"));
    }

    #[test]
    fn the_status_table_lists_non_zero_datapath_and_tunnel_drops() {
        let mut st = api::Status {
            backend: "userspace".into(),
            drops: BTreeMap::from([("policy-denied".into(), 2), ("no-key".into(), 0)]),
            tunnel_drops: BTreeMap::from([("no-peer".into(), 5), ("replay".into(), 0)]),
            ..Default::default()
        };
        let text = format_status(&st);
        assert!(text.contains("\n  drops: policy-denied=2\n"), "{text}");
        assert!(text.contains("\n  tunnel drops: no-peer=5\n"), "{text}");
        st.tunnel_drops.clear();
        assert!(format_status(&st).contains("\n  tunnel drops: none\n"));
        // Kernel WireGuard counts nothing it would report: no line claiming "none".
        st.backend = "kernel".into();
        assert!(!format_status(&st).contains("tunnel drops"));
    }

    #[test]
    fn auth_pairs_past_the_status_list_are_pointed_to_and_listed_by_auth_list() {
        let pair = |dst: u32, expires_unix, last: &str| api::AuthPair {
            src_identity: "256 (shop:app=frontend)".into(),
            dst_identity: dst.to_string(),
            node: "node-b".into(),
            expires_unix,
            last_result: Some(last.into()),
            authenticated_unix_ms: 0,
        };
        let mut st = api::Status {
            node: "node-a".into(),
            auth: vec![pair(257, 0, "timeout")],
            auth_pairs: api::AuthPairCounts {
                total: 1,
                failing: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let line =
            "    256 (shop:app=frontend) -> 257 via node-b  not authenticated  last timeout\n";
        assert!(format_status(&st).contains(line), "{}", format_status(&st));
        assert!(!format_status(&st).contains("veil auth list"));
        st.auth_pairs.total = 300;
        let text = format_status(&st);
        assert!(text.contains("the first 1 listed"), "{text}");
        assert!(
            text.contains("\n    (all of them: veil auth list --node node-a)\n"),
            "{text}"
        );

        let mut list = api::AuthPairList {
            node: "node-a".into(),
            matching: 2,
            total: 300,
            pairs: vec![pair(257, 0, "timeout"), pair(258, unix_now() + 60, "ok")],
        };
        let text = format_auth_list(&list);
        assert!(
            text.starts_with("node-a: 2 of 300 auth pairs match\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  256 (shop:app=frontend) -> 258 via node-b  expires in "),
            "{text}"
        );
        list.pairs.truncate(1);
        assert!(format_auth_list(&list)
            .starts_with("node-a: 2 of 300 auth pairs match (the first 1 listed)\n"));
    }

    #[test]
    fn the_status_table_names_a_failing_reconcile_and_nearly_full_maps() {
        let fill = |name: &str, entries, capacity| api::MapFill {
            name: name.into(),
            entries,
            capacity,
        };
        let mut st = api::Status {
            maps: vec![
                fill("VEIL_IPCACHE", 524_288, 524_288),
                fill("VEIL_CT", 9, 10),
                fill("VEIL_AUTH", 8, 10),
            ],
            reconcile_error: Some("map ipcache: 3 of 9 writes failed".into()),
            ..Default::default()
        };
        let text = format_status(&st);
        assert!(
            text.contains(
                "\n  RECONCILE FAILING (retried every 5 s): map ipcache: 3 of 9 writes failed\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\n  maps 90 % full or more: VEIL_IPCACHE 524288/524288, VEIL_CT 9/10\n"),
            "{text}"
        );
        st.reconcile_error = None;
        st.maps.truncate(0);
        let text = format_status(&st);
        assert!(
            !text.contains("RECONCILE") && !text.contains("maps 90"),
            "{text}"
        );
    }

    #[test]
    fn the_status_table_says_what_the_listener_turned_away_once_it_has() {
        let mut st = api::Status {
            listener: api::ListenerCounters {
                accepted: 2,
                established: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!format_status(&st).contains("listener"));
        st.listener = api::ListenerCounters {
            accepted: 1_013,
            established: 2,
            evicted_pending: 1_000,
            tls_failures: 10,
            handshake_timeouts: 1,
            ..Default::default()
        };
        let text = format_status(&st);
        assert!(
            text.contains(
                "\n  control-channel listener: 1013 accepted: established=2 evicted=1000 handshake-timeout=1 tls-failure=10\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_json_has_the_contract_fields() {
        let v = serde_json::to_value(api::Status::default()).unwrap();
        for k in [
            "node",
            "backend",
            "interface",
            "listen_port",
            "public_key",
            "peers",
            "svids",
            "auth",
            "drops",
            "tunnel_drops",
            "programs",
        ] {
            assert!(v.get(k).is_some(), "status missing {k}");
        }
        let p = serde_json::to_value(api::Peer::default()).unwrap();
        for k in [
            "node",
            "endpoint",
            "public_key",
            "allowed_ips",
            "last_handshake_unix",
            "rx_bytes",
            "tx_bytes",
        ] {
            assert!(p.get(k).is_some(), "peer missing {k}");
        }
    }
}
