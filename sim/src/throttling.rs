//! "Components back off when throttled": how often the API server answered each identity
//! `429 Too Many Requests`, read after every step, held to a rate no client that waits out
//! `Retry-After` (1 s) can reach.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::invariants::Violation;

/// The invariant.
pub const BACKS_OFF_WHEN_THROTTLED: &str = "components back off when throttled";

/// The most 429 answers one identity may get within any [`WINDOW`]. A client that waits out
/// `Retry-After: 1` sends each request at most about once a second, so this bounds its
/// requests in flight: the busiest identity of the suite's throttled worlds (the controllers'
/// ServiceAccount: two replicas, their watches, the lease, reconciles) peaks at 6, while one
/// request sent again at once is refused every round trip (about two 20 ms steps): 25 a
/// second, 50 with two in flight.
pub const MAX_THROTTLED_PER_WINDOW: u64 = 30;

pub const WINDOW: Duration = Duration::from_secs(1);

/// The 429 counts per identity seen over the last [`WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct ThrottleWatch {
    /// (when, the cumulative counts then), oldest first, the first one at least a window old
    /// or the first ever seen.
    seen: VecDeque<(Duration, BTreeMap<String, u64>)>,
    /// The highest count within a window seen so far, per identity, for the summary.
    pub(crate) peak: u64,
}

impl ThrottleWatch {
    /// Takes the cumulative counts at `now` and checks the identities' rates.
    pub(crate) fn observe(
        &mut self,
        now: Duration,
        counts: BTreeMap<String, u64>,
    ) -> Result<(), Violation> {
        if self.seen.back().is_some_and(|(_, last)| *last == counts) {
            return Ok(());
        }
        while self.seen.len() > 1 && self.seen[1].0 + WINDOW <= now {
            self.seen.pop_front();
        }
        if let Some((since, before)) = self.seen.front() {
            for (who, count) in &counts {
                let during = count - before.get(who).copied().unwrap_or(0).min(*count);
                self.peak = self.peak.max(during);
                if during > MAX_THROTTLED_PER_WINDOW {
                    return Err(Violation {
                        at: now,
                        invariant: BACKS_OFF_WHEN_THROTTLED,
                        detail: format!(
                            "{who} was answered 429 {during} times since {:.3}s (at most {MAX_THROTTLED_PER_WINDOW} a second: it retries without waiting out Retry-After)",
                            since.as_secs_f64()
                        ),
                    });
                }
            }
        }
        self.seen.push_back((now, counts));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: u64) -> BTreeMap<String, u64> {
        [("controller".to_string(), n)].into()
    }

    #[test]
    fn a_client_that_waits_passes_and_a_hot_loop_fails() {
        let mut watch = ThrottleWatch::default();
        // 20 a second for ten seconds.
        for s in 0..=10 {
            watch
                .observe(Duration::from_secs(s), counts(20 * s))
                .unwrap();
        }
        assert_eq!(watch.peak, 20);
        // Then 40 within half a second.
        let e = watch
            .observe(Duration::from_millis(10_500), counts(240))
            .unwrap_err();
        assert_eq!(e.invariant, BACKS_OFF_WHEN_THROTTLED);
    }
}
