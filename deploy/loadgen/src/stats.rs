//! Per-socket measurements and their merged summary.
//!
//! Latencies are kept in full HDR histograms (3 significant digits, 1 µs to 10 min) and
//! reported as k6 does (`avg min p50 p90 p95 p99 p99_9 max`, in milliseconds): connect (TCP
//! connect → `connection_established`), ack (send → `message_received`), TTFT (send → first
//! token), ITL (gap between consecutive tokens of one answer) and end to end (send →
//! `message_stream_ended`).
//!
//! A socket records into [`Latencies`]: plain samples until there are many, and only then a
//! histogram. A full histogram is about 250 KB of counters, five per socket: zeroing them cost
//! the generator more than its sockets did (1.5 ms of CPU per socket, most in page faults).

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

/// What one socket (or, merged, the whole run) saw.
pub struct Report {
    /// Sockets merged into this report that completed their handshake.
    pub sockets: u64,
    /// Token events received.
    pub tokens: u64,
    /// Answers completed (`message_stream_ended`).
    pub answers: u64,
    /// Error events received, by `error_code`.
    pub errors: BTreeMap<String, u64>,
    /// Handshakes refused, by `error_code` (or `connect` when no socket opened at all).
    pub refused: BTreeMap<String, u64>,
    /// Reconnections after a close (1012 and the like), resuming with `last_seq`.
    pub reconnects: u64,
    /// Protocol violations (order, content mismatch, unparsable events, `seq` gaps).
    pub violations: u64,
    /// Paced sends that could not go out on time (the generator or the socket fell behind).
    pub dropped_sends: u64,
    /// Answers (of the sender's own messages) that ended within the goodput bound.
    pub good_answers: u64,
    /// TCP connect → `connection_established`, microseconds.
    pub connect_us: Latencies,
    /// Send → `message_received`, microseconds.
    pub ack_us: Latencies,
    /// Send → first token of its answer, microseconds.
    pub ttft_us: Latencies,
    /// Between consecutive tokens of one answer, microseconds.
    pub itl_us: Latencies,
    /// Send → `message_stream_ended`, microseconds.
    pub e2e_us: Latencies,
    /// A storm's close → `connection_established` again (`--storm-at`), microseconds.
    pub storm_us: Latencies,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// Samples kept as they are until [`PENDING`], then folded into a histogram.
const PENDING: usize = 4096;

/// Latency samples in microseconds: a list while short, a histogram once long.
#[derive(Default)]
pub struct Latencies {
    pending: Vec<u64>,
    hist: Option<Box<Histogram<u64>>>,
}

impl Latencies {
    /// Records a duration, saturating at the histogram's bound.
    pub fn record(&mut self, d: Duration) {
        self.pending
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
        if self.pending.len() >= PENDING {
            self.fold();
        }
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.pending.len() as u64 + self.hist.as_ref().map_or(0, |h| h.len())
    }

    /// Adds another's samples.
    pub fn merge(&mut self, other: Latencies) {
        if let Some(theirs) = other.hist {
            match &mut self.hist {
                Some(mine) => {
                    let _ = mine.add(&*theirs);
                }
                None => self.hist = Some(theirs),
            }
        }
        self.pending.extend(other.pending);
        if self.pending.len() >= PENDING {
            self.fold();
        }
    }

    fn fold(&mut self) {
        if self.hist.is_none() {
            self.hist = histogram().ok().map(Box::new);
        }
        if let Some(h) = &mut self.hist {
            for us in self.pending.drain(..) {
                h.saturating_record(us);
            }
        }
    }

    /// The samples as `[value, count]` pairs (how a shard hands them to the parent process).
    pub fn to_json(&self) -> anyhow::Result<Value> {
        let h = self.histogram()?;
        let pairs: Vec<[u64; 2]> = h
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect();
        Ok(json!(pairs))
    }

    /// Samples from [`Self::to_json`]'s pairs.
    pub fn from_json(v: &Value) -> anyhow::Result<Self> {
        let pairs: Vec<[u64; 2]> = serde_json::from_value(v.clone())?;
        let mut h = histogram()?;
        for [value, count] in pairs {
            h.saturating_record_n(value, count);
        }
        Ok(Self {
            pending: Vec::new(),
            hist: Some(Box::new(h)),
        })
    }

