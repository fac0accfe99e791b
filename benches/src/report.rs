//! Medians, ratios against the targets of the benchmark issue, and the three outputs: a text
//! table (stdout), JSON, and Markdown for benches/README.md.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{contender::Contender, measure::Throughput, procs::IdleSample, rr::RrResult};

/// Every sample of one contender, in run order.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Samples {
    pub tcp1: Vec<Throughput>,
    pub tcp2: Vec<Throughput>,
    #[serde(default)]
    pub tcp4: Vec<Throughput>,
    pub rr: Vec<RrResult>,
}

/// [`median`] of a vector, NaN for none (for tables).
pub fn median_or_nan(v: Vec<f64>) -> f64 {
    median(&v).unwrap_or(f64::NAN)
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

/// (lowest, highest) of the finite values; None for none.
pub fn range(v: &[f64]) -> Option<(f64, f64)> {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(None, |acc, x| {
            Some(acc.map_or((x, x), |(lo, hi): (f64, f64)| (lo.min(x), hi.max(x))))
        })
}

/// Medians of one contender.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Medians {
    pub tcp1_gbit_per_s: Option<f64>,
    pub tcp2_gbit_per_s: Option<f64>,
    pub tcp4_gbit_per_s: Option<f64>,
    pub rr_p50_us: Option<f64>,
    pub rr_p99_us: Option<f64>,
    pub cpu_s_per_gb_1stream: Option<f64>,
    pub cpu_s_per_gb_2streams: Option<f64>,
    pub cpu_s_per_gb_4streams: Option<f64>,
    pub retransmits_1stream: Option<f64>,
}

