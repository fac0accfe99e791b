//! Medians, ratios against the targets of the benchmark issue, and the three outputs: a text
//! table (stdout), JSON, and Markdown for benches/README.md.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{contender::Contender, measure::Throughput, procs::IdleSample, rr::RrResult};

/// Every sample of one contender, in run order.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Samples {
    pub tcp1: Vec<Throughput>,
    pub tcp2: Vec<Throughput>,
    pub rr: Vec<RrResult>,
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of one contender.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Medians {
    pub tcp1_gbit_per_s: Option<f64>,
    pub tcp2_gbit_per_s: Option<f64>,
    pub rr_p50_us: Option<f64>,
    pub rr_p99_us: Option<f64>,
    pub cpu_s_per_gb_1stream: Option<f64>,
    pub cpu_s_per_gb_2streams: Option<f64>,
    pub retransmits_1stream: Option<f64>,
}

impl Medians {
    pub fn of(s: &Samples) -> Self {
        let m = |v: Vec<f64>| median(&v);
        Self {
            tcp1_gbit_per_s: m(s.tcp1.iter().map(|t| t.gbit_per_s).collect()),
            tcp2_gbit_per_s: m(s.tcp2.iter().map(|t| t.gbit_per_s).collect()),
            rr_p50_us: m(s.rr.iter().map(|r| r.p50_us).collect()),
            rr_p99_us: m(s.rr.iter().map(|r| r.p99_us).collect()),
            cpu_s_per_gb_1stream: m(s.tcp1.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()),
            cpu_s_per_gb_2streams: m(s.tcp2.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()),
            retransmits_1stream: m(s.tcp1.iter().map(|t| t.retransmits as f64).collect()),
        }
    }
}

/// One target of the benchmark issue and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: Option<f64>,
    pub unit: String,
    pub target: String,
    /// None: not measurable in this run.
    pub met: Option<bool>,
    pub note: String,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The targets, evaluated on this run's medians.
