//! One backend's subscription: a small task that keeps the sidecar's event stream open,
//! feeds its reports to a [`Tracker`], and writes Ready and Swept when the tracker says so.
//!
//! A lost, refused or silent stream is never a reason to sweep: the task drops it, forgets what
//! it said, and reconnects with backoff; the sidecar's first report on the new stream carries
//! its own idle time, so the countdown resumes where it was.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::ACCEPT;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::Connect;
use kube::Api;
use spawner_core::phase::Observation;
use spawner_core::resource::SessionLivedBackend;
use spawner_core::state_stream::{
    CONTROL_TOKEN_HEADER, SEAL_PATH, SEAL_PERMANENT_PATH, SEAL_RENEW_SECONDS, STATE_STREAM_PATH,
    SseParser, StateMessage, UNSEAL_PATH,
};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::Shared;
use crate::tracker::{Step, Tracker};
use crate::write::{WriteOutcome, write_observation};

/// The HTTP client the sweeper reaches sidecars with (over an injected connector).
pub type EventsClient<C> = HyperClient<C, Empty<Bytes>>;

/// Longest SSE line accepted from a sidecar; its messages are a few dozen bytes.
const MAX_SSE_LINE: usize = 16 * 1024;

/// How soon a Ready write that failed is tried again (also the next report or deadline retries).
const READY_RETRY: Duration = Duration::from_secs(1);

/// How soon a sweep whose seal or write failed is tried again, doubled after each failure up to
/// the heartbeat interval. Waiting for the next report instead (up to a heartbeat, 5 s) would
/// keep an idle backend past its grace period and its sidecar sealed (refusing users) for that
/// long after one transient error, such as a request sent on a pooled API server connection
/// just as its read timeout closed it.
const SWEEP_RETRY: Duration = Duration::from_millis(250);

/// The delay before sweep attempt `failures + 1`.
fn sweep_retry_delay(failures: u32, heartbeat: Duration) -> Duration {
    SWEEP_RETRY
        .saturating_mul(1u32 << failures.min(16))
        .min(heartbeat.max(SWEEP_RETRY))
}

/// The backend a subscription follows.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `status.url`: the sidecar's base URL.
    pub url: String,
    pub grace: Duration,
    /// Whether the backend is already Ready (so Ready is not written again).
    pub ready: bool,
    /// The backend as the watch showed it when following began: the Ready write starts from
    /// it instead of a fresh read (nothing else usually writes it between Running and Ready).
    pub seen: Arc<SessionLivedBackend>,
}

/// Targets are equal when they follow the same backend the same way, from the same version.
impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.namespace,
            &self.name,
            &self.uid,
            &self.url,
            self.grace,
            self.ready,
        ) == (
            &other.namespace,
            &other.name,
            &other.uid,
            &other.url,
            other.grace,
            other.ready,
        ) && self.seen.metadata.resource_version == other.seen.metadata.resource_version
    }
}

impl Eq for Target {}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The backend is finished (swept here, or finished or deleted elsewhere): stop following it.
    Done,
    /// The stream was lost; `heard` says whether it carried any report.
    Lost { heard: bool },
}

/// The delay before reconnect attempt `failures` (1-based): exponential from `min` to `max`,
/// stretched by up to a quarter by a per-backend factor so reconnects after a sidecar-wide
/// outage spread out (deterministically, so the simulator replays them).
pub fn reconnect_delay(failures: u32, min: Duration, max: Duration, uid: &str) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = min.saturating_mul(1u32 << exp).min(max);
    let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    base + base.mul_f64((hash % 256) as f64 / 1024.0)
}

