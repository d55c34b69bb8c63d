//! Results: per-core statistics merged at the end, the summary table, `--json`, `--hgrm` and
//! the percentile plot (`--plot`). Pure apart from writing the files it is asked for.

use super::codec::status_name;
use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Latencies are recorded in nanoseconds, 3 significant digits, up to 100 s.
const HIGHEST_NS: u64 = 100_000_000_000;
const SIGFIG: u8 = 3;

/// New empty latency histogram (ns).
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Fixed, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, HIGHEST_NS, SIGFIG).expect("valid histogram bounds")
}

/// What one load-generator core measured inside the measurement window.
#[derive(Clone, Debug)]
pub(crate) struct Stats {
    /// From each request's intended send time (equals the actual one in closed loop).
    pub(crate) corrected: Histogram<u64>,
    /// From each request's actual send time.
    pub(crate) uncorrected: Histogram<u64>,
    /// Answers with status 200.
    pub(crate) ok: u64,
    /// Everything else, by status (see `codec::status_name`).
    pub(crate) errors: BTreeMap<u16, u64>,
    /// `--conn-per-request` over TLS: handshakes done in full.
    pub(crate) full_handshakes: u64,
    /// `--conn-per-request` over TLS: handshakes that resumed a session.
    pub(crate) resumed_handshakes: u64,
    /// The start of the body of the first answer seen with each error status (a few
    /// statuses at most), so that a failed run says why (`codec::Event::ErrorBody`). Unlike
    /// the counts above, the warm-up's answers are sampled too: a run that fails from its
    /// start says why even when its warm-up took the connection's one sample.
    pub(crate) error_samples: BTreeMap<u16, String>,
}

/// Most error statuses whose first answer [`Stats::error_samples`] keeps.
const MAX_ERROR_SAMPLES: usize = 8;

impl Default for Stats {
    fn default() -> Self {
        Stats {
            corrected: new_histogram(),
            uncorrected: new_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            full_handshakes: 0,
            resumed_handshakes: 0,
            error_samples: BTreeMap::new(),
        }
    }
}

impl Stats {
    /// Records one answered (or failed) request. Only 200s go into the latency histograms.
    pub(crate) fn record(&mut self, status: u16, corrected_ns: u64, uncorrected_ns: u64) {
        if status == 200 {
            self.ok += 1;
            self.corrected.saturating_record(corrected_ns.max(1));
            self.uncorrected.saturating_record(uncorrected_ns.max(1));
        } else {
            *self.errors.entry(status).or_insert(0) += 1;
        }
    }

    /// Keeps `body` as the sample of `status` unless one is kept already.
    pub(crate) fn sample_error(&mut self, status: u16, body: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES || self.error_samples.contains_key(&status)
        {
            self.error_samples.entry(status).or_insert(body);
        }
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub(crate) fn requests(&self) -> u64 {
        self.ok + self.error_count()
    }

    pub(crate) fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides: addition cannot fail.
        let _ = self.corrected.add(&other.corrected);
        let _ = self.uncorrected.add(&other.uncorrected);
        self.ok += other.ok;
        self.full_handshakes += other.full_handshakes;
        self.resumed_handshakes += other.resumed_handshakes;
        for (k, v) in &other.errors {
            *self.errors.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.error_samples {
            self.sample_error(*k, v.clone());
        }
    }
}

/// Percentiles reported everywhere: (json key, table heading, quantile).
const POINTS: [(&str, &str, f64); 5] = [
    ("p50", "p50", 0.50),
    ("p90", "p90", 0.90),
    ("p99", "p99", 0.99),
    ("p999", "p99.9", 0.999),
    ("p9999", "p99.99", 0.9999),
];

fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 10.0).round() / 10.0
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let mut m = serde_json::Map::new();
    for (k, _, q) in POINTS {
        m.insert(k.into(), json!(us(h.value_at_quantile(q))));
    }
    m.insert("max".into(), json!(us(h.max())));
    m.insert("mean".into(), json!(us(h.mean() as u64)));
    Value::Object(m)
}

