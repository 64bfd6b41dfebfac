//! Where the time of a spawn goes, as a client sees it: from just before its request to the
//! Ready event on its status stream, split by the phase conditions' times into [`STEPS`]; and
//! the statistics the spawn benchmarks report (`just bench-spawn`: benches/spawn.rs against
//! `spawner dev`; `just bench-kind`: e2e/examples/kind_spawn_bench.rs against kind).

use std::time::{Duration, SystemTime};

use serde_json::Value;

/// The steps of a spawn, from the client's request to the client seeing Ready; the last is
/// the whole.
pub const STEPS: [&str; 6] = [
    "request→Constructed",
    "Constructed→Scheduled",
    "Scheduled→Running",
    "Running→Ready",
    "Ready→client sees it",
    "total",
];

/// The milliseconds of each of [`STEPS`] for one spawn: requested at `requested_at`, seen Ready
/// `total` later, with `status` its status as the api answers it (the conditions' times). A
/// condition missing from `status` counts as reached at the request.
pub fn step_millis(status: &Value, requested_at: SystemTime, total: Duration) -> Vec<f64> {
    let seen_at = requested_at + total;
    let times: Vec<SystemTime> = ["Constructed", "Scheduled", "Running", "Ready"]
        .iter()
        .map(|p| condition_time(status, p).unwrap_or(requested_at))
        .collect();
    let mut steps = vec![ms_between(requested_at, times[0])];
    steps.extend(times.windows(2).map(|w| ms_between(w[0], w[1])));
    steps.push(ms_between(times[3], seen_at));
    steps.push(total.as_secs_f64() * 1e3);
    steps
}

fn condition_time(status: &Value, phase: &str) -> Option<SystemTime> {
    let time = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == phase)?["lastTransitionTime"]
        .as_str()?;
    let parsed = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    let nanos = u64::try_from(parsed.timestamp_nanos_opt()?).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// `to - from` in milliseconds, negative when `to` is earlier (two clocks).
fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -(e.duration().as_secs_f64() * 1e3),
    }
}

/// The `p`-th percentile (0..=100) of `sorted` by the nearest-rank method; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One step over many spawns, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

/// The statistics of each of [`STEPS`] over `samples` (each as [`step_millis`] gives it).
pub fn step_stats(samples: &[Vec<f64>]) -> Vec<StepStats> {
    (0..STEPS.len())
        .map(|i| {
            let mut values: Vec<f64> = samples.iter().map(|s| s[i]).collect();
            values.sort_by(f64::total_cmp);
            StepStats {
                p50: percentile(&values, 50.0),
                p99: percentile(&values, 99.0),
                mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
            }
        })
        .collect()
}

/// A Markdown table of where the time goes: a row per step, a column per run (its name and
/// its [`step_stats`]), each cell `p50 / p99 / mean` in milliseconds.
pub fn steps_table(runs: &[(&str, &[StepStats])]) -> String {
    let mut out = String::from("| step |");
    for (name, _) in runs {
        out.push_str(&format!(" {name} |"));
    }
    out.push_str("\n|---|");
    for _ in runs {
        out.push_str("---:|");
    }
    out.push('\n');
    for (i, step) in STEPS.iter().enumerate() {
        out.push_str(&format!("| {step} |"));
        for (_, stats) in runs {
            let StepStats { p50, p99, mean } = stats[i];
            out.push_str(&format!(" {p50:.1} / {p99:.1} / {mean:.1} |"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn steps_follow_the_conditions_times() {
        let requested_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let status = json!({"conditions": [
            {"type": "Constructed", "lastTransitionTime": "2023-11-14T22:13:20.010Z"},
            {"type": "Scheduled", "lastTransitionTime": "2023-11-14T22:13:20.030Z"},
            {"type": "Running", "lastTransitionTime": "2023-11-14T22:13:20.060Z"},
            {"type": "Ready", "lastTransitionTime": "2023-11-14T22:13:20.100Z"},
        ]});
        let steps = step_millis(&status, requested_at, Duration::from_millis(105));
        let rounded: Vec<i64> = steps.iter().map(|s| s.round() as i64).collect();
        assert_eq!(rounded, [10, 20, 30, 40, 5, 105]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        let stats = step_stats(&[vec![1.0; 6], vec![3.0; 6]]);
        assert_eq!(
            stats[5],
            StepStats {
                p50: 1.0,
                p99: 3.0,
                mean: 2.0
            }
        );
        let table = steps_table(&[("one", &stats)]);
        assert!(table.contains("| total | 1.0 / 3.0 / 2.0 |"), "{table}");
    }
}