/// Follows `target` until it is finished.
///
/// `cancel` ends the task when its sender is dropped (the backend left this node's watch). It is
/// only looked at while waiting, never in the middle of a status write, so a write that started
/// is completed and counted.
pub async fn follow<C>(target: Target, shared: Arc<Shared<C>>, mut cancel: watch::Receiver<()>)
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let config = &shared.config;
    let uri: Uri = match format!("{}{STATE_STREAM_PATH}", target.url.trim_end_matches('/')).parse()
    {
        Ok(uri) => uri,
        Err(e) => {
            tracing::warn!(backend = %target.name, url = %target.url, error = %e,
                "backend URL is not a valid URI; not following it");
            return;
        }
    };
    let token = spawner_core::token::events_token(&config.events_secret, &target.uid);
    let api: Api<SessionLivedBackend> = Api::namespaced(shared.kube.clone(), &target.namespace);
    let mut tracker = Tracker::new(target.grace, config.freshness(), target.ready);
    let mut failures = 0u32;
    loop {
        let end = stream_once(
            &uri,
            &token,
            &target,
            &api,
            &mut tracker,
            &shared,
            &mut cancel,
        )
        .await;
        tracker.on_disconnect();
        match end {
            End::Done => return,
            End::Lost { heard } => {
                #[cfg(feature = "sim-mutants")]
                if crate::mutants::sweeps_on_lost_stream() {
                    let idle = spawner_core::phase::Observation::IdlePastGrace {
                        idle_seconds: target.grace.as_secs(),
                    };
                    let _ = crate::write::write_observation(
                        &api,
                        (&target.name, &target.uid),
                        &idle,
                        config.clock.as_ref(),
                        None,
                        None,
                    )
                    .await;
                }
                if heard {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                let delay = reconnect_delay(
                    failures,
                    config.reconnect_min,
                    config.reconnect_max,
                    &target.uid,
                );
                tracing::debug!(backend = %target.name, ?delay, failures, "event stream lost; reconnecting");
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = cancel.changed() => return,
                }
            }
        }
    }
}

/// Keeps `connected` accurate however the stream ends.
struct ConnectedGuard<'a>(&'a std::sync::atomic::AtomicI64);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn stream_once<C>(
    uri: &Uri,
    token: &str,
    target: &Target,
    api: &Api<SessionLivedBackend>,
    tracker: &mut Tracker,
    shared: &Shared<C>,
    cancel: &mut watch::Receiver<()>,
) -> End
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let metrics = &shared.metrics;
    let read_timeout = shared.config.read_timeout();
    let request = match Request::get(uri.clone())
        .header(CONTROL_TOKEN_HEADER, token)
        .header(ACCEPT, "text/event-stream")
        .body(Empty::new())
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(backend = %target.name, error = %e, "cannot build the events request");
            return End::Lost { heard: false };
        }
    };
    let response = tokio::select! {
        r = timeout(read_timeout, shared.http.request(request)) => r,
        _ = cancel.changed() => return End::Done,
    };
    let response = match response {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            metrics.connect_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(backend = %target.name, error = %e, "cannot reach the sidecar");
            return End::Lost { heard: false };
        }
        Err(_) => {
            metrics.connect_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(backend = %target.name, "sidecar did not answer in time");
            return End::Lost { heard: false };
        }
    };
    if response.status() != StatusCode::OK {
        metrics.connect_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(backend = %target.name, status = %response.status(),
            "sidecar refused the event stream");
        return End::Lost { heard: false };
    }
    metrics.connects.fetch_add(1, Ordering::Relaxed);
    metrics.connected.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnectedGuard(&metrics.connected);

    let mut body = response.into_body();
    let mut parser = SseParser::with_max_line(MAX_SSE_LINE);
    let mut heard = false;
    let mut wake_at: Option<Instant> = None;
    let mut read_deadline = Instant::now() + read_timeout;
    let mut sweep_failures = 0u32;
    loop {
        let step = tokio::select! {
            frame = body.frame() => {
                let bytes = match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(bytes) => bytes,
                        Err(_) => continue, // trailers
                    },
                    Some(Err(e)) => {
                        metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(backend = %target.name, error = %e, "event stream broke");
                        return End::Lost { heard };
                    }
                    None => {
                        metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
                        return End::Lost { heard };
                    }
                };
                let now = Instant::now();
                read_deadline = now + read_timeout;
                let messages = match parser.push(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(backend = %target.name, error = %e, "malformed event stream");
                        return End::Lost { heard };
                    }
                };
                let mut step = None;
                for message in &messages {
                    match StateMessage::from_message(message) {
                        Ok(Some(event)) => {
                            metrics.messages.fetch_add(1, Ordering::Relaxed);
                            heard = true;
                            // Only the newest report matters; each one replaces the last.
                            step = Some(tracker.on_report(*event.state(), now));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(backend = %target.name, error = %e, "unreadable sidecar event");
                        }
                    }
                }
                match step {
                    Some(step) => step,
                    None => continue,
                }
            }
            _ = sleep_until(read_deadline) => {
                metrics.read_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(backend = %target.name, "event stream silent; dropping it");
                return End::Lost { heard };
            }
            _ = sleep_until(wake_at.unwrap_or(read_deadline)), if wake_at.is_some() => {
                tracker.on_wake(Instant::now())
            }
            _ = cancel.changed() => return End::Done,
        };
        match act(step, target, token, api, tracker, shared).await {
            After::End(end) => return end,
            After::Wait => {
                sweep_failures = 0;
                // Once Ready is written, look again at once: the countdown starts from it.
                wake_at = if step.mark_ready {
                    Some(Instant::now())
                } else {
                    step.wake_at
                };
            }
            After::RetryReady => {
                let retry = Instant::now() + READY_RETRY;
                wake_at = Some(step.wake_at.map_or(retry, |at| at.min(retry)));
            }
            After::RetrySweep => {
                let delay = sweep_retry_delay(sweep_failures, shared.config.heartbeat);
                sweep_failures = sweep_failures.saturating_add(1);
                wake_at = Some(Instant::now() + delay);
            }
        }
    }
}

