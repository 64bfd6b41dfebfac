//! Split-brain detection: every controller replica's writes to the API server are recorded
//! as they are sent, and the world's observer checks after each step that the replica that
//! sent one held the controllers' Lease (by the API server's store) at that step. A replica
//! that keeps reconciling after its lease could be taken over — a renewal counted from when
//! its response arrived, a renew deadline not shorter than the lease, reconciles left running
//! after leadership is lost — is caught the step it sends a write.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::Service;

type Request = http::Request<kube::client::Body>;

/// The writes sent by the controllers since the observer last looked: (replica, request).
#[derive(Clone, Debug, Default)]
pub struct WriteLog(Arc<Mutex<Vec<(String, String)>>>);

impl WriteLog {
    fn push(&self, replica: &str, request: String) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.push((replica.to_string(), request));
    }

    /// The writes recorded since the last call.
    pub fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Whether `request` changes reconciled state: a create, update, patch or delete of anything
/// but the Lease itself (the election) and Events (posted in the background, harmless when
/// late).
fn is_reconcile_write(request: &Request) -> bool {
    let path = request.uri().path();
    !matches!(
        *request.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) && !path.contains("/leases")
        && !path.contains("/events")
}

/// Wraps a controller replica's connection to the API server and records its writes.
#[derive(Clone)]
pub struct RecordWrites<S> {
    pub inner: S,
    pub replica: String,
    pub log: WriteLog,
}

impl<S> Service<Request> for RecordWrites<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if is_reconcile_write(&request) {
            self.log.push(
                &self.replica,
                format!("{} {}", request.method(), request.uri().path()),
            );
        }
        self.inner.call(request)
    }
}

/// The holder of the controllers' Lease in `leases` (the API server's store), if any.
pub fn lease_holder(leases: &[Arc<serde_json::Value>], lease_name: &str) -> Option<String> {
    leases
        .iter()
        .find(|l| l["metadata"]["name"].as_str() == Some(lease_name))
        .and_then(|l| l["spec"]["holderIdentity"].as_str())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: http::Method, path: &str) -> Request {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(kube::client::Body::empty())
            .expect("request")
    }

    #[test]
    fn only_reconcile_writes_count() {
        use http::Method;
        assert!(is_reconcile_write(&request(
            Method::POST,
            "/api/v1/namespaces/d/pods"
        )));
        assert!(is_reconcile_write(&request(
            Method::PATCH,
            "/apis/spawner.dev/v1/namespaces/d/sessionlivedbackends/x/status"
        )));
        assert!(is_reconcile_write(&request(
            Method::DELETE,
            "/api/v1/namespaces/d/services/x"
        )));
        assert!(!is_reconcile_write(&request(
            Method::GET,
            "/api/v1/namespaces/d/pods"
        )));
        assert!(!is_reconcile_write(&request(
            Method::PUT,
            "/apis/coordination.k8s.io/v1/namespaces/d/leases/spawner-controller"
        )));
        assert!(!is_reconcile_write(&request(
            Method::POST,
            "/api/v1/namespaces/d/events"
        )));
    }

    #[test]
    fn the_holder_is_read_from_the_named_lease() {
        let leases = vec![Arc::new(serde_json::json!({
            "metadata": {"name": "spawner-controller"},
            "spec": {"holderIdentity": "controller-1"}
        }))];
        assert_eq!(
            lease_holder(&leases, "spawner-controller").as_deref(),
            Some("controller-1")
        );
        assert_eq!(lease_holder(&leases, "other"), None);
    }
}
