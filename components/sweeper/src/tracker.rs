//! The sweeper's decisions for one backend, as a pure state machine over the sidecar's reports
//! and the sweeper's monotonic clock (instants are parameters, never read here).
//!
//! Safety rules it encodes (DESIGN.md rule 6):
//! - a live connection is never swept ([`spawner_core::idle::idle_verdict`] says `Active`);
//! - only a report from a healthy stream counts: after a disconnect nothing is swept until the
//!   sidecar reports again, and between messages the countdown is only trusted while the last
//!   message is fresher than the heartbeat allows;
//! - the countdown is the sidecar's own `seconds_since_active` plus the time since that report,
//!   so a restarted sweeper resumes it instead of restarting it;
//! - a backend is never swept before it is Ready, and one this sweeper marks Ready never sooner
//!   than a full grace period after that write: before it, no user knew the backend was there
//!   to connect to. The sidecar's idle time also counts the app's start and the time the
//!   sweeper took to reach the sidecar (on a real cluster, seconds), which would otherwise
//!   sweep a slow starter while it starts, or a backend the moment it is Ready. (An app that
//!   never accepts connections stays Running until it is terminated or its
//!   `maxLifetimeSeconds` ends it.)

use std::time::Duration;

use spawner_core::idle::{IdleVerdict, idle_verdict};
use spawner_core::state_stream::SidecarState;
use tokio::time::Instant;

/// What to do after an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Write `Ready` (the sidecar says the app accepts connections, and we have not yet).
    pub mark_ready: bool,
    /// Write `Swept`: idle for this long, past the grace period.
    pub sweep: Option<Duration>,
    /// Look again at this instant if nothing arrives before.
    pub wake_at: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    grace: Duration,
    /// How old the last message may be for the countdown between messages to be trusted.
    freshness: Duration,
    last: Option<(SidecarState, Instant)>,
    ready_marked: bool,
    /// When this sweeper's Ready write succeeded: no sweep before a grace period from it.
    ready_at: Option<Instant>,
}

impl Tracker {
    pub fn new(grace: Duration, freshness: Duration, ready_marked: bool) -> Self {
        Self {
            grace,
            freshness,
            last: None,
            ready_marked,
            ready_at: None,
        }
    }

    /// The last report and when it arrived.
    pub fn last(&self) -> Option<&(SidecarState, Instant)> {
        self.last.as_ref()
    }

    /// The Ready write succeeded at `at` (`None`: the backend was already past Running, so
    /// this sweeper did not make it Ready).
    pub fn ready_written(&mut self, at: Option<Instant>) {
        self.ready_marked = true;
        if let Some(at) = at {
            self.ready_at.get_or_insert(at);
        }
    }

    fn verdict_step(&self, state: &SidecarState, elapsed: Duration, now: Instant) -> Step {
        if !self.ready_marked {
            // A backend still starting is not idle: users wait for Ready before they connect
            // (a spawn ends Ready or Failed, never swept while it starts). Ready first; the
            // countdown starts once it is written.
            return Step::default();
        }
        // Wake just after a deadline: exactly at it is not yet past the grace period.
        let tick = Duration::from_millis(1);
        let floor = self.ready_at.map(|at| at + self.grace + tick);
        match idle_verdict(state, elapsed, self.grace) {
            IdleVerdict::Active => Step::default(),
            IdleVerdict::PastGrace { .. } if floor.is_some_and(|f| now < f) => Step {
                wake_at: floor,
                ..Step::default()
            },
            IdleVerdict::PastGrace { idle } => Step {
                sweep: Some(idle),
                ..Step::default()
            },
            IdleVerdict::Idle { remaining } => Step {
                wake_at: Some((now + remaining + tick).max(floor.unwrap_or(now))),
                ..Step::default()
            },
        }
    }

    /// A report arrived from the stream at `now`.
    pub fn on_report(&mut self, state: SidecarState, now: Instant) -> Step {
        self.last = Some((state, now));
        let mut step = self.verdict_step(&state, Duration::ZERO, now);
        step.mark_ready = state.ready && !self.ready_marked;
        step
    }

    /// A deadline returned earlier passed, with the stream still connected.
    pub fn on_wake(&self, now: Instant) -> Step {
        let Some((state, at)) = self.last else {
            return Step::default();
        };
        let elapsed = now.saturating_duration_since(at);
        if elapsed > self.freshness {
            // The stream went quiet: wait for the next message or the read timeout.
            return Step::default();
        }
        let mut step = self.verdict_step(&state, elapsed, now);
        // A Ready write that failed is tried again here too, not only on the next report: with a
        // grace period shorter than the heartbeat, the sweep would otherwise come first.
        step.mark_ready = state.ready && !self.ready_marked;
        step
    }

