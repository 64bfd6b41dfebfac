//! Publishes the Events of phase transitions (`spawner_core::transition_event`) in the
//! background.
//!
//! An Event is the record of a transition, not a step of it. Created inline, its `POST` held
//! the reconcile (or the sweeper's write) that made the transition until the API server
//! answered, and the backend's next step waited behind it: under a burst of spawns that was a
//! fifth of the requests on every backend's way to Ready. Queued here, it is posted by one
//! task with a few requests in flight, after the writes that matter.
//!
//! Like client-go's event broadcaster, the queue is bounded and an Event that does not fit is
//! dropped (and counted), never waited for: a storm of transitions must not hold up the
//! transitions themselves. A failed `POST` is logged and not retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Events waiting to be posted; more are dropped.
pub const QUEUE: usize = 4096;
/// `POST`s in flight at once.
pub const IN_FLIGHT: usize = 4;

/// The sending side; cheap to clone. The task ends once every clone is dropped and what was
/// queued has been posted.
#[derive(Clone)]
pub struct EventPublisher {
    queue: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl EventPublisher {
    /// Starts the posting task on the current runtime. Await the handle after dropping every
    /// publisher to let the queue drain (on shutdown).
    pub fn start(client: kube::Client) -> (Self, JoinHandle<()>) {
        Self::with_capacity(client, QUEUE)
    }

    fn with_capacity(client: kube::Client, capacity: usize) -> (Self, JoinHandle<()>) {
        let (queue, pending) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(post_all(client, pending));
        let publisher = Self {
            queue,
            dropped: Arc::default(),
        };
        (publisher, task)
    }

    /// Queues `event`; false when it was dropped (the queue is full or the task has ended).
    pub fn publish(&self, event: Event) -> bool {
        match self.queue.try_send(event) {
            Ok(()) => true,
            Err(e) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Once per thousand, not per Event: a full queue means a storm.
                if dropped % 1000 == 1 {
                    let why = match e {
                        mpsc::error::TrySendError::Full(_) => "the queue is full",
                        mpsc::error::TrySendError::Closed(_) => "the publisher has stopped",
                    };
                    tracing::warn!(dropped, "dropping a transition Event: {why}");
                }
                false
            }
        }
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn post_all(client: kube::Client, mut pending: mpsc::Receiver<Event>) {
    let mut posting = JoinSet::new();
    loop {
        while posting.len() >= IN_FLIGHT {
            posting.join_next().await;
        }
        // Reap finished posts without waiting, so the set does not grow.
        while posting.try_join_next().is_some() {}
        let Some(event) = pending.recv().await else {
            break;
        };
        posting.spawn(post(client.clone(), event));
    }
    while posting.join_next().await.is_some() {}
}

async fn post(client: kube::Client, event: Event) {
    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        let regarding = event.regarding.as_ref().and_then(|r| r.name.as_deref());
        tracing::warn!(
            backend = regarding.unwrap_or("?"),
            reason = event.reason.as_deref().unwrap_or("?"),
            error = %e,
            "could not publish event"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use http::{Request, Response};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::client::Body;

    /// What the fake API server saw: the request paths with the events' reasons, and the most
    /// requests it ever had in flight at once.
    #[derive(Default)]
    struct Seen {
        posts: Vec<(String, String)>,
        in_flight: usize,
        most_in_flight: usize,
    }

    /// A client whose API server records each request and answers 201 after `delay`.
    fn fake_client(delay: Duration) -> (kube::Client, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let service = tower::service_fn({
            let seen = seen.clone();
            move |request: Request<Body>| {
                let seen = seen.clone();
                async move {
                    let path = request.uri().path().to_string();
                    let body = request.into_body().collect_bytes().await?;
                    let event: Event = serde_json::from_slice(&body)?;
                    {
                        let mut seen = seen.lock().unwrap();
                        seen.in_flight += 1;
                        seen.most_in_flight = seen.most_in_flight.max(seen.in_flight);
                        seen.posts
                            .push((path, event.reason.clone().unwrap_or_default()));
                    }
                    tokio::time::sleep(delay).await;
                    seen.lock().unwrap().in_flight -= 1;
                    let answer = Response::builder()
                        .status(201)
                        .body(Body::from(body.to_vec()))?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(answer)
                }
            }
        });
        (kube::Client::new(service, "default"), seen)
    }

    fn event(namespace: &str, reason: &str) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(format!("slab-1.{reason}")),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn queued_events_are_all_posted_to_their_namespace_before_the_task_ends() {
        let (client, seen) = fake_client(Duration::from_millis(2));
        let (publisher, task) = EventPublisher::start(client);
        let reasons: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        for reason in &reasons {
            assert!(publisher.publish(event("apps", reason)));
        }
        drop(publisher);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the queue drains")
            .expect("the task");
        let seen = seen.lock().unwrap();
        let mut posted: Vec<String> = seen.posts.iter().map(|(_, r)| r.clone()).collect();
        posted.sort();
        let mut expected = reasons.clone();
        expected.sort();
        assert_eq!(posted, expected);
        assert!(
            seen.posts
                .iter()
                .all(|(path, _)| path == "/apis/events.k8s.io/v1/namespaces/apps/events"),
            "{:?}",
            seen.posts
        );
        assert!(
            (2..=IN_FLIGHT).contains(&seen.most_in_flight),
            "at most {IN_FLIGHT} posts at once, and more than one: {}",
            seen.most_in_flight
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        // A server that never answers within the test: the queue fills up behind the posts.
        let (client, _seen) = fake_client(Duration::from_secs(3600));
        let (publisher, _task) = EventPublisher::with_capacity(client, 2);
        let accepted = (0..50)
            .filter(|i| publisher.publish(event("apps", &format!("r{i}"))))
            .count();
        // The task takes at most IN_FLIGHT off the queue; the queue holds two more.
        assert!(accepted <= IN_FLIGHT + 2, "{accepted}");
        assert_eq!(publisher.dropped(), 50 - accepted as u64);
    }
}
