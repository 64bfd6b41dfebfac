//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! The same protocol as client-go's leader election: the holder renews `renewTime` every retry
//! period; a candidate takes the lease over when the record has not changed for
//! `leaseDurationSeconds`, measured on its own monotonic clock from when it first saw that
//! record (so clock skew between replicas does not matter); every write carries the
//! resourceVersion it was computed from, so two candidates never both win. A leader that cannot
//! renew within the renew deadline (shorter than the lease duration) steps down before anyone
//! else may take over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::metrics::Metrics;

/// Timing and identity of one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Refuses timings under which two replicas could lead at once: the leader must step down
    /// (renew deadline) before anyone may take over (lease duration), and must get to retry
    /// within its deadline.
    pub fn check(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("the lease identity must not be empty".into());
        }
        if self.retry_period.is_zero() {
            return Err("the lease retry period must be positive".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the lease renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the lease retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// What a candidate does with the lease it just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// No lease exists: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    TakeOver,
    /// Someone else holds it and renews it.
    Wait,
}

/// Decides from the lease record, our identity and how long the record has stayed unchanged.
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    if unchanged_for >= duration {
        LeaseDecision::TakeOver
    } else {
        LeaseDecision::Wait
    }
}

/// One candidate for the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    clock: Arc<dyn Clock>,
    /// The last record seen (holder, renew time, transitions) and when it was first seen.
    observed: Option<(String, Instant)>,
}

fn record_key(spec: Option<&LeaseSpec>) -> String {
    match spec {
        None => String::new(),
        Some(s) => format!(
            "{}|{}|{}",
            s.holder_identity.as_deref().unwrap_or_default(),
            s.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            s.lease_transitions.unwrap_or(0)
        ),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, settings: LeaseSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            api,
            settings,
            clock,
            observed: None,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: read the lease and act on it. `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.settings.name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let key = record_key(spec);
        let unchanged_for = match &self.observed {
            Some((seen, since)) if *seen == key => since.elapsed(),
            _ => {
                self.observed = Some((key, Instant::now()));
                Duration::ZERO
            }
        };
        let decision = decide(
            spec,
            &self.settings.identity,
            unchanged_for,
            self.settings.lease_duration,
        );
        let now = MicroTime(self.clock.now());
        let result = match (decision, current) {
            (LeaseDecision::Wait, _) => return Ok(false),
            (LeaseDecision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.settings.identity.clone()),
                        lease_duration_seconds: Some(self.duration_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseDecision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(self.duration_seconds());
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
            (LeaseDecision::TakeOver, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(self.settings.identity.clone());
                spec.lease_duration_seconds = Some(self.duration_seconds());
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(lease) => {
                self.observed = Some((record_key(lease.spec.as_ref()), Instant::now()));
                Ok(true)
            }
            // Someone else wrote the lease first: they won this round.
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so another replica can take over at once (best effort).
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(self.clock.now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until `shutdown`, publishing whether we lead on `leading`. Releases the lease
    /// on shutdown if we hold it.
    ///
    /// A term is counted from when the winning request was SENT: the record it wrote is at
    /// least that new, so no other candidate can take over before `sent + lease_duration`,
    /// and we step down at `sent + renew_deadline`, earlier, however slowly the answer came.
    /// A renewal that has not succeeded by then is abandoned and leadership is given up at that
    /// instant, not when the request finally times out.
    pub async fn run(
        mut self,
        leading: watch::Sender<bool>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // When the request that last won (or renewed) the lease was sent.
        let mut won_at: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            let deadline = won_at.map_or(sent, |t| t) + self.settings.renew_deadline;
            let attempt = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()) => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let leads = match attempt {
                Ok(Ok(true)) => {
                    won_at = Some(sent);
                    true
                }
                Ok(Ok(false)) => false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: lease request failed");
                    // Keep leading only while the last win is within the renew deadline.
                    won_at.is_some_and(|t| t.elapsed() < self.settings.renew_deadline)
                }
                Err(_) => {
                    tracing::warn!("leader election: no renewal within the renew deadline");
                    false
                }
            };
            if !leads {
                won_at = None;
            }
            if *leading.borrow() != leads {
                tracing::info!(identity = %self.settings.identity, leads, "leadership changed");
                metrics.leader_transitions.fetch_add(1, Ordering::Relaxed);
                metrics.is_leader.store(leads, Ordering::Relaxed);
                let _ = leading.send(leads);
            }
            // Sleep until the next round, but never past the renew deadline while leading.
            let wake = match won_at {
                Some(t) => (Instant::now() + self.settings.retry_period)
                    .min(t + self.settings.renew_deadline),
                None => Instant::now() + self.settings.retry_period,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            metrics.is_leader.store(false, Ordering::Relaxed);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "leader election: could not release the lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: duration,
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn absent_lease_is_created() {
        assert_eq!(decide(None, "a", Duration::ZERO, D), LeaseDecision::Create);
    }

    #[test]
    fn own_lease_is_renewed_even_if_old() {
        let s = spec(Some("a"), Some(15));
        assert_eq!(
            decide(Some(&s), "a", Duration::from_secs(999), D),
            LeaseDecision::Renew
        );
    }

    #[test]
    fn foreign_lease_is_respected_until_it_stops_changing_for_its_duration() {
        let s = spec(Some("b"), Some(10));
        assert_eq!(
            decide(Some(&s), "a", Duration::from_secs(9), D),
            LeaseDecision::Wait
        );
        assert_eq!(
            decide(Some(&s), "a", Duration::from_secs(10), D),
            LeaseDecision::TakeOver
        );
        let no_duration = spec(Some("b"), None);
        assert_eq!(
            decide(Some(&no_duration), "a", Duration::from_secs(14), D),
            LeaseDecision::Wait
        );
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let s = spec(None, Some(1));
        assert_eq!(
            decide(Some(&s), "a", Duration::ZERO, D),
            LeaseDecision::TakeOver
        );
        let empty = spec(Some(""), Some(15));
        assert_eq!(
            decide(Some(&empty), "a", Duration::ZERO, D),
            LeaseDecision::TakeOver
        );
    }

    #[test]
    fn timings_that_let_two_lead_are_refused() {
        let ok = LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert_eq!(ok.check(), Ok(()));
        let equal = LeaseSettings {
            renew_deadline: Duration::from_secs(15),
            ..ok.clone()
        };
        assert!(equal.check().is_err());
        let slow_retry = LeaseSettings {
            retry_period: Duration::from_secs(10),
            ..ok.clone()
        };
        assert!(slow_retry.check().is_err());
        let anonymous = LeaseSettings {
            identity: String::new(),
            ..ok
        };
        assert!(anonymous.check().is_err());
    }

    #[test]
    fn record_key_changes_on_renewal() {
        let mut s = spec(Some("b"), Some(15));
        let before = record_key(Some(&s));
        s.renew_time = Some(MicroTime("2024-01-01T00:00:01Z".parse().expect("ts")));
        assert_ne!(before, record_key(Some(&s)));
        assert_eq!(record_key(None), "");
    }
}