pub fn targets(
    med: &BTreeMap<&'static str, Medians>,
    idle: &[IdleSample],
    tc: Option<&TcCost>,
    control: Option<&Control>,
) -> Vec<Target> {
    let p = &med[Contender::Plaintext.key()];
    let v = &med[Contender::Veil.key()];
    let b = &med[Contender::Boringtun.key()];
    let mut t = vec![];
    let mut push = |name: &str,
                    measured: Option<f64>,
                    unit: &str,
                    target: &str,
                    ok: fn(f64) -> bool,
                    note: String| {
        t.push(Target {
            name: name.into(),
            measured,
            unit: unit.into(),
            target: target.into(),
            met: measured.map(ok),
            note,
        });
    };
    push(
        "throughput, 1 stream: veil / boringtun-cli",
        ratio(v.tcp1_gbit_per_s, b.tcp1_gbit_per_s),
        "x",
        ">= 5x",
        |x| x >= 5.0,
        String::new(),
    );
    push(
        "throughput, 2 streams: veil / boringtun-cli",
        ratio(v.tcp2_gbit_per_s, b.tcp2_gbit_per_s),
        "x",
        ">= 3x",
        |x| x >= 3.0,
        String::new(),
    );
    push(
        "RR 64 B p50: veil / plaintext",
        ratio(v.rr_p50_us, p.rr_p50_us),
        "x",
        "<= 1.25x",
        |x| x <= 1.25,
        String::new(),
    );
    push(
        "CPU per GB, 1 stream: veil-wg / boringtun-cli",
        ratio(v.cpu_s_per_gb_1stream, b.cpu_s_per_gb_1stream),
        "x",
        "<= 0.3x",
        |x| x <= 0.3,
        String::new(),
    );
    let worst = |what: &str, f: fn(&IdleSample) -> f64| -> Option<f64> {
        idle.iter()
            .filter(|s| s.what.starts_with(what))
            .map(f)
            .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
    };
    push(
        "idle: veil-wg CPU (worst node)",
        worst("veil-wg", |s| s.cpu_percent),
        "%",
        "~0 % (< 0.1 %)",
        |x| x < 0.1,
        String::new(),
    );
    push(
        "idle: veil-wg RSS (worst node)",
        worst("veil-wg", |s| s.rss_max_mb),
        "MB",
        "< 10 MB",
        |x| x < 10.0,
        String::new(),
    );
    push(
        "idle: agent CPU (worst node)",
        worst("agent", |s| s.cpu_percent),
        "%",
        "< 0.1 %",
        |x| x < 0.1,
        String::new(),
    );
    push(
        "idle: agent RSS (worst node)",
        worst("agent", |s| s.rss_max_mb),
        "MB",
        "< 40 MB",
        |x| x < 40.0,
        String::new(),
    );
    let (spread, note) = match tc {
        Some(TcCost::Ran { spread, .. }) => (*spread, String::new()),
        Some(TcCost::Failed { error }) => (None, format!("tc-cost failed: {error}")),
        Some(TcCost::Missing) | None => (
            None,
            "not yet measurable: target/release/tc-cost not built (parallel branch)".into(),
        ),
    };
    push(
        "TC per-packet cost, 100,000 vs 10 entries",
        spread,
        "x",
        "within ±10 % (0.9–1.1x)",
        |x| (0.9..=1.1).contains(&x),
        note,
    );
    let note = if control.is_some() {
        String::new()
    } else {
        "not measured: control-bench did not run (scripts/bench.sh runs it first)".into()
    };
    push(
        "workload handshakes per CPU-second of an agent",
        control.map(|c| c.handshakes_per_cpu_second),
        "/s",
        ">= 1,000/s on one core",
        |x| x >= 1000.0,
        note.clone(),
    );
    push(
        "first connection, auth required / authenticated pair",
        control.map(|c| c.first_to_authenticated_ratio),
        "x",
        "<= 2x",
        |x| x <= 2.0,
        note,
    );
    t
}

/// What `control-bench` wrote to `control.json` (the fields the table uses).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Control {
    pub handshakes_per_cpu_second: f64,
    pub first_to_authenticated_ratio: f64,
}

/// What `tc-cost --json` gave, if it exists.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum TcCost {
    Ran {
        output: serde_json::Value,
        /// (entries, ns per packet) pairs found in the output.
        points: Vec<(u64, f64)>,
        /// ns/packet at the most entries ÷ at the fewest.
        spread: Option<f64>,
    },
    Failed {
        error: String,
    },
    Missing,
}

