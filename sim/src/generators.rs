//! Seeded generators of the application traces in `fixtures/traces/` (docs/traces.md states
//! their distributions; `cargo run -p spawner-sim --example generate_traces` rewrites the files,
//! and `sim/tests/replay.rs` checks the committed files are exactly these generators' output).

use spawner_core::trace::{Trace, TraceEvent, TraceEventKind, TraceHeader};

use crate::rng::SimRng;

/// The seeds of the committed fixtures.
pub const EDITOR_SEED: u64 = 11;
pub const GAME_SEED: u64 = 12;
pub const NOTEBOOK_SEED: u64 = 13;

fn uniform(rng: &mut SimRng, low: f64, high: f64) -> f64 {
    low + rng.unit() * (high - low)
}

struct Builder {
    events: Vec<TraceEvent>,
}

impl Builder {
    fn push(&mut self, t: f64, session: &str, key: &str, kind: TraceEventKind) {
        self.events.push(TraceEvent {
            t_ms: t as u64,
            session: session.to_string(),
            key: key.to_string(),
            kind,
        });
    }

    fn finish(mut self, source: &str) -> Trace {
        // Stable: one session's events at the same millisecond keep their order.
        self.events.sort_by_key(|e| e.t_ms);
        Trace {
            header: TraceHeader::new(source, "2026-12-05T00:00:00Z"),
            events: self.events,
        }
    }
}

/// A collaborative editor: 10 users arrive (Poisson, mean 2 s apart) on one of 4 documents
/// (uniform); each stays 40-90 s (uniform), typing a change every 3 s on average (exponential)
/// of 20 bytes plus an exponential 200 (capped at 4 KiB); at each change, with probability
/// 0.15, the connection drops and the editor reconnects 50-2000 ms later (uniform); 5 % leave
/// without closing.
pub fn editor(seed: u64) -> Trace {
    let mut rng = SimRng::new(seed);
    let mut out = Builder { events: Vec::new() };
    let mut t = 0.0;
    for user in 0..10 {
        t += rng.exponential(2_000.0);
        let mut rng = rng.fork(user);
        let session = format!("editor-{user}");
        let key = format!("doc-{}", rng.below(4));
        let end = t + uniform(&mut rng, 40_000.0, 90_000.0);
        let mut generation = 0;
        let conn = |g: u32| format!("{session}-c{g}");
        out.push(t, &session, &key, TraceEventKind::Spawn);
        let mut now = t + 1.0;
        out.push(
            now,
            &session,
            &key,
            TraceEventKind::Connect { conn: conn(0) },
        );
        loop {
            now += rng.exponential(3_000.0).max(1.0);
            if now >= end {
                break;
            }
            if rng.chance(0.15) {
                let old = conn(generation);
                out.push(
                    now,
                    &session,
                    &key,
                    TraceEventKind::Disconnect {
                        conn: old,
                        clean: false,
                    },
                );
                generation += 1;
                now += uniform(&mut rng, 50.0, 2_000.0);
                out.push(
                    now,
                    &session,
                    &key,
                    TraceEventKind::Connect {
                        conn: conn(generation),
                    },
                );
                continue;
            }
            let bytes = 20 + (rng.exponential(200.0) as u64).min(4096);
            out.push(
                now,
                &session,
                &key,
                TraceEventKind::Message {
                    conn: conn(generation),
                    bytes,
                },
            );
        }
        let clean = !rng.chance(0.05);
        out.push(
            now.max(end),
            &session,
            &key,
            TraceEventKind::Disconnect {
                conn: conn(generation),
                clean,
            },
        );
    }
    out.finish("synthetic-editor")
}

/// A game: 18 players arrive (Poisson, mean 1 s apart) and are matched in arrival order into
/// rooms of 2-8 players (uniform); a match starts when its room is full (every player asks for
/// the room's backend and connects within 0-300 ms, uniform), lasts 20-40 s (uniform), with a
/// move of 16-64 bytes (uniform) every 500 ms on average (exponential) per player; at the end
/// 90 % of the players close cleanly.
pub fn game(seed: u64) -> Trace {
    let mut rng = SimRng::new(seed);
    let mut out = Builder { events: Vec::new() };
    let mut t = 0.0;
    let mut player = 0u64;
    let mut room = 0;
    while player < 18 {
        let size = (2 + rng.below(7)).min(18 - player);
        let mut arrivals = Vec::new();
        for _ in 0..size {
            t += rng.exponential(1_000.0);
            arrivals.push(player);
            player += 1;
        }
        let start = t;
        let end = start + uniform(&mut rng, 20_000.0, 40_000.0);
        let key = format!("match-{room}");
        room += 1;
        for p in arrivals {
            let mut rng = rng.fork(p);
            let session = format!("player-{p}");
            let conn = format!("{session}-c0");
            let joined = start + uniform(&mut rng, 0.0, 300.0);
            out.push(joined, &session, &key, TraceEventKind::Spawn);
            let mut now = joined + 1.0;
            out.push(
                now,
                &session,
                &key,
                TraceEventKind::Connect { conn: conn.clone() },
            );
            loop {
                now += rng.exponential(500.0).max(1.0);
                if now >= end {
                    break;
                }
                let bytes = 16 + rng.below(49);
                out.push(
                    now,
                    &session,
                    &key,
                    TraceEventKind::Message {
                        conn: conn.clone(),
                        bytes,
                    },
                );
            }
            let clean = rng.chance(0.9);
            out.push(
                now.max(end),
                &session,
                &key,
                TraceEventKind::Disconnect { conn, clean },
            );
        }
    }
    out.finish("synthetic-game")
}