/// The percentile curve for plots: `[[percentile (0..100), us], ...]`.
pub(crate) fn curve(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut v: Vec<[f64; 2]> = h
        .iter_quantiles(5)
        .map(|it| {
            [
                it.quantile_iterated_to() * 100.0,
                it.value_iterated_to() as f64 / 1000.0,
            ]
        })
        .collect();
    v.dedup_by(|a, b| a[0] == b[0]);
    v
}

/// A finished run.
pub(crate) struct Report {
    pub(crate) label: String,
    /// Length of the measurement window (seconds).
    pub(crate) seconds: f64,
    /// Open loop: also report the uncorrected latency.
    pub(crate) open_loop: bool,
    pub(crate) stats: Stats,
    /// The flags, for the json (what was measured, and how).
    pub(crate) settings: Value,
    /// CPU seconds (user + system) of the measured server processes over the window.
    pub(crate) cpu_seconds: Option<f64>,
}

impl Report {
    pub(crate) fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.stats.requests() as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Server CPU microseconds per request and requests per server CPU-second.
    pub(crate) fn cpu_per_request(&self) -> Option<(f64, f64)> {
        let cpu = self.cpu_seconds?;
        let n = self.stats.requests();
        if n == 0 || cpu <= 0.0 {
            return None;
        }
        Some((cpu * 1e6 / n as f64, n as f64 / cpu))
    }

    /// The `--json` document.
    pub(crate) fn to_json(&self) -> Value {
        let s = &self.stats;
        let errors: serde_json::Map<String, Value> = s
            .errors
            .iter()
            .map(|(k, v)| (status_name(*k), json!(v)))
            .collect();
        let mut doc = json!({
            "label": self.label,
            "requests": s.requests(),
            "ok": s.ok,
            "errors": s.error_count(),
            "rps": (self.rps() * 10.0).round() / 10.0,
            "seconds": self.seconds,
            "latency_us": latency_json(&s.corrected),
            "errors_by_status": errors,
            "settings": self.settings,
            "curve": curve(&s.corrected),
        });
        if self.open_loop {
            doc["uncorrected_latency_us"] = latency_json(&s.uncorrected);
        }
        if s.full_handshakes + s.resumed_handshakes > 0 {
            doc["tls_handshakes"] = json!({
                "full": s.full_handshakes,
                "resumed": s.resumed_handshakes,
            });
        }
        if let Some(cpu) = self.cpu_seconds {
            let per = self.cpu_per_request();
            doc["server_cpu"] = json!({
                "cpu_seconds": (cpu * 1000.0).round() / 1000.0,
                "us_per_request": per.map(|p| (p.0 * 100.0).round() / 100.0),
                "requests_per_cpu_second": per.map(|p| p.1.round()),
            });
        }
        doc
    }

    /// The summary table.
    pub(crate) fn table(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        out.push_str(&format!("run            {}\n", self.label));
        out.push_str(&format!(
            "requests       {} in {:.2} s ({} ok, {} errors)\n",
            s.requests(),
            self.seconds,
            s.ok,
            s.error_count()
        ));
        if !s.errors.is_empty() {
            let e: Vec<String> = s
                .errors
                .iter()
                .map(|(k, v)| format!("{}: {v}", status_name(*k)))
                .collect();
            out.push_str(&format!("errors         {}\n", e.join(", ")));
        }
        out.push_str(&format!("throughput     {:.0} req/s\n", self.rps()));
        if s.full_handshakes + s.resumed_handshakes > 0 {
            out.push_str(&format!(
                "tls handshakes {} full, {} resumed\n",
                s.full_handshakes, s.resumed_handshakes
            ));
        }
        if let (Some(cpu), Some((us, per_core))) = (self.cpu_seconds, self.cpu_per_request()) {
            out.push_str(&format!(
                "server cpu     {cpu:.2} s: {us:.2} us/request, {per_core:.0} requests per CPU-second\n"
            ));
        }
        let row = |name: &str, h: &Histogram<u64>| {
            let mut r = format!("{name:<15}");
            for (_, _, q) in POINTS {
                r.push_str(&format!("{:>10.1}", us(h.value_at_quantile(q))));
            }
            r.push_str(&format!("{:>10.1}\n", us(h.max())));
            r
        };
        let mut head = format!("{:<15}", "latency (us)");
        for (_, t, _) in POINTS {
            head.push_str(&format!("{t:>10}"));
        }
        head.push_str(&format!("{:>10}\n", "max"));
        out.push_str(&head);
        if self.open_loop {
            out.push_str(&row("  corrected", &s.corrected));
            out.push_str(&row("  uncorrected", &s.uncorrected));
        } else {
            out.push_str(&row("", &s.corrected));
        }
        out
    }
}