    /// The stream ended or failed: nothing it said counts any more.
    pub fn on_disconnect(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spawner_core::state_stream::PROTOCOL_VERSION;

    fn state(ready: bool, live: u64, idle: u64) -> SidecarState {
        SidecarState {
            v: PROTOCOL_VERSION,
            ready,
            live_connections: live,
            seconds_since_active: idle,
            millis_since_active: None,
        }
    }

    const GRACE: Duration = Duration::from_secs(30);
    const FRESH: Duration = Duration::from_secs(3);

    #[test]
    fn first_ready_report_marks_ready_once() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, false);
        assert!(!tracker.on_report(state(false, 0, 0), t0).mark_ready);
        assert!(tracker.on_report(state(true, 0, 0), t0).mark_ready);
        tracker.ready_written(Some(t0));
        assert!(!tracker.on_report(state(true, 0, 0), t0).mark_ready);
        let already = Tracker::new(GRACE, FRESH, true).on_report(state(true, 0, 0), t0);
        assert!(!already.mark_ready);
    }

    #[test]
    fn live_connection_is_never_swept_whatever_the_idle_time() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        let step = tracker.on_report(state(true, 1, 10_000), t0);
        assert_eq!(step, Step::default());
        assert_eq!(
            tracker.on_wake(t0 + Duration::from_secs(2)),
            Step::default()
        );
    }

    #[test]
    fn countdown_resumes_from_the_sidecars_idle_time() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        // A restarted sweeper connects to a sidecar idle for 28 s: 2 s are left, not 30.
        let step = tracker.on_report(state(true, 0, 28), t0);
        let wake = step.wake_at.expect("countdown");
        assert_eq!(wake, t0 + Duration::from_secs(2) + Duration::from_millis(1));
        assert_eq!(step.sweep, None);
        assert_eq!(
            tracker.on_wake(wake).sweep,
            Some(Duration::from_secs(30) + Duration::from_millis(1))
        );
    }

    #[test]
    fn a_report_past_grace_sweeps_at_once() {
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        let step = tracker.on_report(state(true, 0, 31), Instant::now());
        assert_eq!(step.sweep, Some(Duration::from_secs(31)));
    }

    #[test]
    fn a_quiet_stream_is_not_trusted_between_messages() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        tracker.on_report(state(true, 0, 29), t0);
        // The deadline passes, but nothing arrived for longer than the freshness window.
        assert_eq!(
            tracker.on_wake(t0 + Duration::from_secs(4)),
            Step::default()
        );
        // A heartbeat arrives: it says idle 33 s, past grace.
        let step = tracker.on_report(state(true, 0, 33), t0 + Duration::from_secs(4));
        assert!(step.sweep.is_some());
    }

    #[test]
    fn nothing_is_swept_after_a_disconnect_until_a_new_report() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        tracker.on_report(state(true, 0, 29), t0);
        tracker.on_disconnect();
        assert_eq!(tracker.last(), None);
        assert_eq!(
            tracker.on_wake(t0 + Duration::from_secs(2)),
            Step::default()
        );
    }

    #[test]
    fn no_sweep_before_ready_is_written_and_a_full_grace_period_after_it() {
        // The Ready write after the first report failed: the retry carries it again, and the
        // backend is not swept in the meantime, however long the sidecar has been idle.
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut tracker = Tracker::new(grace, FRESH, false);
        let step = tracker.on_report(state(true, 0, 0), t0);
        assert_eq!((step.mark_ready, step.sweep), (true, None), "{step:?}");
        let later = t0 + Duration::from_millis(2500);
        let step = tracker.on_wake(later);
        assert_eq!((step.mark_ready, step.sweep), (true, None), "{step:?}");
        // Written at `later`: the sidecar says idle 2.5 s, past grace, but users only learn of
        // the backend now, so it gets its grace period from here.
        tracker.ready_written(Some(later));
        let step = tracker.on_wake(later);
        assert!(!step.mark_ready && step.sweep.is_none(), "{step:?}");
        let floor = later + grace + Duration::from_millis(1);
        assert_eq!(step.wake_at, Some(floor));
        assert!(
            tracker
                .on_wake(floor - Duration::from_millis(1))
                .sweep
                .is_none()
        );
        tracker.on_report(state(true, 0, 4), floor - Duration::from_millis(1));
        assert!(tracker.on_wake(floor).sweep.is_some());
    }

    #[test]
    fn a_slow_start_is_neither_swept_while_starting_nor_at_ready() {
        // On a real cluster the app may take longer than the grace period to start and the
        // sweeper reaches the sidecar seconds after it is ready: its first report already says
        // idle past grace. Ready is written, and the sweep waits a grace period from there.
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut tracker = Tracker::new(grace, FRESH, false);
        // While the app starts (not ready), nothing is swept, however long it takes.
        let step = tracker.on_report(state(false, 0, 7), t0);
        assert_eq!(step, Step::default());
        assert_eq!(tracker.on_wake(t0), Step::default());
        let step = tracker.on_report(state(true, 0, 7), t0);
        assert_eq!((step.mark_ready, step.sweep), (true, None), "{step:?}");
        tracker.ready_written(Some(t0));
        let step = tracker.on_wake(t0);
        assert_eq!(step.sweep, None);
        assert_eq!(step.wake_at, Some(t0 + grace + Duration::from_millis(1)));
        // A user connects and leaves within it: the sidecar's own countdown counts from then.
        let left = t0 + Duration::from_secs(2);
        let step = tracker.on_report(state(true, 0, 0), left);
        assert_eq!(step.wake_at, Some(left + grace + Duration::from_millis(1)));
        // A sweeper that finds the backend already Ready (a restart) resumes the sidecar's
        // countdown as before.
        let mut restarted = Tracker::new(grace, FRESH, true);
        assert!(restarted.on_report(state(true, 0, 7), t0).sweep.is_some());
    }

    #[test]
    fn activity_resets_the_countdown() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(GRACE, FRESH, true);
        tracker.on_report(state(true, 0, 25), t0);
        let step = tracker.on_report(state(true, 0, 0), t0 + Duration::from_secs(1));
        assert_eq!(
            step.wake_at,
            Some(t0 + Duration::from_secs(31) + Duration::from_millis(1))
        );
    }
}