/// A notebook service: 4 users, each on their own notebook, arriving 0-10 s apart (uniform),
/// stay 90-150 s (uniform). They work in bursts of 5-15 s (uniform) with a cell run every 2 s
/// on average (exponential; 100 bytes plus an exponential 1000, capped at 16 KiB), then stay
/// idle for an exponential 20 s (capped at 60 s). During an idle gap the user closes the laptop
/// with probability 0.3 (disconnects, and reconnects when the gap ends: after a gap longer
/// than the grace period the notebook's backend is gone).
pub fn notebook(seed: u64) -> Trace {
    let mut rng = SimRng::new(seed);
    let mut out = Builder { events: Vec::new() };
    for user in 0..4u64 {
        let mut rng = rng.fork(user);
        let session = format!("analyst-{user}");
        let key = format!("notebook-{user}");
        let start = uniform(&mut rng, 0.0, 10_000.0);
        let end = start + uniform(&mut rng, 90_000.0, 150_000.0);
        let mut generation = 0;
        let conn = |g: u32| format!("{session}-c{g}");
        out.push(start, &session, &key, TraceEventKind::Spawn);
        let mut now = start + 1.0;
        out.push(
            now,
            &session,
            &key,
            TraceEventKind::Connect { conn: conn(0) },
        );
        'session: loop {
            let burst_end = now + uniform(&mut rng, 5_000.0, 15_000.0);
            loop {
                now += rng.exponential(2_000.0).max(1.0);
                if now >= end {
                    break 'session;
                }
                if now >= burst_end {
                    break;
                }
                let bytes = 100 + (rng.exponential(1_000.0) as u64).min(16 * 1024);
                out.push(
                    now,
                    &session,
                    &key,
                    TraceEventKind::Message {
                        conn: conn(generation),
                        bytes,
                    },
                );
            }
            let gap = rng.exponential(20_000.0).min(60_000.0);
            if now + gap >= end {
                now = end;
                break;
            }
            if rng.chance(0.3) {
                out.push(
                    now,
                    &session,
                    &key,
                    TraceEventKind::Disconnect {
                        conn: conn(generation),
                        clean: true,
                    },
                );
                generation += 1;
                out.push(
                    now + gap,
                    &session,
                    &key,
                    TraceEventKind::Connect {
                        conn: conn(generation),
                    },
                );
            }
            now += gap;
        }
        out.push(
            now.max(end),
            &session,
            &key,
            TraceEventKind::Disconnect {
                conn: conn(generation),
                clean: true,
            },
        );
    }
    out.finish("synthetic-notebook")
}

/// Every generated fixture: file name and trace.
pub fn fixtures() -> Vec<(&'static str, Trace)> {
    vec![
        ("editor.jsonl", editor(EDITOR_SEED)),
        ("game.jsonl", game(GAME_SEED)),
        ("notebook.jsonl", notebook(NOTEBOOK_SEED)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_traces_are_valid_and_deterministic() {
        for (name, trace) in fixtures() {
            let mut out = Vec::new();
            trace.write(&mut out).expect("write");
            let back = Trace::read(&out[..]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back, trace, "{name}");
        }
        assert_eq!(editor(1), editor(1));
        assert_ne!(game(1), game(2));
        // Rooms of 2 to 8 players.
        let trace = game(GAME_SEED);
        let mut rooms = std::collections::BTreeMap::<&str, std::collections::BTreeSet<&str>>::new();
        for e in &trace.events {
            rooms.entry(&e.key).or_default().insert(&e.session);
        }
        assert!(
            rooms.values().all(|p| (1..=8).contains(&p.len())),
            "{rooms:?}"
        );
    }
}