impl Medians {
    pub fn of(s: &Samples) -> Self {
        let m = |v: Vec<f64>| median(&v);
        Self {
            tcp1_gbit_per_s: m(s.tcp1.iter().map(|t| t.gbit_per_s).collect()),
            tcp2_gbit_per_s: m(s.tcp2.iter().map(|t| t.gbit_per_s).collect()),
            tcp4_gbit_per_s: m(s.tcp4.iter().map(|t| t.gbit_per_s).collect()),
            rr_p50_us: m(s.rr.iter().map(|r| r.p50_us).collect()),
            rr_p99_us: m(s.rr.iter().map(|r| r.p99_us).collect()),
            cpu_s_per_gb_1stream: m(s.tcp1.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()),
            cpu_s_per_gb_2streams: m(s.tcp2.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()),
            cpu_s_per_gb_4streams: m(s.tcp4.iter().filter_map(|t| t.cpu_seconds_per_gb).collect()),
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

/// A target's bound: its text and whether a measured figure meets it, from one definition.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
    Within(f64, f64),
}

impl Bound {
    pub fn met(self, x: f64) -> bool {
        match self {
            Bound::AtLeast(b) => x >= b,
            Bound::AtMost(b) => x <= b,
            Bound::Below(b) => x < b,
            Bound::Within(lo, hi) => (lo..=hi).contains(&x),
        }
    }

    /// `>= 5x`, `< 10 MB`, `within 0.9–1.1x`: a ratio's `x` and a rate's `/s` follow the number,
    /// other units after a space.
    pub fn text(self, unit: &str) -> String {
        let sep = if unit == "x" || unit.starts_with('/') {
            ""
        } else {
            " "
        };
        match self {
            Bound::AtLeast(b) => format!(">= {b}{sep}{unit}"),
            Bound::AtMost(b) => format!("<= {b}{sep}{unit}"),
            Bound::Below(b) => format!("< {b}{sep}{unit}"),
            Bound::Within(lo, hi) => format!("within {lo}–{hi}{sep}{unit}"),
        }
    }
}

/// A figure of the contenders' medians, named for veil's side of a ratio.
type Figure = (&'static str, fn(&Medians) -> Option<f64>);
const TCP1: Figure = ("throughput, 1 stream: veil", |m| m.tcp1_gbit_per_s);
const TCP2: Figure = ("throughput, 2 streams: veil", |m| m.tcp2_gbit_per_s);
const TCP4: Figure = ("throughput, 4 streams: veil", |m| m.tcp4_gbit_per_s);
const RR_P50: Figure = ("RR 64 B p50: veil", |m| m.rr_p50_us);
const RR_P99: Figure = ("RR 64 B p99: veil", |m| m.rr_p99_us);
const CPU1: Figure = ("CPU per GB, 1 stream: veil-wg", |m| m.cpu_s_per_gb_1stream);

/// The issue's targets, evaluated on this run's medians.
pub fn targets(
    med: &BTreeMap<&'static str, Medians>,
    idle: &[IdleSample],
    tc: Option<&TcCost>,
    control: &Result<Control, String>,
) -> Vec<Target> {
    use Bound::*;
    use Contender::{Boringtun, Plaintext, WireguardGo};
    let v = &med[Contender::Veil.key()];
    let mut t = vec![];
    let mut push = |name: &str, measured: Option<f64>, unit: &str, bound: Bound, note: String| {
        t.push(Target {
            name: name.into(),
            measured,
            unit: unit.into(),
            target: bound.text(unit),
            met: measured.map(|x| bound.met(x)),
            note,
        });
    };
    // Ratios of veil's medians to another contender's.
    let ratios = [
        (TCP1, Boringtun, AtLeast(5.0)),
        (TCP2, Boringtun, AtLeast(3.0)),
        (RR_P50, Plaintext, AtMost(1.25)),
        (CPU1, Boringtun, AtMost(0.3)),
        // Against wireguard-go (the performance issue's anchor).
        (TCP1, WireguardGo, AtLeast(1.5)),
        (TCP1, Plaintext, AtLeast(0.35)),
        (TCP4, WireguardGo, AtLeast(1.5)),
        (CPU1, WireguardGo, AtMost(0.7)),
        (RR_P50, WireguardGo, AtMost(1.0)),
        (RR_P99, WireguardGo, AtMost(1.0)),
    ];
    for ((label, figure), other, bound) in ratios {
        let note = if label == RR_P99.0 {
            "the machine is shared by both labs' processes: p99 is not a quiet-machine figure"
        } else {
            ""
        };
        let measured = ratio(figure(v), figure(&med[other.key()]));
        let name = format!("{label} / {}", other.key());
        push(&name, measured, "x", bound, note.into());
    }
    let worst = |what: &str, f: fn(&IdleSample) -> f64| -> Option<f64> {
        idle.iter()
            .filter(|s| s.what.starts_with(what))
            .map(f)
            .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
    };
    // (figure, unit, sample field) of an idle process, worst over the nodes.
    type IdleFigure = (&'static str, &'static str, fn(&IdleSample) -> f64);
    let cpu: IdleFigure = ("CPU", "%", |s| s.cpu_percent);
    let rss: IdleFigure = ("RSS", "MB", |s| s.rss_max_mb);
    let idle_targets = [
        ("veil-wg", cpu, Below(0.1)),
        ("veil-wg", rss, Below(10.0)),
        ("agent", cpu, Below(0.1)),
        ("agent", rss, Below(40.0)),
    ];
    for (who, (what, unit, field), bound) in idle_targets {
        let name = format!("idle: {who} {what} (worst node)");
        push(&name, worst(who, field), unit, bound, String::new());
    }
    let (spread, note) = match tc {
        Some(TcCost::Ran {
            spread,
            spread_case,
            ..
        }) => (
            *spread,
            spread_case.as_deref().map_or(String::new(), |c| {
                format!("worst case {c}: median of paired per-round ratios")
            }),
        ),
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
        Within(0.9, 1.1),
        note,
    );
    let (control, note) = match control {
        Ok(c) => (Some(c), format!("control-bench run {}", c.run_id)),
        Err(why) => (None, why.clone()),
    };
    push(
        "workload handshakes per CPU-second of an agent",
        control.map(|c| c.handshakes_per_cpu_second),
        "/s",
        AtLeast(1000.0),
        note.clone(),
    );
    push(
        "first connection, auth required / authenticated pair",
        control.map(|c| c.first_to_authenticated_ratio),
        "x",
        AtMost(2.0),
        note,
    );
    t
}

/// What `control-bench` wrote to `control.json` (the fields the table uses), with the run it
/// belongs to.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Control {
    /// The `scripts/bench.sh` run (`VEIL_BENCH_RUN_ID`), or control-bench's own id when it ran
    /// alone.
    pub run_id: String,
    pub started_unix: u64,
    pub finished_unix: u64,
    pub handshakes_per_cpu_second: f64,
    pub first_to_authenticated_ratio: f64,
}

/// The run veil-bench belongs to: `scripts/bench.sh` exports its id and start time to both
/// control-bench and veil-bench; veil-bench run alone has no id and starts its own run.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: Option<String>,
    pub started_unix: u64,
}

/// `control.json`, if it was written by control-bench during this run; otherwise why not (the
/// target table then says "not measured" with that reason instead of using old figures).
pub fn control_for_run(json: Option<&[u8]>, run: &Run) -> Result<Control, String> {
    let Some(json) = json else {
        return Err(
            "not measured: control-bench did not run (scripts/bench.sh runs it first)".into(),
        );
    };
    let c: Control = serde_json::from_slice(json).map_err(|e| {
        format!("not used: control.json has no run id or time ({e}); run scripts/bench.sh")
    })?;
    if let Some(id) = &run.id {
        if &c.run_id != id {
            return Err(format!(
                "not used: control.json is from run {}, not this run ({id})",
                c.run_id
            ));
        }
    }
    if c.started_unix < run.started_unix {
        return Err(format!(
            "not used: control.json (run {}, started {}) is older than this run (started {}); run scripts/bench.sh",
            c.run_id, c.started_unix, run.started_unix
        ));
    }
    Ok(c)
}

/// One row of `tc-cost --json`: the median over rounds of one case at one policy map size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TcPoint {
    pub case: String,
    pub entries: u64,
    pub median_ns: f64,
    /// tc-cost's ratio to the smallest map: the median over rounds of paired per-round ratios.
    pub ratio: Option<f64>,
}