/// What the stream does after a step's writes.
enum After {
    /// The backend needs no more following.
    End(End),
    /// Wait for the next report or the step's deadline.
    Wait,
    /// The Ready write failed: try again soon.
    RetryReady,
    /// The sweep could not be sealed or written: try again soon (with backoff).
    RetrySweep,
}

/// Carries out a step's writes.
async fn act<C>(
    step: Step,
    target: &Target,
    token: &str,
    api: &Api<SessionLivedBackend>,
    tracker: &mut Tracker,
    shared: &Shared<C>,
) -> After
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let metrics = &shared.metrics;
    let write = |observation: Observation, seen: Option<Arc<SessionLivedBackend>>| {
        let api = api.clone();
        async move {
            write_observation(
                &api,
                (&target.name, &target.uid),
                &observation,
                shared.config.clock.as_ref(),
                Some(&shared.events),
                seen.as_deref(),
            )
            .await
        }
    };
    if step.mark_ready {
        match write(Observation::SidecarReady, Some(target.seen.clone())).await {
            Ok(WriteOutcome::Written(_)) => {
                metrics.marked_ready.fetch_add(1, Ordering::Relaxed);
                tracker.ready_written(Some(Instant::now()));
                tracing::info!(backend = %target.name, "marked Ready");
            }
            Ok(WriteOutcome::Unchanged(phase)) if phase.is_terminal() => {
                return After::End(End::Done);
            }
            Ok(WriteOutcome::Unchanged(_)) => tracker.ready_written(None),
            Ok(WriteOutcome::Gone) => return After::End(End::Done),
            Err(e) => {
                // Not swept before it is Ready: a backend that ran goes through Ready (users
                // wait for it), so the sweep waits for the retry.
                metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = %target.name, error = %e, "could not mark Ready");
                return After::RetryReady;
            }
        }
    }
    if let Some(idle) = step.sweep {
        // Seal first: once the sidecar has sealed, no user can connect, so the sweep cannot
        // race with a connection the event stream has not reported yet.
        match seal(target, token, shared, SEAL_PATH).await {
            Seal::Sealed => {}
            Seal::Live => {
                tracing::info!(backend = %target.name, "not swept: a connection arrived");
                return After::Wait;
            }
            Seal::Failed(reason) => {
                metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = %target.name, %reason, "not swept: the sidecar could not be sealed");
                return After::RetrySweep;
            }
        }
        let observation = Observation::IdlePastGrace {
            idle_seconds: idle.as_secs(),
        };
        // The seal lasts until the sweep is decided: renewed while the write is in flight,
        // however long the API server takes.
        let renewing = async {
            loop {
                sleep(Duration::from_secs(SEAL_RENEW_SECONDS)).await;
                match seal(target, token, shared, SEAL_PATH).await {
                    Seal::Sealed => {}
                    Seal::Live => tracing::warn!(backend = %target.name,
                        "the seal had lapsed and a connection is live; the sweep goes on"),
                    Seal::Failed(reason) => tracing::warn!(backend = %target.name, %reason,
                        "could not renew the seal"),
                }
            }
        };
        let outcome = tokio::select! {
            outcome = write(observation, None) => outcome,
            () = renewing => unreachable!("renewing never ends"),
        };
        match outcome {
            Ok(WriteOutcome::Written(_)) => {
                metrics.swept.fetch_add(1, Ordering::Relaxed);
                tracing::info!(backend = %target.name, idle_seconds = idle.as_secs(), "marked Swept");
                seal_for_good(target, token, shared).await;
                return After::End(End::Done);
            }
            Ok(WriteOutcome::Unchanged(phase)) if phase.is_terminal() => {
                seal_for_good(target, token, shared).await;
                return After::End(End::Done);
            }
            Ok(WriteOutcome::Gone) => {
                seal_for_good(target, token, shared).await;
                return After::End(End::Done);
            }
            Ok(WriteOutcome::Unchanged(_)) => unseal(target, token, shared).await,
            Err(e) => {
                metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = %target.name, error = %e, "could not mark Swept; retrying");
                // The write may have landed even though it failed here: look before
                // reopening the backend to users.
                match api.get_opt(&target.name).await {
                    Ok(Some(b))
                        if b.metadata.uid.as_deref() == Some(target.uid.as_str())
                            && !b.phase().is_terminal() =>
                    {
                        unseal(target, token, shared).await
                    }
                    Ok(_) => {
                        seal_for_good(target, token, shared).await;
                        return After::End(End::Done);
                    }
                    // Unknown: the seal lapses by itself unless the retry renews it.
                    Err(e) => tracing::warn!(backend = %target.name, error = %e,
                        "cannot tell whether the sweep was written; leaving the seal to lapse"),
                }
                return After::RetrySweep;
            }
        }
    }
    After::Wait
}

