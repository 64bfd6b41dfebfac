//! Throttling: the answer of a real API server's priority and fairness under load, `429 Too
//! Many Requests` with `Retry-After`, switched on and off by the caller (the simulator's
//! throttling fault). Off unless switched on.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::json;

use crate::auth::Identity;
use crate::error::ApiError;

/// The group priority and fairness exempts (the cluster administrators).
const EXEMPT_GROUP: &str = "system:masters";

/// What to throttle while throttling is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    /// Requests answered 429, per thousand (1000: every one).
    pub per_mille: u32,
    /// The `Retry-After` the answers carry, in seconds.
    pub retry_after_seconds: u32,
}

/// The throttling state of one server: what is throttled and how many requests each user was
/// answered 429.
#[derive(Default)]
pub(crate) struct Throttler {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    throttle: Option<Throttle>,
    /// Requests seen while throttling: the input of the (deterministic) choice.
    seen: u64,
    throttled: BTreeMap<String, u64>,
}

impl Throttler {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a plain assignment: a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, throttle: Option<Throttle>) {
        self.state().throttle = throttle;
    }

    pub(crate) fn throttled(&self) -> BTreeMap<String, u64> {
        self.state().throttled.clone()
    }

    /// The 429 to answer `who` with, if this request is one of those throttled. The choice is
    /// a hash of a request counter: the same requests in the same order are throttled alike
    /// (the simulator's runs are reproducible), spread evenly over the callers.
    pub(crate) fn check(&self, who: &Identity) -> Option<ApiError> {
        let mut state = self.state();
        let throttle = state.throttle?;
        if who.groups.iter().any(|g| g == EXEMPT_GROUP) {
            return None;
        }
        state.seen += 1;
        if splitmix64(state.seen) % 1000 >= u64::from(throttle.per_mille) {
            return None;
        }
        *state.throttled.entry(who.user.clone()).or_default() += 1;
        Some(too_many_requests(throttle.retry_after_seconds))
    }
}

/// The real server's answer when a priority level's queues are full.
pub fn too_many_requests(retry_after_seconds: u32) -> ApiError {
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
    );
    e.details = Some(json!({"retryAfterSeconds": retry_after_seconds}));
    e
}

fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Identity {
        Identity {
            user: name.into(),
            groups: vec!["system:serviceaccounts".into()],
        }
    }

    #[test]
    fn throttles_the_given_share_and_counts_per_user() {
        let throttler = Throttler::default();
        assert!(throttler.check(&user("a")).is_none(), "off by default");
        throttler.set(Some(Throttle {
            per_mille: 300,
            retry_after_seconds: 2,
        }));
        let refused = (0..10_000)
            .filter_map(|_| throttler.check(&user("a")))
            .inspect(|e| {
                assert_eq!(e.code, 429);
                assert_eq!(e.details, Some(json!({"retryAfterSeconds": 2})));
            })
            .count();
        assert!((2_700..3_300).contains(&refused), "{refused}");
        assert_eq!(throttler.throttled()["a"], refused as u64);
        throttler.set(None);
        assert!(throttler.check(&user("a")).is_none());
    }

    #[test]
    fn administrators_are_exempt() {
        let throttler = Throttler::default();
        throttler.set(Some(Throttle {
            per_mille: 1000,
            retry_after_seconds: 1,
        }));
        assert!(throttler.check(&Identity::admin()).is_none());
        assert!(throttler.check(&user("b")).is_some());
    }
}