/// HdrHistogram's classic percentile distribution text (values in microseconds).
pub(crate) fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for it in h.iter_quantiles(5) {
            total += it.count_since_last_iteration();
            let q = it.quantile_iterated_to();
            let v = it.value_iterated_to() as f64 / 1000.0;
            if q < 1.0 {
                out.push_str(&format!(
                    "{v:12.3} {q:2.12} {total:10} {:14.2}\n",
                    1.0 / (1.0 - q)
                ));
            } else {
                out.push_str(&format!("{v:12.3} {q:2.12} {total:10}\n"));
            }
        }
    }
    let mean = if h.is_empty() { 0.0 } else { h.mean() / 1000.0 };
    let sd = if h.is_empty() {
        0.0
    } else {
        h.stdev() / 1000.0
    };
    out.push_str(&format!(
        "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n#[Buckets = {:12}, SubBuckets     = {:12}]\n",
        h.max() as f64 / 1000.0,
        h.len(),
        h.buckets(),
        2048
    ));
    out
}

/// One curve on the plot.
pub(crate) struct Curve {
    pub(crate) label: String,
    pub(crate) points: Vec<[f64; 2]>,
}

/// Reads the curve of an earlier run's `--json` file.
pub(crate) fn curve_from_json(path: &Path) -> anyhow::Result<Curve> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let label = v["label"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| path.display().to_string());
    let points = v["curve"]
        .as_array()
        .with_context(|| {
            format!(
                "{}: no \"curve\" array (not a fedbus bench --json file?)",
                path.display()
            )
        })?
        .iter()
        .filter_map(|p| Some([p.get(0)?.as_f64()?, p.get(1)?.as_f64()?]))
        .collect();
    Ok(Curve { label, points })
}

/// x position of a percentile: 1/(1-p), capped so that p = 100 stays on the chart.
fn x_of(pct: f64, xmax: f64) -> f64 {
    let q = pct / 100.0;
    if q >= 1.0 {
        xmax
    } else {
        (1.0 / (1.0 - q)).min(xmax)
    }
}

