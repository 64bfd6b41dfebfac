//! Bad input answered with the real server's status codes and reasons.

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spawner_core::resource::SessionLivedBackend;

use super::{CheckError, CheckResult, api_error, backend, pod};
use crate::ensure;

pub async fn malformed_json_is_bad_request(client: Client, ns: String) -> CheckResult {
    for body in [&b"{not json"[..], &b"[1, 2"[..]] {
        let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods"))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .map_err(|e| CheckError::Failed(e.to_string()))?;
        let err = api_error(
            client.request::<serde_json::Value>(req).await,
            "malformed JSON",
        )?;
        ensure!(
            err.code == 400 && err.reason == "BadRequest",
            "malformed JSON: {err:?}"
        );
    }
    // A body of the wrong kind is refused too.
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods"))
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(
                &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}),
            )
            .unwrap_or_default(),
        )
        .map_err(|e| CheckError::Failed(e.to_string()))?;
    let err = api_error(client.request::<serde_json::Value>(req).await, "wrong kind")?;
    ensure!(
        err.code == 400 && err.reason == "BadRequest",
        "wrong kind: {err:?}"
    );
    Ok(())
}

pub async fn unknown_resource_is_not_found(client: Client, ns: String) -> CheckResult {
    for (group, version, kind, plural) in [
        ("spawner.dev", "v1", "Nonexistent", "nonexistents"),
        ("nonexistent.example.com", "v1", "Thing", "things"),
        ("", "v1", "Gadget", "gadgets"),
    ] {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let err = api_error(api.list(&ListParams::default()).await, "unknown resource")?;
        ensure!(err.code == 404, "{group}/{plural}: {err:?}");
        // Built-in groups answer with a NotFound Status; custom-resource and unknown groups
        // with the plain-text "404 page not found" of the server's fallback handler.
        if group.is_empty() {
            ensure!(
                err.reason == "NotFound"
                    && err.message == "the server could not find the requested resource",
                "{plural}: {err:?}"
            );
        }
    }
    Ok(())
}

pub async fn invalid_names_are_invalid(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let err = api_error(
        pods.create(&PostParams::default(), &pod("Bad_Name", json!({})))
            .await,
        "invalid pod name",
    )?;
    ensure!(
        err.code == 422 && err.reason == "Invalid",
        "invalid pod name: {err:?}"
    );
    ensure!(
        err.message.starts_with("Pod \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain must consist of"),
        "message {:?}",
        err.message
    );
    let causes = err
        .details
        .as_ref()
        .map(|d| d.causes.clone())
        .unwrap_or_default();
    ensure!(
        causes.iter().any(|c| c.field == "metadata.name"),
        "causes {causes:?}"
    );

    let backends: Api<SessionLivedBackend> = Api::namespaced(client.clone(), &ns);
    let err = api_error(
        backends
            .create(&PostParams::default(), &backend("UPPER"))
            .await,
        "invalid backend name",
    )?;
    ensure!(
        err.code == 422 && err.reason == "Invalid",
        "invalid backend name: {err:?}"
    );
    ensure!(
        err.message.starts_with("SessionLivedBackend.spawner.dev \"UPPER\" is invalid: metadata.name: Invalid value: \"UPPER\""),
        "message {:?}",
        err.message
    );

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "1svc"}, "spec": {"ports": [{"port": 80}]}}),
    )
    .map_err(|e| CheckError::Failed(e.to_string()))?;
    let err = api_error(
        services.create(&PostParams::default(), &svc).await,
        "invalid service name",
    )?;
    ensure!(
        err.code == 422 && err.message.contains("a DNS-1035 label must consist of"),
        "invalid service name: {err:?}"
    );

    let mut long = pod(&"a".repeat(254), json!({}));
    long.metadata.name = Some("a".repeat(254));
    let err = api_error(
        pods.create(&PostParams::default(), &long).await,
        "long name",
    )?;
    ensure!(
        err.code == 422 && err.message.contains("must be no more than 253 characters"),
        "long name: {err:?}"
    );

    let mut nameless = pod("", json!({}));
    nameless.metadata.name = None;
    let err = api_error(
        pods.create(&PostParams::default(), &nameless).await,
        "no name",
    )?;
    ensure!(
        err.code == 422 && err.message.contains("name or generateName is required"),
        "no name: {err:?}"
    );

    let mut no_image = pod("noimage", json!({}));
    if let Some(spec) = no_image.spec.as_mut() {
        spec.containers[0].image = None;
    }
    let err = api_error(
        pods.create(&PostParams::default(), &no_image).await,
        "no image",
    )?;
    ensure!(
        err.code == 422
            && err
                .message
                .contains("spec.containers[0].image: Required value"),
        "no image: {err:?}"
    );
    Ok(())
}

pub async fn oversized_objects_are_too_large(client: Client, ns: String) -> CheckResult {
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let mut big = backend("big");
    big.metadata.annotations = Some([("blob".to_string(), "x".repeat(4 * 1024 * 1024))].into());
    let err = api_error(
        backends.create(&PostParams::default(), &big).await,
        "4 MiB object",
    )?;
    ensure!(
        err.code == 413 && err.reason == "RequestEntityTooLarge",
        "4 MiB object: {err:?}"
    );
    ensure!(
        backends.get_opt("big").await?.is_none(),
        "oversized object was stored"
    );
    Ok(())
}