    /// Every sample in one histogram.
    pub fn histogram(&self) -> anyhow::Result<Histogram<u64>> {
        let mut h = match &self.hist {
            Some(h) => (**h).clone(),
            None => histogram()?,
        };
        for &us in &self.pending {
            h.saturating_record(us);
        }
        Ok(h)
    }
}

impl Report {
    /// An empty report.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sockets: 0,
            tokens: 0,
            answers: 0,
            errors: BTreeMap::new(),
            refused: BTreeMap::new(),
            reconnects: 0,
            violations: 0,
            dropped_sends: 0,
            good_answers: 0,
            connect_us: Latencies::default(),
            ack_us: Latencies::default(),
            ttft_us: Latencies::default(),
            itl_us: Latencies::default(),
            e2e_us: Latencies::default(),
            storm_us: Latencies::default(),
        })
    }

    /// Counts one under `code`.
    pub fn count(map: &mut BTreeMap<String, u64>, code: &str) {
        *map.entry(code.to_owned()).or_default() += 1;
    }

    /// Adds another report into this one.
    pub fn merge(&mut self, other: Report) {
        self.sockets += other.sockets;
        self.tokens += other.tokens;
        self.answers += other.answers;
        self.reconnects += other.reconnects;
        self.violations += other.violations;
        self.dropped_sends += other.dropped_sends;
        self.good_answers += other.good_answers;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, n) in other.refused {
            *self.refused.entry(code).or_default() += n;
        }
        self.connect_us.merge(other.connect_us);
        self.ack_us.merge(other.ack_us);
        self.ttft_us.merge(other.ttft_us);
        self.itl_us.merge(other.itl_us);
        self.e2e_us.merge(other.e2e_us);
        self.storm_us.merge(other.storm_us);
    }

    /// The whole report as JSON, histograms included: what a shard process prints for the
    /// parent to [`Self::from_json`] and merge.
    pub fn to_json(&self) -> anyhow::Result<Value> {
        Ok(json!({
            "sockets": self.sockets, "tokens": self.tokens, "answers": self.answers,
            "errors": self.errors, "refused": self.refused, "reconnects": self.reconnects,
            "violations": self.violations, "dropped_sends": self.dropped_sends,
            "good_answers": self.good_answers,
            "connect_us": self.connect_us.to_json()?, "ack_us": self.ack_us.to_json()?,
            "ttft_us": self.ttft_us.to_json()?, "itl_us": self.itl_us.to_json()?,
            "e2e_us": self.e2e_us.to_json()?, "storm_us": self.storm_us.to_json()?,
        }))
    }

    /// A report from [`Self::to_json`].
    pub fn from_json(v: &Value) -> anyhow::Result<Self> {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let codes = |k: &str| -> anyhow::Result<BTreeMap<String, u64>> {
            Ok(serde_json::from_value(v[k].clone())?)
        };
        Ok(Self {
            sockets: n("sockets"),
            tokens: n("tokens"),
            answers: n("answers"),
            errors: codes("errors")?,
            refused: codes("refused")?,
            reconnects: n("reconnects"),
            violations: n("violations"),
            dropped_sends: n("dropped_sends"),
            good_answers: n("good_answers"),
            connect_us: Latencies::from_json(&v["connect_us"])?,
            ack_us: Latencies::from_json(&v["ack_us"])?,
            ttft_us: Latencies::from_json(&v["ttft_us"])?,
            itl_us: Latencies::from_json(&v["itl_us"])?,
            e2e_us: Latencies::from_json(&v["e2e_us"])?,
            storm_us: Latencies::from_json(&v["storm_us"])?,
        })
    }

    /// The measured part of the summary (the caller adds what the run was).
    pub fn summary(&self, elapsed: Duration) -> Map<String, Value> {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        let mut out = Map::new();
        let mut put = |k: &str, v: Value| {
            out.insert(k.to_owned(), v);
        };
        put("sockets", json!(self.sockets));
        put("elapsed_s", json!(secs));
        put("answers", json!(self.answers));
        put("tokens_delivered", json!(self.tokens));
        put("tokens_per_second", json!(self.tokens as f64 / secs));
        put(
            "messages_per_second",
            json!(self.ack_us.len() as f64 / secs),
        );
        for (name, h) in [
            ("connect_ms", &self.connect_us),
            ("ack_ms", &self.ack_us),
            ("ttft_ms", &self.ttft_us),
            ("itl_ms", &self.itl_us),
            ("e2e_ms", &self.e2e_us),
            ("storm_reconnect_ms", &self.storm_us),
        ] {
            put(
                name,
                h.histogram().map_or(json!({"count": 0}), |h| latency(&h)),
            );
        }
        put("errors", json!(total(&self.errors)));
        put("errors_by_code", json!(self.errors));
        put("refused", json!(total(&self.refused)));
        put("refused_by_code", json!(self.refused));
        put("reconnects", json!(self.reconnects));
        // All of a storm's sockets close at once: how fast the gateway took them back.
        let storm = self.storm_us.histogram().ok().filter(|h| !h.is_empty());
        put("storm_reconnects", json!(self.storm_us.len()));
        put(
            "storm_reconnect_rate_per_s",
            json!(storm.map(|h| h.len() as f64 / (h.max() as f64 / 1e6).max(1e-6))),
        );
        put("protocol_violations", json!(self.violations));
        put("dropped_sends", json!(self.dropped_sends));
        // Of the answers a sender timed (the other sockets of a chat see them too).
        let timed = self.e2e_us.len();
        let goodput = if timed == 0 {
            0.0
        } else {
            self.good_answers as f64 / timed as f64
        };
        put("goodput", json!(goodput));
        out
    }
}

