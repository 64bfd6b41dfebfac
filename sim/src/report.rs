//! The replay report of a world (`spawner-sim --trace`): what users saw, plus what the
//! observable event log (`Summary::events`: creations, phases, live connection counts and
//! deletions, each stamped with simulated time) says about backends over time.

use std::collections::BTreeMap;

use spawner_core::Phase;
use spawner_core::trace::ReplayReport;

use crate::world::Summary;

/// One backend's history, in simulated milliseconds.
#[derive(Default)]
struct History {
    created: Option<u64>,
    ready: Option<u64>,
    ended: Option<u64>,
    live: u64,
    /// Since when it has been Ready with no connection.
    idle_since: Option<u64>,
    idle_ms: u64,
}

impl History {
    fn stop_idle(&mut self, t: u64) {
        if let Some(since) = self.idle_since.take() {
            self.idle_ms += t.saturating_sub(since);
        }
    }

    fn resume_idle(&mut self, t: u64) {
        if self.ready.is_some() && self.ended.is_none() && self.live == 0 {
            self.idle_since.get_or_insert(t);
        }
    }
}

/// Parses `   12.345 name rest…` into (ms, name, rest).
fn parse_line(line: &str) -> Option<(u64, &str, &str)> {
    let line = line.trim_start();
    let (time, rest) = line.split_once(' ')?;
    let seconds: f64 = time.parse().ok()?;
    let (name, what) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(((seconds * 1000.0).round() as u64, name, what.trim()))
}

fn phase_of(word: &str) -> Option<Phase> {
    serde_json::from_value(serde_json::Value::String(word.to_string())).ok()
}

/// The report of a finished world.
pub fn report(summary: &Summary) -> ReplayReport {
    // A key's backend name comes back once the old one is deleted (its generation restarts):
    // every creation starts a new history.
    let mut histories: Vec<History> = Vec::new();
    let mut current: BTreeMap<String, usize> = BTreeMap::new();
    let mut alive = 0u64;
    let mut peak = 0u64;
    for line in &summary.events {
        let Some((t, name, what)) = parse_line(line) else {
            continue;
        };
        let reborn = what.starts_with("created")
            && current
                .get(name)
                .is_some_and(|i| histories[*i].created.is_some());
        let index = match current.get(name) {
            Some(i) if !reborn => *i,
            _ => {
                histories.push(History::default());
                current.insert(name.to_string(), histories.len() - 1);
                histories.len() - 1
            }
        };
        let history = &mut histories[index];
        let was_alive = history.created.is_some() && history.ended.is_none();
        if what.starts_with("created") {
            history.created.get_or_insert(t);
        } else if let Some(live) = what.strip_prefix("live=") {
            history.live = live.parse().unwrap_or(0);
            if history.live > 0 {
                history.stop_idle(t);
            } else {
                history.resume_idle(t);
            }
        } else if what == "deleted" {
            history.ended.get_or_insert(t);
            history.stop_idle(t);
        } else if let Some(phase) = what.split_whitespace().next().and_then(phase_of) {
            if phase == Phase::Ready && history.ready.is_none() {
                history.ready = Some(t);
                history.resume_idle(t);
            }
            if phase.is_terminal() {
                history.ended.get_or_insert(t);
                history.stop_idle(t);
            }
        }
        let is_alive = history.created.is_some() && history.ended.is_none();
        match (was_alive, is_alive) {
            (false, true) => alive += 1,
            (true, false) => alive = alive.saturating_sub(1),
            _ => {}
        }
        peak = peak.max(alive);
    }
    let end = summary.sim_time.as_millis() as u64;
    let mut idle_ms = 0;
    let mut spawn_to_ready_ms = Vec::new();
    for history in &mut histories {
        history.stop_idle(end);
        idle_ms += history.idle_ms;
        if let (Some(created), Some(ready)) = (history.created, history.ready) {
            spawn_to_ready_ms.push(ready.saturating_sub(created));
        }
    }
    ReplayReport {
        clock: "simulated time".into(),
        sessions: summary.users.sessions,
        backends_created: summary.backends as u64,
        backends_swept: summary.swept as u64,
        connect_failures: summary.users.connect_failures,
        spawn_to_ready_ms,
        peak_live_backends: peak,
        backend_idle_seconds: idle_ms as f64 / 1000.0,
        sessions_found_backend_gone: summary.users.sessions_found_backend_gone,
    }
}

/// The what-if table: the same trace under two grace periods.
pub fn what_if(
    base_grace: u32,
    base: &ReplayReport,
    other_grace: u32,
    other: &ReplayReport,
) -> String {
    let head_a = format!("grace {base_grace} s");
    let head_b = format!("grace {other_grace} s");
    let rows = [
        (
            "backends created",
            base.backends_created.to_string(),
            other.backends_created.to_string(),
        ),
        (
            "backend-seconds idle",
            format!("{:.1}", base.backend_idle_seconds),
            format!("{:.1}", other.backend_idle_seconds),
        ),
        (
            "sessions found backend gone",
            base.sessions_found_backend_gone.to_string(),
            other.sessions_found_backend_gone.to_string(),
        ),
    ];
    let mut out = format!("what-if ({})\n", base.clock);
    out += &format!("  {:<30}{head_a:>14}{head_b:>14}\n", "");
    for (label, a, b) in rows {
        out += &format!("  {label:<30}{a:>14}{b:>14}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::UsersReport;

    #[test]
    fn reads_backends_over_time_from_the_event_log() {
        let events = [
            "    1.000 a created key=Some(\"k1\")",
            "    1.300 a Scheduled ",
            "    1.500 a Ready ",
            "    2.000 b created key=None",
            "    2.000 a live=1",
            "    2.400 b Ready ",
            "    4.000 a live=0",
            "    9.000 a Swept IdlePastGracePeriod",
            "   12.400 b Swept IdlePastGracePeriod",
            "   15.000 a deleted",
            "   16.000 a created key=Some(\"k1\")",
            "   16.300 a Ready ",
            "   18.300 a Swept IdlePastGracePeriod",
        ];
        let summary = Summary {
            seed: 1,
            users: UsersReport {
                sessions: 3,
                connect_failures: 1,
                sessions_found_backend_gone: 1,
                ..UsersReport::default()
            },
            backends: 3,
            ready: 3,
            swept: 3,
            failed: 0,
            terminated: 0,
            retained: 0,
            throttled: 0,
            throttled_peak: 0,
            sim_time: std::time::Duration::from_secs(20),
            wall_time: std::time::Duration::ZERO,
            trace_hash: 0,
            events: events.iter().map(|e| e.to_string()).collect(),
        };
        let report = report(&summary);
        // The name `a` again after its deletion is a third backend.
        assert_eq!(report.spawn_to_ready_ms, [500, 400, 300]);
        assert_eq!(report.peak_live_backends, 2);
        // a: Ready 1.5-2.0 and 4.0-9.0 idle (5.5 s); b: 2.4-12.4 (10 s); a again 16.3-18.3.
        assert!(
            (report.backend_idle_seconds - 17.5).abs() < 1e-9,
            "{report}"
        );
        let counts = (
            report.sessions,
            report.backends_created,
            report.backends_swept,
        );
        assert_eq!(counts, (3, 3, 3));
        assert_eq!(report.connect_failures, 1);
        let table = what_if(5, &report, 30, &report);
        assert!(table.contains("grace 30 s"), "{table}");
        assert!(table.contains("17.5"), "{table}");
    }
}
