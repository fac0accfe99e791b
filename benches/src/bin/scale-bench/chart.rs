//! `scale-chart.png`: the agent's cost against the cluster's size, one panel per figure, a bar
//! group per size, a bar per cluster source, drawn from the results files (`scale.json`,
//! `scale-kubernetes.json`) so that each source's last run is on it whichever ran last.

use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;
use veil_benches::chart;

/// The results files, in the chart's series order, and their series names.
const SOURCES: [(&str, &str); 2] = [
    ("scale.json", "file source"),
    ("scale-kubernetes.json", "Kubernetes source"),
];

/// The figures charted: title, unit (with the target at the largest size), the point's field.
/// ASCII arrows and signs: the chart's 8x8 font has Latin-1 glyphs only.
const FIGURES: [(&str, &str, &str); 5] = [
    ("agent RSS", "MB (target <= 150)", "rss_mb"),
    (
        "policy change -> maps",
        "ms (target <= 1,000)",
        "policy_change_ms",
    ),
    (
        "pod added -> enforceable",
        "ms (target <= 1,000)",
        "pod_add_ms",
    ),
    ("restart -> ready", "s", "restart_to_ready_s"),
    ("idle CPU", "% of a core", "idle_cpu_percent"),
];

/// Draws the chart into `out_dir` from the results files there; a source without a file (or
/// without a point at some size) has no bar there. Returns the chart's path.
pub fn draw(out_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let runs: Vec<Option<Value>> = SOURCES
        .iter()
        .map(|(file, _)| read(&out_dir.join(file)))
        .collect::<anyhow::Result<_>>()?;
    let point_sizes = |run: &Value| -> Vec<(u64, u64, u64)> {
        run["points"]
            .as_array()
            .map(|ps| ps.iter().filter_map(size_of).collect())
            .unwrap_or_default()
    };
    let mut sizes: Vec<(u64, u64, u64)> = runs.iter().flatten().flat_map(point_sizes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    anyhow::ensure!(
        !sizes.is_empty(),
        "no scale results in {} to chart (run scale-bench first)",
        out_dir.display()
    );
    let value = |run: &Option<Value>, size: (u64, u64, u64), field: &str| -> Option<f64> {
        run.as_ref()?["points"]
            .as_array()?
            .iter()
            .find(|p| size_of(p) == Some(size))?[field]
            .as_f64()
    };
    let panels: Vec<chart::Panel> = FIGURES
        .iter()
        .map(|(title, unit, field)| chart::Panel {
            title: (*title).into(),
            unit: (*unit).into(),
            groups: sizes
                .iter()
                .map(|&size| chart::Group {
                    label: format!("{} nodes", thousands(size.0)),
                    values: runs.iter().map(|r| value(r, size, field)).collect(),
                    spread: vec![None; runs.len()],
                })
                .collect(),
        })
        .collect();
    let footer = format!(
        "one agent (node-a) in a simulated cluster · nodes / endpoints / rules: {} · latencies: medians of the rounds · machines: {}",
        sizes
            .iter()
            .map(|(n, e, r)| format!("{} / {} / {}", thousands(*n), thousands(*e), thousands(*r)))
            .collect::<Vec<_>>()
            .join(", "),
        runs.iter()
            .zip(SOURCES)
            .filter_map(|(r, (_, name))| {
                let m = &r.as_ref()?["machine"];
                Some(format!(
                    "{name} {} cpus, kernel {}",
                    m["cpus"],
                    m["kernel"].as_str().unwrap_or("?")
                ))
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    let series: Vec<&str> = SOURCES.iter().map(|(_, name)| *name).collect();
    let path = out_dir.join("scale-chart.png");
    chart::render(
        &path,
        "veil agent: cost against cluster size (scale-bench)",
        &footer,
        &series,
        &panels,
    )?;
    Ok(path)
}

/// A results file, or `None` if there is none.
fn read(path: &Path) -> anyhow::Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a scale-bench results file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn size_of(point: &Value) -> Option<(u64, u64, u64)> {
    let s = &point["size"];
    Some((
        s["nodes"].as_u64()?,
        s["endpoints"].as_u64()?,
        s["rules"].as_u64()?,
    ))
}

/// `n` with thousands separated by commas, as the tables write them.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated_as_in_the_tables() {
        let got: Vec<String> = [0, 10, 999, 1000, 100000, 1234567]
            .into_iter()
            .map(thousands)
            .collect();
        assert_eq!(got, ["0", "10", "999", "1,000", "100,000", "1,234,567"]);
    }
}