/// A histogram's k6-style statistics, in milliseconds.
pub fn latency(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "avg": h.mean() / 1000.0,
        "min": ms(h.min()),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`; none elsewhere.
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) closed by ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reports_add_counts_and_histograms() -> anyhow::Result<()> {
        let mut a = Report::new()?;
        let mut b = Report::new()?;
        a.tokens = 3;
        Report::count(&mut a.errors, "AI_ERROR");
        Report::count(&mut b.errors, "AI_ERROR");
        Report::count(&mut b.refused, "CONNECTION_LIMIT");
        a.ttft_us.record(Duration::from_millis(10));
        b.ttft_us.record(Duration::from_millis(30));
        a.merge(b);
        let s = a.summary(Duration::from_secs(1));
        assert_eq!(s["errors"], 2);
        assert_eq!(s["errors_by_code"]["AI_ERROR"], 2);
        assert_eq!(s["refused_by_code"]["CONNECTION_LIMIT"], 1);
        assert_eq!(s["ttft_ms"]["count"], 2);
        assert!((s["ttft_ms"]["max"].as_f64().unwrap_or(0.0) - 30.0).abs() < 0.1);
        assert!((s["ttft_ms"]["avg"].as_f64().unwrap_or(0.0) - 20.0).abs() < 0.1);
        assert_eq!(s["itl_ms"], json!({"count": 0}));
        Ok(())
    }

    #[test]
    fn percentiles_come_from_the_whole_histogram() -> anyhow::Result<()> {
        let mut h = histogram()?;
        for ms in 1..=1000 {
            h.record(ms * 1000)?;
        }
        let l = latency(&h);
        assert!((l["p50"].as_f64().unwrap_or(0.0) - 500.0).abs() < 1.0);
        assert!((l["p99"].as_f64().unwrap_or(0.0) - 990.0).abs() < 1.0);
        assert!((l["p99_9"].as_f64().unwrap_or(0.0) - 999.0).abs() < 1.0);
        assert_eq!(l["min"], 1.0);
        Ok(())
    }

    #[test]
    fn latencies_fold_into_a_histogram_and_merge() -> anyhow::Result<()> {
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        for ms in 1..=5000 {
            a.record(Duration::from_millis(ms));
        }
        b.record(Duration::from_millis(7000));
        assert!(a.hist.is_some() && b.hist.is_none());
        a.merge(b);
        assert_eq!(a.len(), 5001);
        let h = a.histogram()?;
        assert_eq!(h.len(), 5001);
        assert!((h.max() as f64 - 7_000_000.0).abs() < 7_000.0);
        assert!((h.value_at_quantile(0.5) as f64 - 2_500_000.0).abs() < 3_000.0);
        Ok(())
    }

    #[test]
    fn a_report_survives_its_json_form() -> anyhow::Result<()> {
        let mut a = Report::new()?;
        a.tokens = 7;
        a.violations = 2;
        Report::count(&mut a.refused, "CONNECTION_LIMIT");
        for ms in [3, 5, 900] {
            a.e2e_us.record(Duration::from_millis(ms));
        }
        let b = Report::from_json(&a.to_json()?)?;
        let (sa, sb) = (
            a.summary(Duration::from_secs(1)),
            b.summary(Duration::from_secs(1)),
        );
        assert_eq!(sa, sb);
        assert_eq!(sb["e2e_ms"]["count"], 3);
        Ok(())
    }

    #[test]
    fn own_cpu_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(own_cpu_seconds().is_some_and(|s| s >= 0.0));
        }
    }
}
