//! Structural decoding of written objects, as the real API server decodes a body into its Go
//! types before anything else looks at it: a field of the wrong shape (a Service whose `spec`
//! is a string, labels that are not a map, a float where an integer belongs) is a 400, never
//! stored. Every Spawner component decodes these objects with k8s-openapi, so one stored object
//! they cannot decode would fail each of their list/watch calls until it is deleted.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ApiError, FieldCause};
use crate::resources::{self, ResourceType};

/// The longest grace period accepted (100 years): `now` plus it must stay an RFC 3339 time,
/// which a pod's `deletionTimestamp` is.
pub const MAX_GRACE_SECONDS: i64 = 100 * 365 * 24 * 3600;

fn decode<T: DeserializeOwned>(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    serde_path_to_error::deserialize::<_, T>(obj)
        .map(drop)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {kind}: {}: {}",
                rt.version,
                e.path(),
                e.inner(),
                kind = rt.kind
            ))
        })
}

/// Checks that `obj`, a body for the stored type `kind`, decodes as that type; custom resources
/// are checked by their schema elsewhere, so only their metadata is decoded here.
pub fn check(kind: usize, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    match kind {
        resources::NAMESPACES => decode::<Namespace>(rt, obj),
        resources::PODS => {
            decode::<Pod>(rt, obj)?;
            check_pod_grace(rt, obj)
        }
        resources::SERVICES => decode::<Service>(rt, obj),
        resources::CORE_EVENTS => decode::<Event>(rt, obj),
        _ if rt.kind == "Node" => decode::<Node>(rt, obj),
        _ if rt.kind == "Lease" => decode::<Lease>(rt, obj),
        _ => match obj.get("metadata") {
            Some(meta) => decode::<ObjectMeta>(rt, meta),
            None => Ok(()),
        },
    }
}

fn check_pod_grace(rt: &ResourceType, pod: &Value) -> Result<(), ApiError> {
    let grace = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64);
    match grace {
        Some(g) if g > MAX_GRACE_SECONDS => Err(ApiError::invalid(
            rt,
            crate::store::name_of(pod),
            vec![FieldCause::invalid_value(
                "spec.terminationGracePeriodSeconds",
                &g.to_string(),
                &format!("must be no more than {MAX_GRACE_SECONDS}"),
            )],
        )),
        _ => Ok(()),
    }
}

/// A `DeleteOptions.gracePeriodSeconds` beyond [`MAX_GRACE_SECONDS`] is a 422, as the real
/// server rejects invalid DeleteOptions.
pub fn check_delete_grace(grace: Option<i64>) -> Result<(), ApiError> {
    match grace {
        Some(g) if g > MAX_GRACE_SECONDS => Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "DeleteOptions.meta.k8s.io \"\" is invalid: gracePeriodSeconds: Invalid value: {g}: must be no more than {MAX_GRACE_SECONDS}"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rt(kind: usize) -> ResourceType {
        resources::all()[kind].clone()
    }

    #[test]
    fn wrong_shapes_are_bad_requests_naming_the_field() {
        let cases = [
            (
                resources::SERVICES,
                json!({"metadata": {"name": "s"}, "spec": "x"}),
                "spec",
            ),
            (
                resources::SERVICES,
                json!({"metadata": {"name": "s"}, "spec": {"ports": "x"}}),
                "spec.ports",
            ),
            (
                resources::NAMESPACES,
                json!({"metadata": {"name": "n", "labels": "x"}}),
                "metadata.labels",
            ),
            (
                resources::PODS,
                json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "i"}], "terminationGracePeriodSeconds": 9e12}}),
                "spec.terminationGracePeriodSeconds",
            ),
        ];
        for (kind, obj, field) in cases {
            let e = check(kind, &rt(kind), &obj).unwrap_err();
            assert_eq!(e.code, 400, "{obj}: {e}");
            assert!(e.message.contains(field), "{obj}: {e}");
        }
    }

    #[test]
    fn well_formed_objects_pass() {
        let pod = json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": [{"name": "a", "image": "i"}], "terminationGracePeriodSeconds": 30}});
        check(resources::PODS, &rt(resources::PODS), &pod).unwrap();
        let svc = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        check(resources::SERVICES, &rt(resources::SERVICES), &svc).unwrap();
    }

    #[test]
    fn grace_periods_beyond_a_century_are_invalid() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "i"}], "terminationGracePeriodSeconds": 9_000_000_000_000i64}});
        assert_eq!(
            check(resources::PODS, &rt(resources::PODS), &pod)
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(check_delete_grace(Some(i64::MAX)).unwrap_err().code, 422);
        check_delete_grace(Some(MAX_GRACE_SECONDS)).unwrap();
        check_delete_grace(Some(-5)).unwrap();
    }
}