/// Finds (entries, ns-per-packet) pairs in tc-cost's JSON without knowing its exact schema:
/// any object with an integer field whose name mentions "entries" and a number field whose
/// name mentions "ns".
pub fn tc_points(v: &serde_json::Value) -> Vec<(u64, f64)> {
    let mut out = vec![];
    fn walk(v: &serde_json::Value, out: &mut Vec<(u64, f64)>) {
        match v {
            serde_json::Value::Object(m) => {
                let entries = m
                    .iter()
                    .find(|(k, v)| k.contains("entries") && v.is_u64())
                    .and_then(|(_, v)| v.as_u64());
                // Prefer an explicit nanoseconds name ("ns_per_packet", "avg_ns", "ns") over
                // any key that merely contains "ns" ("runs").
                let is_ns = |k: &str| k == "ns" || k.contains("ns_per") || k.ends_with("_ns");
                let ns = m
                    .iter()
                    .find(|(k, v)| is_ns(k) && v.is_number())
                    .or_else(|| m.iter().find(|(k, v)| k.contains("ns") && v.is_number()))
                    .and_then(|(_, v)| v.as_f64());
                if let (Some(e), Some(n)) = (entries, ns) {
                    out.push((e, n));
                }
                for v in m.values() {
                    walk(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out.sort_by_key(|p| p.0);
    out.dedup_by_key(|p| p.0);
    out
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// Rows of the main table: (label, per-contender values, digits).
fn rows(med: &BTreeMap<&'static str, Medians>) -> Vec<(&'static str, [Option<f64>; 3], usize)> {
    let get = |g: fn(&Medians) -> Option<f64>| -> [Option<f64>; 3] {
        Contender::ALL.map(|c| g(&med[c.key()]))
    };
    vec![
        ("TCP 1 stream (Gbit/s)", get(|m| m.tcp1_gbit_per_s), 2),
        ("TCP 2 streams (Gbit/s)", get(|m| m.tcp2_gbit_per_s), 2),
        ("TCP RR 64 B p50 (µs)", get(|m| m.rr_p50_us), 1),
        ("TCP RR 64 B p99 (µs)", get(|m| m.rr_p99_us), 1),
        (
            "tunnel CPU s/GB, 1 stream",
            get(|m| m.cpu_s_per_gb_1stream),
            2,
        ),
        (
            "tunnel CPU s/GB, 2 streams",
            get(|m| m.cpu_s_per_gb_2streams),
            2,
        ),
        (
            "TCP retransmits, 1 stream",
            get(|m| m.retransmits_1stream),
            0,
        ),
    ]
}

fn status_word(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

/// The text table printed at the end of a run.
pub fn text(
    med: &BTreeMap<&'static str, Medians>,
    targets: &[Target],
    idle: &[IdleSample],
    tc: &TcCost,
) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<28}{:>12}{:>12}{:>15}{:>10}{:>12}\n",
        "median", "plaintext", "veil", "boringtun-cli", "veil/bt", "veil/plain"
    ));
    for (label, v, d) in rows(med) {
        s.push_str(&format!(
            "{:<28}{:>12}{:>12}{:>15}{:>10}{:>12}\n",
            label,
            f(v[0], d),
            f(v[1], d),
            f(v[2], d),
            f(ratio(v[1], v[2]), 2),
            f(ratio(v[1], v[0]), 2),
        ));
    }
    s.push('\n');
    s.push_str("idle (60 s window unless configured otherwise)\n");
    for i in idle {
        s.push_str(&format!(
            "  {:<28} cpu {:>6.3} %   rss {:>6.1} MB (max {:.1})\n",
            i.what, i.cpu_percent, i.rss_mb, i.rss_max_mb
        ));
    }
    s.push('\n');
    match tc {
        TcCost::Ran { points, .. } if !points.is_empty() => {
            s.push_str("TC per-packet cost (tc-cost --json)\n");
            for (e, ns) in points {
                s.push_str(&format!("  {e:>7} entries  {ns:>8.1} ns/packet\n"));
            }
        }
        TcCost::Ran { output, .. } => {
            s.push_str(&format!("TC per-packet cost (tc-cost --json): {output}\n"))
        }
        TcCost::Failed { error } => s.push_str(&format!("TC per-packet cost: failed: {error}\n")),
        TcCost::Missing => s.push_str(
            "TC per-packet cost: not yet measurable (target/release/tc-cost not built)\n",
        ),
    }
    s.push_str("control plane: see control-bench's output (benches/results/control.json)\n\n");
    s.push_str("targets\n");
    for t in targets {
        s.push_str(&format!(
            "  [{:<6}] {:<48} {:>8} {:<3} target {}{}\n",
            status_word(t.met),
            t.name,
            f(t.measured, 3),
            t.unit,
            t.target,
            if t.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", t.note)
            }
        ));
    }
    s
}

/// The same, as Markdown tables for benches/README.md.
pub fn markdown(
    med: &BTreeMap<&'static str, Medians>,
    targets: &[Target],
    idle: &[IdleSample],
    tc: &TcCost,
    header: &str,
) -> String {
    let mut s = String::new();
    s.push_str(header);
    s.push_str("\n\n| median | plaintext | veil | boringtun-cli | veil / boringtun-cli | veil / plaintext |\n|---|---:|---:|---:|---:|---:|\n");
    for (label, v, d) in rows(med) {
        s.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} |\n",
            f(v[0], d),
            f(v[1], d),
            f(v[2], d),
            f(ratio(v[1], v[2]), 2),
            f(ratio(v[1], v[0]), 2)
        ));
    }
    s.push_str("\n| idle process | CPU % | RSS MB | max RSS MB |\n|---|---:|---:|---:|\n");
    for i in idle {
        s.push_str(&format!(
            "| {} | {:.3} | {:.1} | {:.1} |\n",
            i.what, i.cpu_percent, i.rss_mb, i.rss_max_mb
        ));
    }
    match tc {
        TcCost::Ran { points, .. } if !points.is_empty() => {
            s.push_str("\n| TC policy entries | ns / packet |\n|---:|---:|\n");
            for (e, ns) in points {
                s.push_str(&format!("| {e} | {ns:.1} |\n"));
            }
        }
        TcCost::Ran { output, .. } => {
            s.push_str(&format!("\nTC per-packet cost (`tc-cost --json`): `{output}`\n"))
        }
        TcCost::Failed { error } => s.push_str(&format!("\nTC per-packet cost: failed: {error}\n")),
        TcCost::Missing => s.push_str(
            "\nTC per-packet cost: **not yet measurable** here (`target/release/tc-cost` not built).\n",
        ),
    }
    s.push_str("\n| target | measured | target | status |\n|---|---:|---|---|\n");
    for t in targets {
        let status = match t.met {
            Some(true) => "met".to_string(),
            Some(false) => "**MISSED**".to_string(),
            None => "not yet measurable".to_string(),
        };
        s.push_str(&format!(
            "| {} | {} {} | {} | {}{} |\n",
            t.name,
            f(t.measured, 3),
            t.unit,
            t.target,
            status,
            if t.note.is_empty() || t.met.is_none() {
                String::new()
            } else {
                format!(" ({})", t.note)
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ignores_nan_and_averages_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn tc_points_found_in_unknown_shapes() {
        let v = serde_json::json!({
            "program": "tc_ingress",
            "results": [
                {"policy_entries": 100000, "runs": 7, "ns_per_packet": 41.0},
                {"policy_entries": 10, "ns_per_packet": 40.0},
                {"policy_entries": 1000, "ns_per_packet": 40.5},
            ]
        });
        assert_eq!(
            tc_points(&v),
            vec![(10, 40.0), (1000, 40.5), (100000, 41.0)]
        );
        assert!(tc_points(&serde_json::json!({"other": 1})).is_empty());
    }

    #[test]
    fn a_missed_target_is_reported_as_missed() {
        let mut med = BTreeMap::new();
        let m = |t1, rr| Medians {
            tcp1_gbit_per_s: Some(t1),
            tcp2_gbit_per_s: Some(t1),
            rr_p50_us: Some(rr),
            cpu_s_per_gb_1stream: Some(1.0),
            ..Default::default()
        };
        med.insert(Contender::Plaintext.key(), m(20.0, 20.0));
        med.insert(Contender::Veil.key(), m(3.0, 50.0));
        med.insert(Contender::Boringtun.key(), m(0.6, 50.0));
        let t = targets(&med, &[], None, None);
        let find = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        assert_eq!(find("throughput, 1 stream").met, Some(true));
        assert_eq!(find("RR 64 B p50").met, Some(false));
        assert_eq!(find("idle: veil-wg CPU").met, None);
        assert_eq!(find("workload handshakes").met, None);
        let c = Control {
            handshakes_per_cpu_second: 1200.0,
            first_to_authenticated_ratio: 2.5,
        };
        let t = targets(&med, &[], None, Some(&c));
        let find = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        assert_eq!(find("workload handshakes").met, Some(true));
        assert_eq!(find("first connection").met, Some(false));
    }
}
