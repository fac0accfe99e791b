//! daemon::metrics: the agent's Prometheus exposition (`GET /metrics`). Every value is read at
//! scrape time from the node's status and the flow store's totals, so the metrics are a
//! prometheus-client `Collector` over that snapshot; the crate writes the text format (HELP and
//! TYPE lines, label escaping, the `_total` suffix it adds to every counter's family name).
//!
//! Names, types and labels are a contract (dashboards and the end-to-end tests scrape them):
//! change one only with the tests, README and ARCHITECTURE.md §8.

use std::collections::BTreeMap;

use crate::flows::Verdict;

use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::api;

/// The metrics text for one scrape: `status` and the flow totals by (verdict, reason), with
/// SVID expiry and auth-entry validity measured against `now_unix`.
pub(super) fn render(
    status: api::Status,
    flow_totals: &BTreeMap<(Verdict, String), u64>,
    now_unix: u64,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        status,
        flow_totals: flow_totals.clone(),
        now_unix,
    }));
    let mut out = String::new();
    // Writing into a String fails only if a collector fails, and `Scrape` does not.
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

/// What one scrape reads.
#[derive(Debug)]
struct Scrape {
    status: api::Status,
    flow_totals: BTreeMap<(Verdict, String), u64>,
    now_unix: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = &self.status;
        // Counters are named without `_total`: the encoder appends it (to HELP, TYPE and
        // samples alike), so `veil_drops` is exposed as `veil_drops_total`.
        family(
            &mut enc,
            "veil_interface_packets",
            "Packets seen by veil's TC programs per interface.",
            MetricType::Counter,
            st.interfaces.iter().map(|i| {
                (
                    [("interface", i.interface.as_str())],
                    ConstCounter::new(i.packets),
                )
            }),
        )?;
        family(
            &mut enc,
            "veil_interface_bytes",
            "Bytes seen by veil's TC programs per interface.",
            MetricType::Counter,
            st.interfaces.iter().map(|i| {
                (
                    [("interface", i.interface.as_str())],
                    ConstCounter::new(i.bytes),
                )
            }),
        )?;
        family(
            &mut enc,
            "veil_drops",
            "Packets dropped by the datapath by reason.",
            MetricType::Counter,
            st.drops
                .iter()
                .map(|(reason, n)| ([("reason", reason.as_str())], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "veil_tunnel_drops",
            "Packets dropped by the userspace tunnel (veil-wg) by reason.",
            MetricType::Counter,
            st.tunnel_drops
                .iter()
                .map(|(reason, n)| ([("reason", reason.as_str())], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "veil_tunnel_restarts",
            "Restarts of the userspace tunnel (veil-wg) by reason.",
            MetricType::Counter,
            tunnel_restarts_by_reason(&st.tunnel_restarts)
                .into_iter()
                .map(|(reason, n)| ([("reason", reason)], ConstCounter::new(n))),
        )?;
        single(
            &mut enc,
            "veil_programs_attached",
            "eBPF programs veil has attached.",
            ConstGauge::new(st.programs.len() as i64),
        )?;
        family(
            &mut enc,
            "veil_flows",
            "Flow records by verdict and reason (packets folded in).",
            MetricType::Counter,
            self.flow_totals.iter().map(|((verdict, reason), n)| {
                (
                    [("verdict", verdict.as_str()), ("reason", reason.as_str())],
                    ConstCounter::new(*n),
                )
            }),
        )?;
        single(
            &mut enc,
            "veil_flow_events_lost",
            "Flow events the datapath could not write: its ring buffer was full.",
            ConstCounter::new(st.events_lost),
        )?;
        single(
            &mut enc,
            "veil_policies",
            "Policies in force on this node.",
            ConstGauge::new(st.policy.policies.len() as i64),
        )?;
        single(
            &mut enc,
            "veil_policy_entries",
            "Entries of the live policy map.",
            ConstGauge::new(st.policy.entries as i64),
        )?;
        family(
            &mut enc,
            "veil_map_entries",
            "Entries in a datapath map.",
            MetricType::Gauge,
            st.maps.iter().map(|m| {
                (
                    [("map", m.name.as_str())],
                    ConstGauge::new(m.entries as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "veil_map_capacity",
            "Capacity of a datapath map.",
            MetricType::Gauge,
            st.maps.iter().map(|m| {
                (
                    [("map", m.name.as_str())],
                    ConstGauge::new(i64::from(m.capacity)),
                )
            }),
        )?;
        let now = self.now_unix as i64;
        family(
            &mut enc,
            "veil_svid_expiry_seconds",
            "Seconds until each held SVID expires.",
            MetricType::Gauge,
            st.svids.iter().map(|v| {
                (
                    [
                        ("spiffe_id", v.spiffe_id.as_str()),
                        ("owner", v.owner.as_str()),
                    ],
                    ConstGauge::new(v.not_after_unix as i64 - now),
                )
            }),
        )?;
        single(
            &mut enc,
            "veil_agent_ready",
            "1 once the agent has reconciled the datapath.",
            ConstGauge::new(i64::from(st.ready)),
        )?;
        single(
            &mut enc,
            "veil_reconcile_failing",
            "1 while the agent's last reconcile pass failed (a full map, a program not attached; `veil status` says why).",
            ConstGauge::new(i64::from(st.reconcile_error.is_some())),
        )?;
        family(
            &mut enc,
            "veil_auth_failures",
            "Failed node and workload handshakes by reason.",
            MetricType::Counter,
            st.auth_failures
                .iter()
                .map(|(reason, n)| ([("reason", reason.as_str())], ConstCounter::new(*n))),
        )?;
        let valid = st
            .auth
            .iter()
            .filter(|p| p.expires_unix > self.now_unix)
            .count();
        single(
            &mut enc,
            "veil_auth_pairs",
            "Authenticated identity pairs (auth entries) currently valid.",
            ConstGauge::new(valid as i64),
        )?;
        single(
            &mut enc,
            "veil_control_channels",
            "Authenticated control channels to peer agents.",
            ConstGauge::new(st.channels.len() as i64),
        )?;
        let l = &st.listener;
        single(
            &mut enc,
            "veil_control_connections_accepted",
            "Connections the control-channel listener accepted.",
            ConstCounter::new(l.accepted),
        )?;
        family(
            &mut enc,
            "veil_control_connections",
            "What became of the control-channel listener's connections, by outcome (evicted: a pending one closed for a newer one from its source).",
            MetricType::Counter,
            l.outcomes()
                .into_iter()
                .map(|(outcome, n)| ([("outcome", outcome)], ConstCounter::new(n))),
        )?;
        let h = &st.hold;
        family(
            &mut enc,
            "veil_hold_packets",
            "Packets held for authentication, by outcome.",
            MetricType::Counter,
            [
                ("held", h.held),
                ("released", h.released),
                ("timed-out", h.timed_out),
                ("overflow", h.overflow),
                ("unclassified", h.unclassified),
            ]
            .into_iter()
            .map(|(outcome, n)| ([("outcome", outcome)], ConstCounter::new(n))),
        )
    }
}

/// Tunnel restarts by reason, both reasons always present. `recent` is bounded; the total is
/// exact, so restarts beyond the listed ones count as `exited`.
fn tunnel_restarts_by_reason(r: &api::TunnelRestarts) -> BTreeMap<&str, u64> {
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::from([("exited", 0), ("unresponsive", 0)]);
    for x in &r.recent {
        *by_reason.entry(x.reason.as_str()).or_default() += 1;
    }
    let listed: u64 = by_reason.values().sum();
    *by_reason.entry("exited").or_default() += r.total.saturating_sub(listed);
    by_reason
}

/// One metric without labels.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One metric family: a HELP and a TYPE line (also when it has no series yet), then one sample
/// per label set, in the order given.
fn family<S: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (S, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric's name and type, as scraped before the exposition went through
    /// prometheus-client (dashboards and the end-to-end suites read these).
    const CONTRACT: &[(&str, &str)] = &[
        ("veil_interface_packets_total", "counter"),
        ("veil_interface_bytes_total", "counter"),
        ("veil_drops_total", "counter"),
        ("veil_tunnel_drops_total", "counter"),
        ("veil_tunnel_restarts_total", "counter"),
        ("veil_programs_attached", "gauge"),
        ("veil_flows_total", "counter"),
        ("veil_flow_events_lost_total", "counter"),
        ("veil_policies", "gauge"),
        ("veil_policy_entries", "gauge"),
        ("veil_map_entries", "gauge"),
        ("veil_map_capacity", "gauge"),
        ("veil_svid_expiry_seconds", "gauge"),
        ("veil_agent_ready", "gauge"),
        ("veil_reconcile_failing", "gauge"),
        ("veil_auth_failures_total", "counter"),
        ("veil_auth_pairs", "gauge"),
        ("veil_control_channels", "gauge"),
        ("veil_control_connections_accepted_total", "counter"),
        ("veil_control_connections_total", "counter"),
        ("veil_hold_packets_total", "counter"),
    ];

    fn status() -> api::Status {
        api::Status {
            ready: true,
            reconcile_error: Some("ipcache: 3 of 9 writes failed".into()),
            interfaces: vec![api::InterfaceCounters {
                interface: "lxc-fe".into(),
                ifindex: 7,
                pod: Some("shop/fe".into()),
                packets: 12,
                bytes: 3400,
            }],
            drops: BTreeMap::from([("no-key".to_string(), 3), ("policy-denied".into(), 0)]),
            tunnel_drops: BTreeMap::from([("no-peer".to_string(), 7)]),
            events_lost: 41,
            svids: vec![api::Svid {
                // Not a valid SPIFFE ID, but a label value must survive anything.
                spiffe_id: "spiffe://lab.veil/ns/shop/sa/\"fe\\\n".into(),
                owner: "shop/fe".into(),
                not_after_unix: 1_000 + 3_600,
                ..Default::default()
            }],
            tunnel_restarts: api::TunnelRestarts {
                total: 3,
                recent: vec![api::TunnelRestart {
                    time_unix: 900,
                    reason: "unresponsive".into(),
                }],
            },
            hold: api::HoldStatus {
                timed_out: 2,
                ..Default::default()
            },
            maps: vec![api::MapFill {
                name: "VEIL_CT".into(),
                entries: 5,
                capacity: 65536,
            }],
            listener: api::ListenerCounters {
                accepted: 1_013,
                established: 2,
                evicted_pending: 1_000,
                tls_failures: 10,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn render_test() -> String {
        let totals = BTreeMap::from([((Verdict::Dropped, "policy-denied".to_string()), 4)]);
        render(status(), &totals, 1_000)
    }

    #[test]
    fn every_metric_keeps_its_name_type_and_help() {
        let text = render_test();
        for (name, kind) in CONTRACT {
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n"))
                    || text.starts_with(&format!("# TYPE {name} {kind}\n")),
                "no TYPE line for {name} ({kind}) in:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP line for {name} in:\n{text}"
            );
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, CONTRACT.len(), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn samples_read_the_status_and_flow_totals() {
        let text = render_test();
        for line in [
            "veil_interface_packets_total{interface=\"lxc-fe\"} 12",
            "veil_interface_bytes_total{interface=\"lxc-fe\"} 3400",
            "veil_drops_total{reason=\"no-key\"} 3",
            "veil_tunnel_drops_total{reason=\"no-peer\"} 7",
            "veil_flow_events_lost_total 41",
            "veil_drops_total{reason=\"policy-denied\"} 0",
            // One listed restart; the other two of the total count as `exited`.
            "veil_tunnel_restarts_total{reason=\"exited\"} 2",
            "veil_tunnel_restarts_total{reason=\"unresponsive\"} 1",
            "veil_flows_total{verdict=\"DROPPED\",reason=\"policy-denied\"} 4",
            "veil_map_entries{map=\"VEIL_CT\"} 5",
            "veil_map_capacity{map=\"VEIL_CT\"} 65536",
            "veil_agent_ready 1",
            "veil_reconcile_failing 1",
            "veil_policies 0",
            "veil_hold_packets_total{outcome=\"timed-out\"} 2",
            "veil_hold_packets_total{outcome=\"unclassified\"} 0",
            "veil_control_connections_accepted_total 1013",
            "veil_control_connections_total{outcome=\"established\"} 2",
            "veil_control_connections_total{outcome=\"evicted\"} 1000",
            "veil_control_connections_total{outcome=\"tls-failure\"} 10",
            "veil_control_connections_total{outcome=\"refused-unknown-source\"} 0",
            "# HELP veil_drops_total Packets dropped by the datapath by reason.",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render_test();
        let line = text
            .lines()
            .find(|l| l.starts_with("veil_svid_expiry_seconds{"))
            .unwrap_or_else(|| panic!("no expiry gauge in:\n{text}"));
        assert_eq!(
            line,
            r#"veil_svid_expiry_seconds{spiffe_id="spiffe://lab.veil/ns/shop/sa/\"fe\\\n",owner="shop/fe"} 3600"#
        );
    }
}