pub async fn bad_selectors_are_bad_requests(client: Client, ns: String) -> CheckResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let err = api_error(
        pods.list(&ListParams::default().fields("spec.bogus=x"))
            .await,
        "unknown pod field",
    )?;
    ensure!(
        err.code == 400 && err.reason == "BadRequest",
        "unknown pod field: {err:?}"
    );
    ensure!(
        err.message
            .contains("field label not supported: spec.bogus"),
        "message {:?}",
        err.message
    );
    let backends: Api<SessionLivedBackend> = Api::namespaced(client, &ns);
    let err = api_error(
        backends
            .list(&ListParams::default().fields("status.phase=Ready"))
            .await,
        "backend field",
    )?;
    ensure!(
        err.code == 400,
        "unsupported backend field selector: {err:?}"
    );
    ensure!(
        err.message
            .contains("field label not supported: status.phase"),
        "message {:?}",
        err.message
    );
    let err = api_error(
        pods.list(&ListParams::default().labels("app in web")).await,
        "bad label selector",
    )?;
    ensure!(
        err.code == 400 && err.reason == "BadRequest",
        "bad label selector: {err:?}"
    );
    Ok(())
}

pub async fn missing_namespace_is_not_found(client: Client, ns: String) -> CheckResult {
    let ghost = format!("{ns}-ghost");
    let pods: Api<Pod> = Api::namespaced(client, &ghost);
    let err = api_error(
        pods.create(&PostParams::default(), &pod("p", json!({})))
            .await,
        "create in a missing namespace",
    )?;
    ensure!(
        err.code == 404 && err.reason == "NotFound",
        "missing namespace: {err:?}"
    );
    ensure!(
        err.message == format!("namespaces \"{ghost}\" not found"),
        "message {:?}",
        err.message
    );
    Ok(())
}

pub async fn custom_resource_schema_prunes_defaults_and_validates(
    client: Client,
    ns: String,
) -> CheckResult {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("spawner.dev", "v1", "SessionLivedBackend"),
        "sessionlivedbackends",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
    let obj = |name: &str, spec: serde_json::Value| -> Result<DynamicObject, CheckError> {
        serde_json::from_value(json!({
            "apiVersion": "spawner.dev/v1", "kind": "SessionLivedBackend",
            "metadata": {"name": name}, "spec": spec, "unknownTopLevel": 1,
        }))
        .map_err(|e| CheckError::Failed(e.to_string()))
    };
    let created = api
        .create(
            &PostParams::default(),
            &obj("minimal", json!({"template": {"spec": {"containers": [{"name": "app", "image": "x", "custom": 1}]}}, "unknownField": true}))?,
        )
        .await?;
    let spec = created.data.get("spec").cloned().unwrap_or_default();
    ensure!(
        spec.get("httpPort") == Some(&json!(8080)),
        "httpPort not defaulted: {spec}"
    );
    ensure!(
        spec.get("gracePeriodSeconds") == Some(&json!(300)),
        "gracePeriodSeconds not defaulted: {spec}"
    );
    ensure!(
        spec.get("unknownField").is_none(),
        "unknown field not pruned: {spec}"
    );
    ensure!(
        created.data.get("unknownTopLevel").is_none(),
        "unknown top-level field not pruned"
    );
    ensure!(
        spec.pointer("/template/spec/containers/0/custom") == Some(&json!(1)),
        "preserved field pruned: {spec}"
    );
    let err = api_error(
        api.create(
            &PostParams::default(),
            &obj(
                "bad",
                json!({"httpPort": 70000, "key": "", "template": {"spec": {"containers": []}}}),
            )?,
        )
        .await,
        "invalid spec",
    )?;
    ensure!(
        err.code == 422 && err.reason == "Invalid",
        "invalid spec: {err:?}"
    );
    for want in [
        "spec.httpPort: Invalid value: 70000: spec.httpPort in body should be less than or equal to 65535",
        "spec.key: Invalid value: \"\": spec.key in body should be at least 1 chars long",
        "spec.template.spec.containers: Invalid value: 0: spec.template.spec.containers in body should have at least 1 items",
    ] {
        ensure!(
            err.message.contains(want),
            "message lacks {want:?}: {:?}",
            err.message
        );
    }
    let err = api_error(
        api.create(
            &PostParams::default(),
            &obj("missing", json!({"httpPort": "x"}))?,
        )
        .await,
        "missing template",
    )?;
    ensure!(
        err.message.contains("spec.template: Required value"),
        "message {:?}",
        err.message
    );
    ensure!(
        err.message.contains("spec.httpPort: Invalid value: \"string\": spec.httpPort in body must be of type integer: \"string\""),
        "message {:?}",
        err.message
    );
    let status = api
        .patch_status(
            "minimal",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"phase": "Bogus"}})),
        )
        .await;
    let err = api_error(status, "invalid phase")?;
    ensure!(
        err.code == 422
            && err
                .message
                .contains("status.phase: Unsupported value: \"Bogus\""),
        "invalid phase: {err:?}"
    );
    Ok(())
}
