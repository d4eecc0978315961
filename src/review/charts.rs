//! Inline SVG charts for the statistics page, as the training report draws
//! them: nothing fetched, no script, every label escaped by maud, every
//! number finite.

use maud::{html, Markup};

const WIDTH: f64 = 720.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;

/// Colours of the series, in order.
pub const PALETTE: [&str; 8] = [
    "#3b73d9", "#d9822b", "#2ca02c", "#9467bd", "#d62728", "#17becf", "#8c564b", "#7f7f7f",
];

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// Vertical bars, one per `(label, value)`, in the order given; `id` names
/// the `<svg>` for tests and styles.
pub fn bars(id: &str, title: &str, items: &[(String, f64)]) -> Markup {
    let height = 220.0;
    let plot_h = height - TOP - BOTTOM;
    let max = items.iter().map(|(_, v)| finite(*v)).fold(0.0, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let n = items.len().max(1) as f64;
    let slot = (WIDTH - LEFT - RIGHT) / n;
    let bar_w = (slot * 0.7).clamp(1.0, 48.0);
    // Label every k-th bar so the dates do not overlap.
    let every = ((n * 70.0 / (WIDTH - LEFT - RIGHT)).ceil() as usize).max(1);
    html! {
        svg id=(id) class="chart" role="img" aria-label=(title) viewBox=(format!("0 0 {WIDTH} {height}")) {
            title { (title) }
            line .axis x1=(LEFT) y1=(TOP + plot_h) x2=(WIDTH - RIGHT) y2=(TOP + plot_h) {}
            text x=(LEFT - 6.0) y=(TOP + 10.0) text-anchor="end" { (format_value(max)) }
            text x=(LEFT - 6.0) y=(TOP + plot_h) text-anchor="end" { "0" }
            @for (i, (label, value)) in items.iter().enumerate() {
                @let h = finite(*value) / max * plot_h;
                @let x = LEFT + i as f64 * slot + (slot - bar_w) / 2.0;
                rect class="bar" x=(format!("{x:.1}")) y=(format!("{:.1}", TOP + plot_h - h)) width=(format!("{bar_w:.1}")) height=(format!("{h:.1}")) fill=(PALETTE[0]) {
                    title { (label) ": " (format_value(*value)) }
                }
                @if i % every == 0 {
                    text x=(format!("{:.1}", x + bar_w / 2.0)) y=(TOP + plot_h + 14.0) text-anchor="middle" { (label) }
                }
            }
        }
    }
}

/// Horizontal bars, one row per `(label, value)`, longest scale first.
pub fn hbars(id: &str, title: &str, items: &[(String, f64)]) -> Markup {
    let row = 20.0;
    let label_w = 260.0;
    let height = TOP + row * items.len().max(1) as f64 + 8.0;
    let max = items.iter().map(|(_, v)| finite(*v)).fold(0.0, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let span = WIDTH - label_w - RIGHT - 40.0;
    html! {
        svg id=(id) class="chart" role="img" aria-label=(title) viewBox=(format!("0 0 {WIDTH} {height}")) {
            title { (title) }
            @for (i, (label, value)) in items.iter().enumerate() {
                @let y = TOP + i as f64 * row;
                @let w = finite(*value) / max * span;
                text x=(label_w - 6.0) y=(format!("{:.1}", y + 13.0)) text-anchor="end" { (label) }
                rect class="bar" x=(label_w) y=(format!("{y:.1}")) width=(format!("{w:.1}")) height=(row - 6.0) fill=(PALETTE[4]) {
                    title { (label) ": " (format_value(*value)) }
                }
                text x=(format!("{:.1}", label_w + w + 4.0)) y=(format!("{:.1}", y + 13.0)) { (format_value(*value)) }
            }
        }
    }
}

/// One line of a line chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x position index, y in [0, 1])`; x indexes `x_labels`.
    pub points: Vec<(usize, f64)>,
}

/// Lines over shared x labels (e.g. days), y in [0, 1] (shares).
pub fn lines(id: &str, title: &str, x_labels: &[String], series: &[Series]) -> Markup {
    lines_in(id, title, x_labels, series, (0.0, 1.0))
}

/// Lines with the y axis on `range` (shares), for curves whose differences
/// a [0, 1] axis would flatten.
pub fn lines_in(
    id: &str,
    title: &str,
    x_labels: &[String],
    series: &[Series],
    range: (f64, f64),
) -> Markup {
    let (lo, hi) = (finite(range.0), finite(range.1));
    let (lo, hi) = if hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let height = 240.0;
    let legend_h = 18.0 * series.len() as f64;
    let plot_h = height - TOP - BOTTOM;
    let n = x_labels.len().max(2) as f64 - 1.0;
    let x_of = |i: usize| LEFT + (WIDTH - LEFT - RIGHT) * i as f64 / n;
    let y_of = |v: f64| TOP + plot_h * (1.0 - ((finite(v) - lo) / (hi - lo)).clamp(0.0, 1.0));
    let every = ((x_labels.len() as f64 * 70.0 / (WIDTH - LEFT - RIGHT)).ceil() as usize).max(1);
    let ticks: Vec<f64> = (0..=4)
        .map(|k| lo + (hi - lo) * f64::from(k) / 4.0)
        .collect();
    let decimals = if hi - lo < 0.2 { 1 } else { 0 };
    html! {
        svg id=(id) class="chart" role="img" aria-label=(title) viewBox=(format!("0 0 {WIDTH} {}", height + legend_h)) {
            title { (title) }
            @for tick in ticks {
                line .grid x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y_of(tick))) y2=(format!("{:.1}", y_of(tick))) {}
                text x=(LEFT - 6.0) y=(format!("{:.1}", y_of(tick) + 4.0)) text-anchor="end" { (format!("{:.*}%", decimals, tick * 100.0)) }
            }
            @for (i, label) in x_labels.iter().enumerate() {
                @if i % every == 0 {
                    text x=(format!("{:.1}", x_of(i))) y=(TOP + plot_h + 14.0) text-anchor="middle" { (label) }
                }
            }
            @for (k, s) in series.iter().enumerate() {
                @let color = PALETTE[k % PALETTE.len()];
                @let path = s.points.iter().map(|&(i, v)| format!("{:.1},{:.1}", x_of(i), y_of(v))).collect::<Vec<_>>().join(" ");
                polyline class="series" fill="none" stroke=(color) stroke-width="2" points=(path) {}
                @for &(i, v) in &s.points {
                    circle cx=(format!("{:.1}", x_of(i))) cy=(format!("{:.1}", y_of(v))) r="3" fill=(color) {
                        title { (s.name) " " (x_labels.get(i).map(String::as_str).unwrap_or("")) ": " (format!("{:.1}%", finite(v) * 100.0)) }
                    }
                }
                rect x=(LEFT) y=(height + 18.0 * k as f64 - 4.0) width="12" height="12" fill=(color) {}
                text .legend x=(LEFT + 18.0) y=(height + 18.0 * k as f64 + 6.0) { (s.name) }
            }
        }
    }
}

