//! Workload models: parameterised populations of users that connect, chat, refresh and leave.
//!
//! A model generates a [`Trace`]: the same player replays generated workloads and recorded
//! traces, so every workload can be written out, inspected and replayed exactly.

use spawner_core::trace::{Trace, TraceEvent, TraceEventKind, TraceHeader};

use crate::rng::SimRng;

/// How users arrive and behave.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadParams {
    /// Number of users (sessions) in the run.
    pub users: usize,
    /// Mean time between user arrivals, in milliseconds (Poisson arrivals).
    pub mean_interarrival_ms: f64,
    /// Probability that an arrival brings a burst of users at once, and the burst's size.
    pub burst_probability: f64,
    pub burst_size: usize,
    /// Users join one of `rooms` rooms (backend keys); several users share a room.
    pub rooms: usize,
    /// Session length: Pareto with this minimum and tail index, capped.
    pub session_min_ms: f64,
    pub session_shape: f64,
    pub session_cap_ms: f64,
    /// Mean think time between messages, in milliseconds.
    pub mean_think_ms: f64,
    /// Probability that a user refreshes the tab (disconnect + reconnect within milliseconds) at
    /// each message.
    pub refresh_probability: f64,
    /// Probability that a user vanishes without closing (no close frame, no FIN).
    pub vanish_probability: f64,
}

impl Default for WorkloadParams {
    fn default() -> Self {
        Self {
            users: 200,
            mean_interarrival_ms: 200.0,
            burst_probability: 0.05,
            burst_size: 10,
            rooms: 40,
            session_min_ms: 2_000.0,
            session_shape: 1.5,
            session_cap_ms: 120_000.0,
            mean_think_ms: 1_500.0,
            refresh_probability: 0.02,
            vanish_probability: 0.05,
        }
    }
}

/// Generates the trace of `params` from `rng`.
pub fn generate(params: &WorkloadParams, rng: &mut SimRng) -> Trace {
    let mut events = Vec::new();
    let mut t = 0.0_f64;
    let mut user = 0;
    while user < params.users {
        t += rng.exponential(params.mean_interarrival_ms);
        let arrivals = if rng.chance(params.burst_probability) {
            params.burst_size.max(1)
        } else {
            1
        };
        for _ in 0..arrivals.min(params.users - user) {
            let mut user_rng = rng.fork(user as u64);
            session(params, &mut user_rng, user, t, &mut events);
            user += 1;
        }
    }
    // Stable sort: events of one user at the same millisecond keep their order.
    events.sort_by_key(|e| e.t_ms);
    Trace {
        header: TraceHeader::new("sim", "1970-01-01T00:00:00Z"),
        events,
    }
}

fn session(
    params: &WorkloadParams,
    rng: &mut SimRng,
    user: usize,
    start: f64,
    events: &mut Vec<TraceEvent>,
) {
    let session = format!("u{user}");
    let key = format!("room-{}", rng.below(params.rooms.max(1) as u64));
    let length = rng.pareto(
        params.session_min_ms,
        params.session_shape,
        params.session_cap_ms,
    );
    let end = start + length;
    let event = |t: f64, kind: TraceEventKind| TraceEvent {
        t_ms: t as u64,
        session: session.clone(),
        key: key.clone(),
        kind,
    };
    let mut generation = 0;
    let conn = |g: usize| format!("u{user}-c{g}");
    events.push(event(start, TraceEventKind::Spawn));
    let mut t = start + 1.0;
    events.push(event(t, TraceEventKind::Connect { conn: conn(0) }));
    // Time of this user's latest event: the final disconnect may not come before it.
    let mut last = t;
    loop {
        t += rng.exponential(params.mean_think_ms).max(1.0);
        if t >= end {
            break;
        }
        if rng.chance(params.refresh_probability) {
            // A refresh: the old socket closes and a new one opens a few milliseconds later.
            events.push(event(
                t,
                TraceEventKind::Disconnect {
                    conn: conn(generation),
                    clean: true,
                },
            ));
            generation += 1;
            t += 1.0 + rng.below(20) as f64;
            events.push(event(
                t,
                TraceEventKind::Connect {
                    conn: conn(generation),
                },
            ));
            last = t;
            continue;
        }
        events.push(event(
            t,
            TraceEventKind::Message {
                conn: conn(generation),
                bytes: 16 + rng.below(240),
            },
        ));
        last = t;
    }
    let clean = !rng.chance(params.vanish_probability);
    events.push(event(
        end.max(last + 1.0),
        TraceEventKind::Disconnect {
            conn: conn(generation),
            clean,
        },
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload_and_it_is_a_valid_trace() {
        let params = WorkloadParams::default();
        let a = generate(&params, &mut SimRng::new(3));
        let b = generate(&params, &mut SimRng::new(3));
        assert_eq!(a, b);
        let c = generate(&params, &mut SimRng::new(4));
        assert_ne!(a, c);
        // Writing and re-reading runs the trace checks: ordering, connections opened before use.
        let mut out = Vec::new();
        a.write(&mut out).expect("write");
        let back = Trace::read(&out[..]).expect("generated trace is valid");
        assert_eq!(back, a);
    }

    #[test]
    fn every_user_spawns_connects_and_leaves() {
        let params = WorkloadParams {
            users: 500,
            ..WorkloadParams::default()
        };
        let trace = generate(&params, &mut SimRng::new(9));
        let count =
            |f: fn(&TraceEventKind) -> bool| trace.events.iter().filter(|e| f(&e.kind)).count();
        assert_eq!(count(|k| matches!(k, TraceEventKind::Spawn)), 500);
        let connects = count(|k| matches!(k, TraceEventKind::Connect { .. }));
        let disconnects = count(|k| matches!(k, TraceEventKind::Disconnect { .. }));
        assert_eq!(connects, disconnects);
        assert!(connects >= 500);
        let vanished = count(|k| matches!(k, TraceEventKind::Disconnect { clean: false, .. }));
        assert!(vanished > 0 && vanished < 100, "{vanished}");
        assert!(trace.keys().len() <= params.rooms);
    }
}
