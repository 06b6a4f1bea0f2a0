//! The results table and the SVG chart.

use crate::callgrind::Split;
use crate::{Row, median, median3};

pub(crate) fn render_table(rows: &[Row], runs: usize) -> String {
    let base = rows.iter().find(|r| r.name == "bare-ws").cloned().unwrap_or_default();
    let base_tls = rows.iter().find(|r| r.name == "bare-wss").cloned().unwrap_or_default();
    // The ratio to the bare bridge is taken within each run, where the two were measured
    // seconds apart, and the median of those ratios is shown: drift in the machine's load between
    // runs then cancels instead of adding to the spread.
    let ratio = |v: &[f64], b: &[f64]| {
        let per_run: Vec<f64> =
            v.iter().zip(b).filter(|(v, b)| v.is_finite() && **b > 0.0).map(|(v, b)| v / b).collect();
        if per_run.is_empty() { String::new() } else { format!(" ({:.2}×)", median(&per_run)) }
    };
    let p99 = |rows: &[[f64; 3]]| rows.iter().map(|r| r[1]).collect::<Vec<_>>();
    let mut s = format!(
        "Medians of {runs} interleaved runs; (×) is the median of the per-run ratios to the bare bridge of the same scheme (RTT: of p99).\n\n\
         | target | 1 × 64 KiB MB/s | 50 × 4 KiB MB/s | RTT 1 session p50/p99/p99.9 µs | RTT 50 sessions p50/p99/p99.9 µs | idle KiB/session | wss handshakes/s full / resumed | CPU s/GiB | instr/byte |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let b = if r.name.ends_with("wss") { &base_tls } else { &base };
        let (t1, t50) = (median(&r.mbps_1x64k), median(&r.mbps_50x4k));
        let (l1, l50) = (median3(&r.rtt1), median3(&r.rtt50));
        // A figure not taken in this run (e.g. with --callgrind-only) shows as "–".
        let num = |v: f64| if v.is_finite() { format!("{v:.0}") } else { "–".into() };
        let rtt = |l: [f64; 3]| l.map(num).join("/");
        s += &format!(
            "| {} | {}{} | {}{} | {}{} | {}{} | {} | {} | {} | {} |\n",
            r.name,
            num(t1),
            ratio(&r.mbps_1x64k, &b.mbps_1x64k),
            num(t50),
            ratio(&r.mbps_50x4k, &b.mbps_50x4k),
            rtt(l1),
            ratio(&p99(&r.rtt1), &p99(&b.rtt1)),
            rtt(l50),
            ratio(&p99(&r.rtt50), &p99(&b.rtt50)),
            r.idle_kib.map_or("–".into(), |k| format!("{k:.1}")),
            handshakes(r, b),
            if r.cpu_per_gib.is_empty() { "–".into() } else { format!("{:.2}", median(&r.cpu_per_gib)) },
            r.instr_per_byte.map_or("–".into(), |i| format!("{i:.2}")),
        );
    }
    s
}

/// The wss handshake column: full / resumed per second, with their ratios to the bare bridge.
fn handshakes(r: &Row, b: &Row) -> String {
    if r.hs_full.is_empty() {
        return "–".into();
    }
    let ratio = |v: &[f64], b: &[f64]| {
        let per_run: Vec<f64> = v.iter().zip(b).filter(|(_, b)| **b > 0.0).map(|(v, b)| v / b).collect();
        if per_run.is_empty() { "–".into() } else { format!("{:.2}×", median(&per_run)) }
    };
    let failed =
        if r.hs_not_resumed > 0 { format!(", FAILED: {} not resumed", r.hs_not_resumed) } else { String::new() };
    format!(
        "{:.0} / {:.0} ({} / {}{failed})",
        median(&r.hs_full),
        median(&r.hs_resumed),
        ratio(&r.hs_full, &b.hs_full),
        ratio(&r.hs_resumed, &b.hs_resumed)
    )
}

/// The wss handshake figures on their own: wall-clock medians and callgrind counts, full and
/// resumed apart, each with its ratio to the bare bridge.
pub(crate) fn render_handshakes(rows: &[Row], runs: usize) -> String {
    let base = rows.iter().find(|r| r.name == "bare-wss").cloned().unwrap_or_default();
    let x = |v: f64, b: Option<f64>| b.map_or(String::new(), |b| format!(" ({:.2}×)", v / b));
    let instr = |v: Option<Split>, b: Option<Split>| match v {
        Some(v) => format!(
            "{:.0}{} = {:.0}{} + {:.0}{}",
            v.total(),
            x(v.total(), b.map(|b| b.total())),
            v.open,
            x(v.open, b.map(|b| b.open)),
            v.close,
            x(v.close, b.map(|b| b.close))
        ),
        None => "–".into(),
    };
    let mut s = format!(
        "\nwss handshakes: medians of {runs} wall-clock windows (8 clients; targets taking turns) and callgrind \
         instructions per session opened and closed (= opening + closing); (×) against bare-wss.\n\n\
         | target | handshakes/s full / resumed | instr full | instr resumed |\n|---|---|---|---|\n"
    );
    for r in rows.iter().filter(|r| r.name.ends_with("wss")) {
        s += &format!(
            "| {} | {} | {} | {} |\n",
            r.name,
            handshakes(r, &base),
            instr(r.hs_instr_full, base.hs_instr_full),
            instr(r.hs_instr_resumed, base.hs_instr_resumed)
        );
    }
    s
}

/// A bar chart of single-session and 50-session throughput per target, as SVG.
pub(crate) fn render_chart(rows: &[Row]) -> String {
    let max = rows
        .iter()
        .flat_map(|r| [median(&r.mbps_1x64k), median(&r.mbps_50x4k)])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let (w, bar, gap, left) = (760.0, 14.0, 14.0, 110.0);
    let h = 50.0 + rows.len() as f64 * (2.0 * bar + gap);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Echo throughput, MB/s (dark: 1 session × 64 KiB; light: 50 sessions × 4 KiB)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (2.0 * bar + gap);
        s += &format!("<text x=\"10\" y=\"{}\">{}</text>\n", y + bar + 4.0, r.name);
        for (j, (v, color)) in
            [(median(&r.mbps_1x64k), "#1d4f91"), (median(&r.mbps_50x4k), "#7fa7d9")].into_iter().enumerate()
        {
            if !v.is_finite() {
                continue;
            }
            let len = (w - left - 80.0) * v / max;
            let yy = y + j as f64 * bar;
            s += &format!(
                "<rect x=\"{left}\" y=\"{yy}\" width=\"{len:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{v:.0}</text>\n",
                bar - 2.0,
                left + len + 4.0,
                yy + bar - 4.0
            );
        }
    }
    s + "</svg>\n"
}