/// What `tc-cost --json` gave, if it exists.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum TcCost {
    Ran {
        output: serde_json::Value,
        /// Every (case, map size) row, by case then size.
        points: Vec<TcPoint>,
        /// The largest map's ratio to the smallest, of the case that strays furthest from 1.
        spread: Option<f64>,
        spread_case: Option<String>,
    },
    Failed {
        error: String,
    },
    Missing,
}

impl TcCost {
    pub fn from_output(output: serde_json::Value) -> TcCost {
        let points = tc_points(&output);
        if points.is_empty() {
            return TcCost::Failed {
                error: "tc-cost output has no results rows with case, entries and median_ns".into(),
            };
        }
        let (spread, spread_case) = match tc_spread(&points) {
            Some((r, c)) => (Some(r), Some(c)),
            None => (None, None),
        };
        TcCost::Ran {
            output,
            points,
            spread,
            spread_case,
        }
    }
}

/// The rows of tc-cost's `results`, read by name: `median_ns` (not `min_ns` or `max_ns`), and
/// tc-cost's paired `ratio`.
pub fn tc_points(v: &serde_json::Value) -> Vec<TcPoint> {
    let mut out: Vec<TcPoint> = v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some(TcPoint {
                case: r["case"].as_str()?.to_string(),
                entries: r["entries"].as_u64()?,
                median_ns: r["median_ns"].as_f64()?,
                ratio: r["ratio"].as_f64(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.case.cmp(&b.case).then(a.entries.cmp(&b.entries)));
    out
}

/// Per case, the largest map's ratio to the smallest (tc-cost's paired ratio, else the ratio of
/// the medians); the case furthest from 1 decides, and is named.
pub fn tc_spread(points: &[TcPoint]) -> Option<(f64, String)> {
    let mut worst: Option<(f64, String)> = None;
    let mut cases: Vec<&str> = points.iter().map(|p| p.case.as_str()).collect();
    cases.dedup();
    for case in cases {
        let rows: Vec<&TcPoint> = points.iter().filter(|p| p.case == case).collect();
        let (Some(small), Some(large)) = (rows.first(), rows.last()) else {
            continue;
        };
        if rows.len() < 2 || small.median_ns <= 0.0 {
            continue;
        }
        let r = large.ratio.unwrap_or(large.median_ns / small.median_ns);
        if worst
            .as_ref()
            .is_none_or(|(w, _)| (r - 1.0).abs() > (w - 1.0).abs())
        {
            worst = Some((r, case.to_string()));
        }
    }
    worst
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// Rows of the main table: (label, per-contender values, digits).
fn rows(med: &BTreeMap<&'static str, Medians>) -> Vec<(&'static str, [Option<f64>; 4], usize)> {
    let get = |g: fn(&Medians) -> Option<f64>| -> [Option<f64>; 4] {
        Contender::ALL.map(|c| g(&med[c.key()]))
    };
    vec![
        ("TCP 1 stream (Gbit/s)", get(|m| m.tcp1_gbit_per_s), 2),
        ("TCP 2 streams (Gbit/s)", get(|m| m.tcp2_gbit_per_s), 2),
        ("TCP 4 streams (Gbit/s)", get(|m| m.tcp4_gbit_per_s), 2),
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
            "tunnel CPU s/GB, 4 streams",
            get(|m| m.cpu_s_per_gb_4streams),
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

/// A table given once and drawn two ways: aligned columns for the terminal, Markdown for
/// benches/README.md. The first column is left-aligned, the others right-aligned (numbers)
/// unless marked as text.
struct Table {
    head: Vec<String>,
    /// Per column: left-aligned?
    left: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Self {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            left: (0..head.len()).map(|c| c == 0).collect(),
            rows: Vec::new(),
        }
    }

    /// Columns `cols` hold text: left-aligned.
    fn text_columns(mut self, cols: &[usize]) -> Self {
        for &c in cols {
            self.left[c] = true;
        }
        self
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.head.len());
        self.rows.push(cells);
    }

    fn text(&self) -> String {
        let lines = || std::iter::once(&self.head).chain(&self.rows);
        let widths: Vec<usize> = (0..self.head.len())
            .map(|c| lines().map(|l| l[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut s = String::new();
        for l in lines() {
            let mut line = String::new();
            for ((cell, w), left) in l.iter().zip(&widths).zip(&self.left) {
                if *left {
                    line.push_str(&format!("  {cell:<w$}"));
                } else {
                    line.push_str(&format!("  {cell:>w$}"));
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let rule: Vec<&str> = self
            .left
            .iter()
            .map(|l| if *l { "---" } else { "---:" })
            .collect();
        let mut s = line(&self.head) + &format!("|{}|\n", rule.join("|"));
        for r in &self.rows {
            s.push_str(&line(r));
        }
        s
    }
}

/// The report's tables: medians against every contender, idle cost, TC cost (when measured)
/// and targets; and the TC section's one line when there is no table to show.
fn tables(
    med: &BTreeMap<&'static str, Medians>,
    targets: &[Target],
    idle: &[IdleSample],
    tc: &TcCost,
) -> (Table, Table, Result<Table, String>, Table) {
    let mut main = Table::new(&[
        "median",
        "plaintext",
        "veil",
        "boringtun-cli",
        "wireguard-go",
        "veil / boringtun-cli",
        "veil / wireguard-go",
        "veil / plaintext",
    ]);
    for (label, v, d) in rows(med) {
        main.row(vec![
            label.to_string(),
            f(v[0], d),
            f(v[1], d),
            f(v[2], d),
            f(v[3], d),
            f(ratio(v[1], v[2]), 2),
            f(ratio(v[1], v[3]), 2),
            f(ratio(v[1], v[0]), 2),
        ]);
    }
    let mut idle_t = Table::new(&["idle process", "CPU %", "RSS MB", "max RSS MB"]);
    for i in idle {
        idle_t.row(vec![
            i.what.clone(),
            format!("{:.3}", i.cpu_percent),
            format!("{:.1}", i.rss_mb),
            format!("{:.1}", i.rss_max_mb),
        ]);
    }
    let tc_t = match tc {
        TcCost::Ran { points, .. } if !points.is_empty() => {
            let mut t = Table::new(&[
                "TC case",
                "policy entries",
                "median ns / packet",
                "vs smallest map",
            ]);
            for p in points {
                t.row(vec![
                    p.case.clone(),
                    p.entries.to_string(),
                    format!("{:.1}", p.median_ns),
                    f(p.ratio, 3),
                ]);
            }
            Ok(t)
        }
        TcCost::Ran { output, .. } => {
            Err(format!("TC per-packet cost (`tc-cost --json`): `{output}`"))
        }
        TcCost::Failed { error } => Err(format!("TC per-packet cost: failed: {error}")),
        TcCost::Missing => Err(
            "TC per-packet cost: not yet measurable here (`target/release/tc-cost` not built)"
                .to_string(),
        ),
    };
    let mut targets_t = Table::new(&["target", "measured", "goal", "status"]).text_columns(&[2, 3]);
    for t in targets {
        let note = if t.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", t.note)
        };
        targets_t.row(vec![
            t.name.clone(),
            format!("{} {}", f(t.measured, 3), t.unit),
            t.target.clone(),
            format!("{}{note}", status_word(t.met)),
        ]);
    }
    (main, idle_t, tc_t, targets_t)
}

/// The text tables printed at the end of a run.
pub fn text(
    med: &BTreeMap<&'static str, Medians>,
    targets: &[Target],
    idle: &[IdleSample],
    tc: &TcCost,
) -> String {
    let (main, idle, tc, targets) = tables(med, targets, idle, tc);
    let tc = tc.map_or_else(|line| format!("{line}\n"), |t| t.text());
    format!(
        "{}\nidle (60 s window unless configured otherwise)\n{}\n{tc}\n\
         control plane: see control-bench's output (benches/results/control.json)\n\n\
         targets\n{}",
        main.text(),
        idle.text(),
        targets.text()
    )
}

/// The same, as Markdown tables for benches/README.md.
pub fn markdown(
    med: &BTreeMap<&'static str, Medians>,
    targets: &[Target],
    idle: &[IdleSample],
    tc: &TcCost,
    header: &str,
) -> String {
    let (main, idle, tc, targets) = tables(med, targets, idle, tc);
    let tc = tc.map_or_else(|line| format!("{line}\n"), |t| t.markdown());
    format!(
        "{header}\n\n{}\n{}\n{tc}\n{}",
        main.markdown(),
        idle.markdown(),
        targets.markdown()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ignores_nan_and_averages_even_counts() {
        assert_eq!(range(&[3.0, f64::NAN, 1.0, 2.0]), Some((1.0, 3.0)));
        assert_eq!(range(&[]), None);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    /// tc-cost's real shape: serde_json orders keys, so `max_ns` comes before `median_ns` (the
    /// old reader took the first key ending in `_ns`, the maximum).
    fn tc_output() -> serde_json::Value {
        serde_json::json!({"benchmark": "tc-cost", "results": [
            {"case": "deny", "entries": 10, "max_ns": 381.0, "median_ns": 366.0, "min_ns": 351.0, "ratio": 1.0},
            {"case": "deny", "entries": 100000, "max_ns": 399.0, "median_ns": 367.0, "min_ns": 355.0, "ratio": 1.006},
            {"case": "deny", "entries": 1000, "max_ns": 411.0, "median_ns": 368.0, "min_ns": 355.0, "ratio": 1.008},
            {"case": "allow-new", "entries": 10, "max_ns": 773.0, "median_ns": 751.0, "min_ns": 718.0, "ratio": 1.0},
            {"case": "allow-new", "entries": 100000, "max_ns": 843.5, "median_ns": 796.0, "min_ns": 753.0, "ratio": 1.062},
        ]})
    }

    #[test]
    fn tc_points_are_medians_not_maxima() {
        let p = tc_points(&tc_output());
        let got: Vec<(&str, u64, f64)> = p
            .iter()
            .map(|p| (p.case.as_str(), p.entries, p.median_ns))
            .collect();
        assert_eq!(
            got,
            vec![
                ("allow-new", 10, 751.0),
                ("allow-new", 100000, 796.0),
                ("deny", 10, 366.0),
                ("deny", 1000, 368.0),
                ("deny", 100000, 367.0),
            ]
        );
        assert!(tc_points(&serde_json::json!({"other": 1})).is_empty());
        // A row without a median is not a point, whatever other `_ns` keys it has.
        assert!(tc_points(&serde_json::json!({"results": [
            {"case": "deny", "entries": 10, "max_ns": 1.0, "min_ns": 1.0}
        ]}))
        .is_empty());
    }

    #[test]
    fn tc_spread_is_the_worst_case_of_the_largest_map() {
        match TcCost::from_output(tc_output()) {
            TcCost::Ran {
                spread,
                spread_case,
                ..
            } => {
                assert_eq!(spread, Some(1.062));
                assert_eq!(spread_case.as_deref(), Some("allow-new"));
            }
            other => panic!("{other:?}"),
        }
        // Without tc-cost's paired ratio: the ratio of the medians.
        let p = vec![
            TcPoint {
                case: "deny".into(),
                entries: 10,
                median_ns: 100.0,
                ratio: None,
            },
            TcPoint {
                case: "deny".into(),
                entries: 100000,
                median_ns: 120.0,
                ratio: None,
            },
        ];
        assert_eq!(tc_spread(&p), Some((1.2, "deny".to_string())));
        assert!(matches!(
            TcCost::from_output(serde_json::json!({"flat": true})),
            TcCost::Failed { .. }
        ));
    }

    fn control_json(run_id: &str, started_unix: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "run_id": run_id,
            "started_unix": started_unix,
            "finished_unix": started_unix + 90,
            "handshakes_per_cpu_second": 1200.0,
            "first_to_authenticated_ratio": 1.1,
        }))
        .unwrap()
    }

    #[test]
    fn control_json_is_used_only_from_this_run() {
        let run = Run {
            id: Some("r2".into()),
            started_unix: 1_000,
        };
        let c = control_for_run(Some(&control_json("r2", 1_005)), &run).unwrap();
        assert_eq!(c.handshakes_per_cpu_second, 1200.0);
        // Another run's file, a file older than this run, one without run id or time, none.
        let e = control_for_run(Some(&control_json("r1", 1_005)), &run).unwrap_err();
        assert!(e.contains("from run r1"), "{e}");
        let alone = Run {
            id: None,
            started_unix: 1_000,
        };
        assert!(control_for_run(Some(&control_json("r1", 1_005)), &alone).is_ok());
        let e = control_for_run(Some(&control_json("r1", 900)), &alone).unwrap_err();
        assert!(e.contains("older than this run"), "{e}");
        let old = br#"{"handshakes_per_cpu_second": 1090.9, "first_to_authenticated_ratio": 1.08}"#;
        let e = control_for_run(Some(old), &run).unwrap_err();
        assert!(e.contains("no run id"), "{e}");
        let e = control_for_run(None, &run).unwrap_err();
        assert!(e.contains("did not run"), "{e}");
    }

    #[test]
    fn a_bound_reads_as_it_checks() {
        use Bound::*;
        let cases = [
            (AtLeast(1.5), "x", ">= 1.5x", 1.5, 1.49),
            (AtMost(1.25), "x", "<= 1.25x", 1.25, 1.26),
            (Below(10.0), "MB", "< 10 MB", 9.99, 10.0),
            (AtLeast(1000.0), "/s", ">= 1000/s", 1000.0, 999.0),
            (Within(0.9, 1.1), "x", "within 0.9–1.1x", 1.1, 0.89),
        ];
        for (bound, unit, text, meets, misses) in cases {
            assert_eq!(bound.text(unit), text);
            assert!(bound.met(meets), "{text}: {meets}");
            assert!(!bound.met(misses), "{text}: {misses}");
        }
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
        med.insert(Contender::WireguardGo.key(), m(4.0, 40.0));
        let stale = Err("not used: control.json is from run r1, not this run (r2)".to_string());
        let t = targets(&med, &[], None, &stale);
        let find = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        assert_eq!(find("throughput, 1 stream").met, Some(true));
        assert_eq!(find("RR 64 B p50: veil / plaintext").met, Some(false));
        // 3 / 4 Gbit/s against wireguard-go: missed; 50 / 40 µs p50: missed.
        assert_eq!(
            find("throughput, 1 stream: veil / wireguard-go").measured,
            Some(0.75)
        );
        assert_eq!(
            find("throughput, 1 stream: veil / wireguard-go").met,
            Some(false)
        );
        assert_eq!(find("RR 64 B p50: veil / wireguard-go").met, Some(false));
        assert_eq!(find("idle: veil-wg CPU").met, None);
        assert_eq!(find("workload handshakes").met, None);
        assert!(find("workload handshakes").note.contains("from run r1"));
        let c = Control {
            run_id: "r2".into(),
            started_unix: 1,
            finished_unix: 2,
            handshakes_per_cpu_second: 1200.0,
            first_to_authenticated_ratio: 2.5,
        };
        let t = targets(&med, &[], None, &Ok(c));
        let find = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        assert_eq!(find("workload handshakes").met, Some(true));
        assert_eq!(find("first connection").met, Some(false));
        let tc = TcCost::from_output(tc_output());
        let t = targets(&med, &[], Some(&tc), &stale);
        let find = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        assert_eq!(find("TC per-packet cost").measured, Some(1.062));
        assert_eq!(find("TC per-packet cost").met, Some(true));
    }

    #[test]
    fn one_table_renders_aligned_text_and_markdown() {
        let mut t = Table::new(&["median", "veil", "veil / wireguard-go"]);
        t.row(vec![
            "TCP 1 stream (Gbit/s)".into(),
            "5.60".into(),
            "1.36".into(),
        ]);
        t.row(vec!["RR p50 (µs)".into(), "104.7".into(), "0.62".into()]);
        assert_eq!(
            t.text(),
            "  median                  veil  veil / wireguard-go\n\
             \x20 TCP 1 stream (Gbit/s)   5.60                 1.36\n\
             \x20 RR p50 (µs)            104.7                 0.62\n"
        );
        assert_eq!(
            t.markdown(),
            "| median | veil | veil / wireguard-go |\n|---|---:|---:|\n\
             | TCP 1 stream (Gbit/s) | 5.60 | 1.36 |\n| RR p50 (µs) | 104.7 | 0.62 |\n"
        );
        // A text column is left-aligned in both.
        let mut t = Table::new(&["target", "goal"]).text_columns(&[1]);
        t.row(vec!["a".into(), ">= 1.5x".into()]);
        t.row(vec!["bb".into(), "< 1".into()]);
        assert_eq!(
            t.text(),
            "  target  goal\n  a       >= 1.5x\n  bb      < 1\n"
        );
        assert!(t.markdown().contains("\n|---|---|\n"), "{}", t.markdown());
        // The whole report: every contender's median, each target with its status, in both.
        let mut med = BTreeMap::new();
        for (c, t1) in [
            (Contender::Plaintext, 20.0),
            (Contender::Veil, 3.0),
            (Contender::Boringtun, 0.6),
            (Contender::WireguardGo, 4.0),
        ] {
            let m = Medians {
                tcp1_gbit_per_s: Some(t1),
                ..Default::default()
            };
            med.insert(c.key(), m);
        }
        let stale = Err("no control run".to_string());
        let targets = targets(&med, &[], None, &stale);
        for out in [
            text(&med, &targets, &[], &TcCost::Missing),
            markdown(&med, &targets, &[], &TcCost::Missing, "Run: test."),
        ] {
            for cell in ["20.00", "3.00", "0.60", "4.00", "0.75", "MISSED", "n/a"] {
                assert!(out.contains(cell), "{cell:?} missing from\n{out}");
            }
            assert!(out.contains("not yet measurable"), "{out}");
        }
    }
}