/// Horizontal bars in groups: one row per label, one bar per series in it,
/// values in [0, 1] (shares).
pub fn grouped(id: &str, title: &str, labels: &[String], series: &[Series]) -> Markup {
    let bar = 9.0;
    let group = bar * series.len().max(1) as f64 + 8.0;
    let label_w = 260.0;
    let legend_h = 18.0 * series.len() as f64;
    let height = TOP + group * labels.len().max(1) as f64 + legend_h + 8.0;
    let span = WIDTH - label_w - RIGHT - 50.0;
    html! {
        svg id=(id) class="chart" role="img" aria-label=(title) viewBox=(format!("0 0 {WIDTH} {height}")) {
            title { (title) }
            @for (i, label) in labels.iter().enumerate() {
                @let y = TOP + i as f64 * group;
                text x=(label_w - 6.0) y=(format!("{:.1}", y + group / 2.0)) text-anchor="end" { (label) }
                @for (k, s) in series.iter().enumerate() {
                    @if let Some(&(_, v)) = s.points.iter().find(|(x, _)| *x == i) {
                        @let w = finite(v).clamp(0.0, 1.0) * span;
                        @let by = y + k as f64 * bar;
                        rect class="bar" x=(label_w) y=(format!("{by:.1}")) width=(format!("{w:.1}")) height=(bar - 1.0) fill=(PALETTE[k % PALETTE.len()]) {
                            title { (s.name) " " (label) ": " (format!("{:.1}%", finite(v) * 100.0)) }
                        }
                        text x=(format!("{:.1}", label_w + w + 4.0)) y=(format!("{:.1}", by + bar - 1.0)) { (format!("{:.0}%", finite(v) * 100.0)) }
                    }
                }
            }
            @for (k, s) in series.iter().enumerate() {
                @let ly = TOP + group * labels.len().max(1) as f64 + 18.0 * k as f64;
                rect x=(label_w) y=(format!("{ly:.1}")) width="12" height="12" fill=(PALETTE[k % PALETTE.len()]) {}
                text .legend x=(label_w + 18.0) y=(format!("{:.1}", ly + 10.0)) { (s.name) }
            }
        }
    }
}

fn format_value(v: f64) -> String {
    let v = finite(v);
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_labels_and_stay_finite() {
        let items = vec![
            ("<script>".to_owned(), 3.0),
            ("b".to_owned(), f64::NAN),
            ("c".to_owned(), 0.0),
        ];
        for svg in [bars("x", "t", &items), hbars("y", "t", &items)] {
            let s = svg.into_string();
            assert!(
                s.contains("&lt;script&gt;") && !s.contains("<script>"),
                "{s}"
            );
            assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
            assert_eq!(s.matches("class=\"bar\"").count(), 3);
        }
        let s = lines(
            "z",
            "t",
            &["d1".to_owned(), "d2".to_owned()],
            &[Series {
                name: "v1 <a>".to_owned(),
                points: vec![(0, 0.5), (1, f64::INFINITY)],
            }],
        )
        .into_string();
        assert!(s.contains("v1 &lt;a&gt;") && !s.contains("inf"), "{s}");
        assert_eq!(s.matches("<circle").count(), 2);
        // Empty inputs draw an empty chart, not a panic.
        assert!(bars("e", "t", &[]).into_string().contains("<svg"));
        assert!(lines("e", "t", &[], &[]).into_string().contains("<svg"));
    }
}