/// Tick label for an x position: 10 -> "90%", 1000 -> "99.9%".
fn x_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let s = format!("{p:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Draws latency (us, log y) by percentile (1/(1-p), log x), one line per curve, to an SVG.
pub(crate) fn plot(path: &Path, curves: &[Curve]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let (mut ymin, mut ymax, mut xmax) = (f64::MAX, 1.0f64, 10.0f64);
    for c in curves {
        for p in &c.points {
            ymin = ymin.min(p[1]);
            ymax = ymax.max(p[1]);
            if p[0] < 100.0 {
                xmax = xmax.max(1.0 / (1.0 - p[0] / 100.0));
            }
        }
    }
    if ymin == f64::MAX {
        anyhow::bail!("nothing to plot: no run has latencies");
    }
    // Round x up to a power of ten so the ticks land on 90%, 99%, 99.9%, ...
    let xmax = 10f64.powf(xmax.log10().ceil().max(1.0));
    let ymin = (ymin * 0.8).max(0.1);
    let ymax = ymax * 1.25;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_label_formatter(&|x| x_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, c) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let pts: Vec<(f64, f64)> = c.points.iter().map(|p| (x_of(p[0], xmax), p[1])).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut s = Stats::default();
        for i in 1..=1000u64 {
            s.record(200, i * 1000, i * 500);
        }
        s.record(401, 0, 0);
        s.record(super::super::codec::STATUS_TIMEOUT, 0, 0);
        let mut other = Stats::default();
        other.record(401, 0, 0);
        s.merge(&other);
        Report {
            label: "test".into(),
            seconds: 2.0,
            open_loop: true,
            stats: s,
            settings: json!({"size": 64}),
            cpu_seconds: None,
        }
    }

    #[test]
    fn json_shape() {
        let r = sample();
        let j = r.to_json();
        assert_eq!(j["label"], "test");
        assert_eq!(j["requests"], 1003);
        assert_eq!(j["errors"], 3);
        assert_eq!(j["rps"], 501.5);
        assert_eq!(j["errors_by_status"]["401"], 2);
        assert_eq!(j["errors_by_status"]["timeout"], 1);
        for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(j["latency_us"][k].as_f64().is_some(), "{k}");
            assert!(j["uncorrected_latency_us"][k].as_f64().is_some(), "{k}");
        }
        let p50 = j["latency_us"]["p50"].as_f64().unwrap();
        assert!((499.0..=502.0).contains(&p50), "{p50}");
        assert_eq!(j["settings"]["size"], 64);
        let curve = j["curve"].as_array().unwrap();
        assert!(curve.len() > 10);
        assert_eq!(curve.last().unwrap()[0], 100.0);
        // Closed loop has no uncorrected block.
        let mut r = r;
        r.open_loop = false;
        assert!(r.to_json().get("uncorrected_latency_us").is_none());
    }

    #[test]
    fn server_cpu_per_request() {
        let mut r = sample();
        assert!(r.cpu_per_request().is_none());
        assert!(r.to_json().get("server_cpu").is_none());
        r.cpu_seconds = Some(0.5);
        let (us, per_core) = r.cpu_per_request().unwrap();
        assert!((us - 0.5e6 / 1003.0).abs() < 1e-6, "{us}");
        assert!((per_core - 2006.0).abs() < 1e-6, "{per_core}");
        let j = r.to_json();
        assert_eq!(j["server_cpu"]["requests_per_cpu_second"], 2006.0);
        assert!(r.table().contains("us/request"));
        r.cpu_seconds = Some(0.0);
        assert!(r.cpu_per_request().is_none());
        assert!(r.to_json().get("tls_handshakes").is_none());
        r.stats.full_handshakes = 3;
        let other = Stats {
            resumed_handshakes: 2,
            ..Stats::default()
        };
        r.stats.merge(&other);
        assert_eq!(
            r.to_json()["tls_handshakes"],
            json!({"full": 3, "resumed": 2})
        );
        assert!(r.table().contains("3 full, 2 resumed"));
    }

    #[test]
    fn hgrm_format() {
        let r = sample();
        let t = hgrm(&r.stats.corrected);
        let mut lines = t.lines();
        assert_eq!(
            lines.next().unwrap(),
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines.next().unwrap(), "");
        let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(first, vec!["1.000", "0.000000000000", "1", "1.00"]);
        assert!(t.contains("#[Max     ="));
        assert!(t.contains("Total count    =         1000]"));
    }

    #[test]
    fn table_and_labels() {
        let t = sample().table();
        assert!(t.contains("throughput     502 req/s"), "{t}");
        assert!(t.contains("uncorrected"));
        assert!(t.contains("401: 2"));
        assert_eq!(x_label(10.0), "90%");
        assert_eq!(x_label(1000.0), "99.9%");
        assert_eq!(x_label(1.0), "0%");
    }

    #[test]
    fn plot_and_json_round_trip() {
        let dir = std::env::temp_dir().join(format!("fedbus-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jpath = dir.join("a.json");
        std::fs::write(&jpath, sample().to_json().to_string()).unwrap();
        let c = curve_from_json(&jpath).unwrap();
        assert_eq!(c.label, "test");
        let svg = dir.join("p.svg");
        let mine = Curve {
            label: "now".into(),
            points: curve(&sample().stats.corrected),
        };
        plot(&svg, &[c, mine]).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("polyline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
