//! Shapes of load: the open-loop schedule (a steady `--rate`, or `--stage` ramps and spikes as
//! k6 writes them), runs bounded by `--duration` (soak), and scenario files.
//!
//! A stage is `DURATION:RATE` (`30s:200`, `2m:0`, `500ms:1000`): over its duration the total
//! message rate moves linearly from the previous stage's rate (the first starts from 0) to
//! `RATE`; a spike is a short stage up and one down. A scenario file (`--scenario FILE`, TOML)
//! holds the same settings as the flags, by their names (`sockets = 2000`, `rate = 50`,
//! `stage = ["30s:100", "5s:1000", "30s:100"]`, `threshold = ["ttft_p99<50ms"]`); flags given on
//! the command line win over the file, and list flags add to it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

/// One stage of the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// How long it lasts.
    pub duration: Duration,
    /// The total message rate (per second) it ends at.
    pub target: f64,
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (d, r) = s
            .split_once(':')
            .ok_or_else(|| format!("stage '{s}': write DURATION:RATE, e.g. 30s:200"))?;
        let target: f64 = r
            .trim()
            .parse()
            .map_err(|_| format!("stage '{s}': '{r}' is not a rate"))?;
        if target < 0.0 || !target.is_finite() {
            return Err(format!("stage '{s}': the rate must be 0 or more"));
        }
        Ok(Self {
            duration: parse_duration(d.trim()).map_err(|e| format!("stage '{s}': {e}"))?,
            target,
        })
    }
}

/// `500ms`, `30s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| format!("'{s}' is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit '{other}' in '{s}' (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The rate `at` into a schedule of `stages` (the last stage's target after its end).
pub fn rate_at(stages: &[Stage], at: Duration) -> f64 {
    let (mut start, mut from) = (Duration::ZERO, 0.0);
    for stage in stages {
        let end = start + stage.duration;
        if at < end {
            let share = (at - start).as_secs_f64() / stage.duration.as_secs_f64().max(1e-9);
            return from + (stage.target - from) * share;
        }
        (start, from) = (end, stage.target);
    }
    from
}

/// How long a schedule of `stages` lasts.
pub fn total(stages: &[Stage]) -> Duration {
    stages.iter().map(|s| s.duration).sum()
}

/// Sends ticks to the chats in turn, at `rate` per second or as `stages` say, until each chat
/// had `messages` ticks (or until aborted, for runs bounded by a duration). Open loop: the
/// schedule never waits for answers; a tick its chat cannot take (it is still busy with the
/// earlier ones) is dropped and counted in `dropped`.
pub async fn pace(
    senders: Vec<mpsc::Sender<()>>,
    rate: f64,
    stages: Vec<Stage>,
    messages: usize,
    dropped: Arc<AtomicU64>,
) {
    let started = tokio::time::Instant::now();
    let mut next = started;
    let schedule = |at: Duration| {
        if stages.is_empty() {
            rate
        } else {
            rate_at(&stages, at)
        }
    };
    for _ in 0..messages {
        for tx in &senders {
            let mut current = schedule(next - started);
            while current <= 0.0 {
                // Nothing to send now: look again shortly (a ramp from 0, a pause).
                tokio::time::sleep(Duration::from_millis(10)).await;
                next = tokio::time::Instant::now();
                current = schedule(next - started);
                if !stages.is_empty() && next - started >= total(&stages) {
                    return;
                }
            }
            tokio::time::sleep_until(next).await;
            if tx.try_send(()).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            next += Duration::from_secs_f64(1.0 / current);
        }
    }
}

/// Sets off a storm at each of `at` (after the start): every socket in storms sees the
/// generation change at once.
pub async fn storms(mut at: Vec<Duration>, storm: tokio::sync::watch::Sender<u64>) {
    at.sort();
    let started = tokio::time::Instant::now();
    for (n, t) in at.into_iter().enumerate() {
        tokio::time::sleep_until(started + t).await;
        eprintln!("reconnect storm {}", n + 1);
        storm.send_replace(n as u64 + 1);
    }
    // Held until aborted: a dropped sender would wake every socket's storm branch.
    std::future::pending::<()>().await;
}

/// Whether socket `i` takes part in storms of this share (0 to 1), spread evenly over the
/// socket indices (and so over the chats) by a multiplicative hash.
pub fn in_storm(i: usize, share: f64) -> bool {
    let spread = (i as u64).wrapping_mul(2_654_435_761) % 10_000;
    (spread as f64) < share.clamp(0.0, 1.0) * 10_000.0
}

/// The arguments a scenario file stands for, ahead of the command line's (so that the command
/// line wins): every key becomes `--key value` (`_` as `-`), a list one flag per item, `true`
/// a bare flag.
pub fn file_args(path: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the scenario {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("the scenario {path} is not valid TOML: {e}"))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(anyhow::anyhow!(
                "{path}: {key} = {other} is not a flag's value"
            )),
        };
        match &value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?);
                }
            }
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn stage(s: &str) -> Stage {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn stages_ramp_linearly_from_the_previous_target() {
        let stages = [
            stage("10s:100"),
            stage("10s:100"),
            stage("2s:1000"),
            stage("10s:0"),
        ];
        let at = |s: f64| rate_at(&stages, Duration::from_secs_f64(s));
        assert_eq!(at(0.0), 0.0);
        assert!((at(5.0) - 50.0).abs() < 1e-9);
        assert!((at(15.0) - 100.0).abs() < 1e-9);
        assert!((at(21.0) - 550.0).abs() < 1e-9, "half way up the spike");
        assert!((at(27.0) - 500.0).abs() < 1e-9);
        assert_eq!(at(100.0), 0.0);
        assert_eq!(total(&stages), Duration::from_secs(32));
    }

    #[test]
    fn stages_and_durations_parse_or_say_why_not() {
        assert_eq!(stage("500ms:3").duration, Duration::from_millis(500));
        assert_eq!(stage("2m:0").duration, Duration::from_secs(120));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        for bad in ["30s", "x:1", "30s:-1", "30y:5", "30s:fast"] {
            assert!(bad.parse::<Stage>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_storm_takes_its_share_of_the_sockets() {
        let count = |share| (0..10_000).filter(|&i| in_storm(i, share)).count();
        assert_eq!(count(1.0), 10_000);
        assert_eq!(count(0.0), 0);
        let half = count(0.5);
        assert!((4_500..=5_500).contains(&half), "{half}");
    }

    #[test]
    fn a_scenario_file_becomes_flags() {
        let dir = std::env::temp_dir().join(format!("scenario-{}.toml", std::process::id()));
        std::fs::write(
            &dir,
            "sockets = 20\nrate = 2.5\nstage = [\"1s:5\", \"1s:0\"]\nkeep_tenant = true\nthreshold = [\"errors==0\"]\n",
        )
        .unwrap();
        let args = file_args(dir.to_str().unwrap()).unwrap();
        let _ = std::fs::remove_file(&dir);
        let joined = args.join(" ");
        for part in [
            "--sockets 20",
            "--rate 2.5",
            "--stage 1s:5 --stage 1s:0",
            "--keep-tenant",
            "--threshold errors==0",
        ] {
            assert!(joined.contains(part), "{joined}");
        }
    }
}
