//! The sweeper's decisions for one backend, as a pure state machine over the sidecar's reports
//! and the sweeper's monotonic clock (instants are parameters, never read here).
//!
//! Safety rules it encodes (DESIGN.md rule 6):
//! - a live connection is never swept ([`spawner_core::idle::idle_verdict`] says `Active`);
//! - only a report from a healthy stream counts: after a disconnect nothing is swept until the
//!   sidecar reports again, and between messages the countdown is only trusted while the last
//!   message is fresher than the heartbeat allows;
//! - the countdown is the sidecar's own `seconds_since_active` plus the time since that report,
//!   so a restarted sweeper resumes it instead of restarting it.

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
}

impl Tracker {
    pub fn new(grace: Duration, freshness: Duration, ready_marked: bool) -> Self {
        Self {
            grace,
            freshness,
            last: None,
            ready_marked,
        }
    }

    /// The last report and when it arrived.
    pub fn last(&self) -> Option<&(SidecarState, Instant)> {
        self.last.as_ref()
    }

    /// The Ready write succeeded (or the backend was already past Running).
    pub fn ready_written(&mut self) {
        self.ready_marked = true;
    }

    fn verdict_step(&self, state: &SidecarState, elapsed: Duration, now: Instant) -> Step {
        match idle_verdict(state, elapsed, self.grace) {
            IdleVerdict::Active => Step::default(),
            IdleVerdict::PastGrace { idle } => Step {
                sweep: Some(idle),
                ..Step::default()
            },
            // Wake just after the deadline: exactly at it is not yet past the grace period.
            IdleVerdict::Idle { remaining } => Step {
                wake_at: Some(now + remaining + Duration::from_millis(1)),
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
        tracker.ready_written();
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
    fn a_ready_mark_not_yet_written_comes_with_the_sweep() {
        // The Ready write after the first report failed; the sweep step must carry it again, so
        // the backend goes through Ready before it is swept.
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::from_secs(2), FRESH, false);
        let step = tracker.on_report(state(true, 0, 0), t0);
        assert!(step.mark_ready);
        let wake = step.wake_at.expect("countdown");
        let step = tracker.on_wake(wake);
        assert!(step.mark_ready && step.sweep.is_some(), "{step:?}");
        tracker.ready_written();
        assert!(!tracker.on_wake(wake).mark_ready);
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