/// After the sweep was written (or the backend ended otherwise): the sidecar never takes a
/// connection again. Retried briefly; the pod is about to be deleted anyway.
async fn seal_for_good<C>(target: &Target, token: &str, shared: &Shared<C>)
where
    C: Connect + Clone + Send + Sync + 'static,
{
    for attempt in 0..3u32 {
        match seal(target, token, shared, SEAL_PERMANENT_PATH).await {
            Seal::Sealed => return,
            Seal::Live => {
                tracing::warn!(backend = %target.name, "swept, but a connection is live (the seal had lapsed)");
                return;
            }
            Seal::Failed(reason) => {
                tracing::warn!(backend = %target.name, %reason, attempt, "could not seal for good");
                sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The sweep was decided against: users may connect again at once.
async fn unseal<C>(target: &Target, token: &str, shared: &Shared<C>)
where
    C: Connect + Clone + Send + Sync + 'static,
{
    if let Seal::Failed(reason) = seal(target, token, shared, UNSEAL_PATH).await {
        tracing::warn!(backend = %target.name, %reason, "could not release the seal; it lapses by itself");
    }
}

enum Seal {
    Sealed,
    Live,
    Failed(String),
}

/// Posts to one of the sidecar's seal paths (`spawner_core::state_stream::SEAL_PATH`: seal or renew,
/// `SEAL_PERMANENT_PATH`, `UNSEAL_PATH`).
async fn seal<C>(target: &Target, token: &str, shared: &Shared<C>, path: &str) -> Seal
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let uri: Uri = match format!("{}{path}", target.url.trim_end_matches('/')).parse() {
        Ok(uri) => uri,
        Err(e) => return Seal::Failed(format!("bad seal URI: {e}")),
    };
    let request = match Request::post(uri)
        .header(CONTROL_TOKEN_HEADER, token)
        .body(Empty::new())
    {
        Ok(r) => r,
        Err(e) => return Seal::Failed(e.to_string()),
    };
    match timeout(shared.config.read_timeout(), shared.http.request(request)).await {
        Ok(Ok(response)) => match response.status() {
            StatusCode::OK => Seal::Sealed,
            StatusCode::CONFLICT => Seal::Live,
            other => Seal::Failed(format!("the sidecar answered {other}")),
        },
        Ok(Err(e)) => Seal::Failed(e.to_string()),
        Err(_) => Seal::Failed("the sidecar did not answer in time".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_retries_start_soon_and_back_off_to_the_heartbeat() {
        let heartbeat = Duration::from_secs(5);
        assert_eq!(sweep_retry_delay(0, heartbeat), Duration::from_millis(250));
        assert_eq!(sweep_retry_delay(1, heartbeat), Duration::from_millis(500));
        assert_eq!(sweep_retry_delay(5, heartbeat), heartbeat);
        assert_eq!(sweep_retry_delay(u32::MAX, heartbeat), heartbeat);
    }

    #[test]
    fn reconnect_delay_grows_is_capped_and_spread() {
        let min = Duration::from_millis(200);
        let max = Duration::from_secs(10);
        let d1 = reconnect_delay(1, min, max, "a");
        let d3 = reconnect_delay(3, min, max, "a");
        assert!(d1 >= min && d1 <= min + min / 4, "{d1:?}");
        assert!(d3 >= min * 4 && d3 <= min * 5, "{d3:?}");
        let capped = reconnect_delay(40, min, max, "a");
        assert!(capped >= max && capped <= max + max / 4, "{capped:?}");
        assert_eq!(d1, reconnect_delay(1, min, max, "a"));
        let spread: std::collections::HashSet<_> = (0..20)
            .map(|i| reconnect_delay(1, min, max, &format!("uid-{i}")))
            .collect();
        assert!(spread.len() > 5);
    }
}
