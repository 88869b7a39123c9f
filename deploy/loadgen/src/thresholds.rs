//! Pass/fail criteria, as k6 has them: `--threshold 'ttft_p99<50ms'` (several allowed). A run
//! whose report breaks one exits with [`BROKEN_EXIT_CODE`], so that CI can gate on a load test.
//!
//! Grammar: `NAME OP NUMBER [UNIT]`, where
//! - NAME is a latency statistic `ack|ttft|itl|e2e|connect|storm_reconnect` + `_` + `avg|min|p50|p90|p95|p99|p99_9|max`
//!   (compared in milliseconds; UNIT `us`, `ms` (default) or `s`), or a figure of the report:
//!   `tokens_per_second`, `messages_per_second`, `answers`, `errors`, `refused`, `reconnects`,
//!   `protocol_violations`, `dropped_sends`, `storm_reconnects`, `storm_reconnect_rate_per_s`,
//!   `goodput` (a share, 0 to 1);
//! - OP is `<`, `<=`, `>`, `>=` or `==`.

use serde_json::Value;

/// The exit code of a run that broke a threshold (k6 uses the same).
pub const BROKEN_EXIT_CODE: i32 = 99;

/// Latency histograms a threshold may name, as they appear in the report (`<name>_ms`).
const LATENCIES: [&str; 6] = ["ack", "ttft", "itl", "e2e", "connect", "storm_reconnect"];

/// Statistics of a latency histogram.
const STATS: [&str; 8] = ["avg", "min", "p50", "p90", "p95", "p99", "p99_9", "max"];

/// Plain figures of the report.
const FIGURES: [&str; 11] = [
    "tokens_per_second",
    "storm_reconnects",
    "storm_reconnect_rate_per_s",
    "messages_per_second",
    "answers",
    "errors",
    "refused",
    "reconnects",
    "protocol_violations",
    "dropped_sends",
    "goodput",
];

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
}

impl Op {
    fn holds(self, actual: f64, bound: f64) -> bool {
        match self {
            Self::Lt => actual < bound,
            Self::Le => actual <= bound,
            Self::Gt => actual > bound,
            Self::Ge => actual >= bound,
            Self::Eq => (actual - bound).abs() < 1e-9,
        }
    }
}

/// One parsed threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// As written.
    pub text: String,
    /// Where its figure is in the report: `ttft_ms.p99`, or `errors`.
    pub path: (String, Option<String>),
    /// The comparison.
    pub op: Op,
    /// The bound, in the report's unit (milliseconds for latencies).
    pub bound: f64,
}

/// What a threshold found.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// As written.
    pub text: String,
    /// The report's figure (none: the report lacks it, which breaks the threshold).
    pub actual: Option<f64>,
    /// Whether it held.
    pub passed: bool,
}

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact
            .find(['<', '>', '='])
            .ok_or_else(|| format!("'{text}': no comparison (<, <=, >, >=, ==)"))?;
        let (name, rest) = compact.split_at(at);
        let (op, rest) = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find_map(|(s, op)| rest.strip_prefix(s).map(|r| (op, r)))
        .ok_or_else(|| format!("'{text}': unknown comparison"))?;
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        let (number, unit) = rest.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("'{text}': '{number}' is not a number"))?;
        let latency = LATENCIES.iter().find_map(|h| {
            name.strip_prefix(h)
                .and_then(|r| r.strip_prefix('_'))
                .filter(|stat| STATS.contains(stat))
                .map(|stat| (*h, stat))
        });
        let (path, bound) = match latency {
            Some((hist, stat)) => {
                let scale = match unit {
                    "" | "ms" => 1.0,
                    "us" => 0.001,
                    "s" => 1000.0,
                    other => return Err(format!("'{text}': unknown unit '{other}' (us, ms, s)")),
                };
                (
                    (format!("{hist}_ms"), Some(stat.to_owned())),
                    number * scale,
                )
            }
            None if FIGURES.contains(&name) => {
                let bound = match unit {
                    "" | "/s" => number,
                    "%" => number / 100.0,
                    _ => return Err(format!("'{text}': {name} takes no unit")),
                };
                ((name.to_owned(), None), bound)
            }
            None => {
                return Err(format!(
                    "'{text}': unknown figure '{name}' (a latency {LATENCIES:?}_{STATS:?}, or one of {FIGURES:?})"
                ));
            }
        };
        Ok(Self {
            text: text.to_owned(),
            path,
            op,
            bound,
        })
    }
}

impl Threshold {
    /// Checks the threshold against a report's summary.
    pub fn check(&self, report: &Value) -> Outcome {
        let figure = match &self.path.1 {
            Some(stat) => &report[&self.path.0][stat],
            None => &report[&self.path.0],
        };
        let actual = figure.as_f64();
        Outcome {
            text: self.text.clone(),
            actual,
            passed: actual.is_some_and(|a| self.op.holds(a, self.bound)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Threshold {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn latencies_are_compared_in_milliseconds_whatever_the_unit() {
        let t = parse("ttft_p99<50ms");
        assert_eq!(t.path, ("ttft_ms".into(), Some("p99".into())));
        assert_eq!((t.op, t.bound), (Op::Lt, 50.0));
        assert_eq!(parse("e2e_max <= 2s").bound, 2000.0);
        assert_eq!(parse("itl_p50<800us").bound, 0.8);
        assert_eq!(parse("ack_p99_9<10").path.1.as_deref(), Some("p99_9"));
        assert_eq!(parse("connect_avg<5").path.0, "connect_ms");
    }

    #[test]
    fn figures_take_plain_numbers() {
        let t = parse("errors==0");
        assert_eq!((t.path.0.as_str(), t.op, t.bound), ("errors", Op::Eq, 0.0));
        assert_eq!(parse("tokens_per_second>=1000/s").op, Op::Ge);
        assert_eq!(parse("goodput>99%").bound, 0.99);
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        for bad in [
            "ttft_p99",
            "ttft_p42<5",
            "speed>3",
            "errors<x",
            "ttft_p99<5h",
            "errors<1ms",
        ] {
            let err = bad.parse::<Threshold>().expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_threshold_passes_or_breaks_on_the_report() {
        let report = json!({"ttft_ms": {"p99": 42.0}, "errors": 3});
        assert!(parse("ttft_p99<50ms").check(&report).passed);
        assert!(!parse("ttft_p99<40ms").check(&report).passed);
        assert!(!parse("errors==0").check(&report).passed);
        let missing = parse("itl_p99<5").check(&report);
        assert!(
            !missing.passed && missing.actual.is_none(),
            "a missing figure breaks it"
        );
    }
}
