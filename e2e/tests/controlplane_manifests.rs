//! `deploy/` against the real kube-apiserver and the real CLI:
//! - `kubectl kustomize deploy` and `kubectl kustomize deploy/overlays/kind` render, and every
//!   object they render is accepted by a real API server (server-side apply with
//!   `dryRun=All`, so schema, defaulting and validation run but nothing is stored; only the
//!   Namespaces are created, since namespaced dry-runs need them);
//! - every workload runs a real `spawner` subcommand, and its arguments and environment
//!   variables are ones that subcommand declares, with values it parses (so a renamed flag or
//!   a typo in an env var name fails here, not in a cluster);
//! - the controller injects the image it runs itself as the sidecar, and every secret key a
//!   workload reads exists in the rendered Secret.
//!
//! Needs `kubectl` (for kustomize) and the control plane of `docs/controlplane.md`. Without
//! kubectl the test prints one line and passes unless `SPAWNER_REQUIRE_KUBECTL=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::Value;
use spawner_e2e::controlplane::ControlPlane;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e is inside the workspace")
        .to_path_buf()
}

/// `kubectl kustomize <dir>` as parsed documents; `None` when kubectl is not installed.
fn kustomize(dir: &str) -> Option<Vec<Value>> {
    let output = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("SPAWNER_REQUIRE_KUBECTL").as_deref() == Ok("1") {
                panic!("kubectl is required (SPAWNER_REQUIRE_KUBECTL=1) but not installed");
            }
            return None;
        }
        Err(e) => panic!("running kubectl kustomize {dir}: {e}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(documents(&String::from_utf8_lossy(&output.stdout)))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML parses"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn describe(object: &Value) -> String {
    format!("{}/{}", kind_of(object), name_of(object))
}

/// Applies `objects` to the real API server: Namespaces for real, everything else as a
/// server-side dry run. Returns the failures, one line each.
async fn dry_run_apply(client: &kube::Client, objects: &[Value]) -> Vec<String> {
    let mut failures = Vec::new();
    let (namespaces, rest): (Vec<&Value>, Vec<&Value>) =
        objects.iter().partition(|o| kind_of(o) == "Namespace");
    for object in namespaces.into_iter().chain(rest) {
        let dry_run = kind_of(object) != "Namespace";
        let dynamic: DynamicObject = match serde_json::from_value(object.clone()) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{}: not an object: {e}", describe(object)));
                continue;
            }
        };
        let Some(types) = dynamic.types.clone() else {
            failures.push(format!("{}: no apiVersion/kind", describe(object)));
            continue;
        };
        let gvk = GroupVersionKind::try_from(&types).expect("apiVersion parses");
        let (resource, capabilities) = match kube::discovery::pinned_kind(client, &gvk).await {
            Ok(found) => found,
            Err(e) => {
                failures.push(format!("{}: kind not served: {e}", describe(object)));
                continue;
            }
        };
        let api: Api<DynamicObject> = if capabilities.scope == Scope::Namespaced {
            let Some(namespace) = dynamic.metadata.namespace.as_deref() else {
                failures.push(format!(
                    "{}: namespaced but has no namespace (kubectl apply would put it in the \
                     user's current namespace)",
                    describe(object)
                ));
                continue;
            };
            Api::namespaced_with(client.clone(), namespace, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        let mut params = PatchParams::apply("spawner-e2e-manifests").force();
        params.dry_run = dry_run;
        if let Err(e) = api
            .patch(name_of(object), &params, &Patch::Apply(&dynamic))
            .await
        {
            failures.push(format!("{}: rejected: {e}", describe(object)));
        }
    }
    failures
}

/// The pod template's containers of a workload.
fn containers(object: &Value) -> &[Value] {
    object["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn workloads(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| matches!(kind_of(o), "Deployment" | "DaemonSet"))
        .collect()
}

/// Checks that `container` runs a `spawner` subcommand with arguments and environment the CLI
/// declares and parses. Returns problems, one line each.
fn check_command_line(workload: &str, container: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let args: Vec<String> = container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let Some(subcommand) = args.first() else {
        return vec![format!(
            "{workload}: the container has no args (no subcommand)"
        )];
    };
    let cli = spawner::Cli::command();
    let Some(sub) = cli.find_subcommand(subcommand) else {
        return vec![format!("{workload}: `spawner {subcommand}` does not exist")];
    };
    // Every env var the subcommand reads, mapped to its flag.
    let by_env: BTreeMap<String, &clap::Arg> = sub
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_string_lossy().into_owned(), a)))
        .collect();
    let mut argv: Vec<String> = vec!["spawner".into()];
    argv.extend(args.iter().cloned());
    for env in container["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = env["name"].as_str().unwrap_or_default();
        if name == "RUST_LOG" {
            continue; // read by tracing's filter, not by clap
        }
        let Some(arg) = by_env.get(name) else {
            problems.push(format!(
                "{workload}: env {name} is not read by `spawner {subcommand}`"
            ));
            continue;
        };
        let Some(long) = arg.get_long() else {
            continue;
        };
        // Values from the downward API or a Secret are only known in the pod: a placeholder
        // of the right kind stands in.
        let value = match env["value"].as_str() {
            Some(v) => v.to_string(),
            None => "from-the-pod".to_string(),
        };
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}"));
            argv.push(value);
        } else if value == "true" {
            argv.push(format!("--{long}"));
        }
    }
    if let Err(e) = <spawner::Cli as clap::Parser>::try_parse_from(&argv) {
        problems.push(format!("{workload}: {argv:?} does not parse: {e}"));
    }
    problems
}

/// Checks that do not need an API server: command lines, sidecar image, secret keys.
fn check_rendered(which: &str, objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let secrets: BTreeMap<&str, &Value> = objects
        .iter()
        .filter(|o| kind_of(o) == "Secret")
        .map(|o| (name_of(o), o))
        .collect();
    let workloads = workloads(objects);
    for kind_name in [
        "Deployment/spawner-controller",
        "Deployment/spawner-api",
        "DaemonSet/spawner-sweeper",
    ] {
        if !workloads.iter().any(|w| describe(w) == kind_name) {
            problems.push(format!("{which}: no {kind_name}"));
        }
    }
    for workload in &workloads {
        let label = format!("{which}: {}", describe(workload));
        for container in containers(workload) {
            problems.extend(check_command_line(&label, container));
            for env in container["env"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let reference = &env["valueFrom"]["secretKeyRef"];
                if reference.is_null() {
                    continue;
                }
                let (secret, key) = (
                    reference["name"].as_str().unwrap_or_default(),
                    reference["key"].as_str().unwrap_or_default(),
                );
                let has_key = secrets
                    .get(secret)
                    .is_some_and(|s| !s["data"][key].is_null() || !s["stringData"][key].is_null());
                if !has_key {
                    problems.push(format!(
                        "{label}: reads {secret}/{key}, which is not rendered"
                    ));
                }
            }
        }
    }
    let controller = workloads
        .iter()
        .find(|w| describe(w) == "Deployment/spawner-controller");
    if let Some(container) = controller.and_then(|c| containers(c).first()) {
        let image = container["image"].as_str();
        let sidecar = container["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "SPAWNER_SIDECAR_IMAGE"))
            .and_then(|e| e["value"].as_str());
        if image.is_none() || image != sidecar {
            problems.push(format!(
                "{which}: the controller runs {image:?} but injects sidecar image {sidecar:?}"
            ));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_manifests_are_accepted_by_a_real_api_server() {
    let test = "rendered_manifests_are_accepted_by_a_real_api_server";
    let Some(base) = kustomize("deploy") else {
        eprintln!("skipping {test}: kubectl is not installed (needed for kustomize)");
        return;
    };
    let Some(mut kind) = kustomize("deploy/overlays/kind") else {
        return;
    };
    // The overlay builds on deploy/base; scripts/e2e-kind.sh applies the CRD first.
    kind.extend(documents(spawner_e2e::controlplane::CRD_YAML));

    let mut problems = check_rendered("deploy", &base);
    problems.extend(check_rendered("deploy/overlays/kind", &kind));
    assert!(
        base.iter()
            .any(|o| kind_of(o) == "CustomResourceDefinition"),
        "deploy renders no CRD"
    );
    // The base ships placeholders that must be replaced; the kind overlay replaces them.
    let placeholder = |objects: &[Value]| {
        objects
            .iter()
            .filter(|o| kind_of(o) == "Secret")
            .any(|s| s.to_string().contains("Q0hBTkdFLU1F")) // base64("CHANGE-ME")
    };
    assert!(
        placeholder(&base),
        "the base's secrets are not the documented CHANGE-ME"
    );
    assert!(
        !placeholder(&kind),
        "the kind overlay keeps a CHANGE-ME secret"
    );

    let Some(cp) = ControlPlane::shared_or_skip(test).await else {
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        return;
    };
    let admin = cp.admin_client().await.expect("admin client");
    problems.extend(
        dry_run_apply(&admin, &base)
            .await
            .into_iter()
            .map(|p| format!("deploy: {p}")),
    );
    problems.extend(
        dry_run_apply(&admin, &kind)
            .await
            .into_iter()
            .map(|p| format!("deploy/overlays/kind: {p}")),
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_misspelt_env_var_is_caught() {
    // The check above must be able to fail: a container with a typo in an env var name and
    // one with an unparsable value.
    let typo: Value = serde_json::json!({
        "args": ["controller"],
        "env": [{"name": "SPAWNER_EVENT_SECRET", "value": "x"}]
    });
    let problems = check_command_line("typo", &typo);
    assert!(
        problems.iter().any(|p| p.contains("SPAWNER_EVENT_SECRET")),
        "{problems:?}"
    );
    let bad_value: Value = serde_json::json!({
        "args": ["controller"],
        "env": [
            {"name": "SPAWNER_EVENTS_SECRET", "value": "x"},
            {"name": "SPAWNER_URL_MODE", "value": "nodeport"}
        ]
    });
    let problems = check_command_line("bad value", &bad_value);
    assert!(
        problems.iter().any(|p| p.contains("does not parse")),
        "{problems:?}"
    );
    let no_subcommand: Value = serde_json::json!({ "args": ["controler"] });
    assert!(!check_command_line("x", &no_subcommand).is_empty());
}

#[test]
fn kind_config_maps_the_api_node_port() {
    // scripts/e2e-kind.sh and the kind scenarios reach the api at 127.0.0.1:<nodePort>: the
    // overlay's NodePort must be one kind-config.yaml maps to the host, on the same port.
    let Some(kind) = kustomize("deploy/overlays/kind") else {
        eprintln!("skipping kind_config_maps_the_api_node_port: kubectl is not installed");
        return;
    };
    let service = kind
        .iter()
        .find(|o| kind_of(o) == "Service" && name_of(o) == "spawner-api")
        .expect("the overlay renders the api Service");
    assert_eq!(service["spec"]["type"], "NodePort");
    let node_port = service["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("the api Service has a nodePort");
    let config: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("kind-config.yaml")).expect("kind-config.yaml"),
    )
    .expect("kind-config.yaml parses");
    let mapped = config["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .flat_map(|n| {
            n["extraPortMappings"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .any(|m| {
            m["containerPort"].as_u64() == Some(node_port) && m["hostPort"] == m["containerPort"]
        });
    assert!(
        mapped,
        "kind-config.yaml maps no host port to NodePort {node_port}"
    );
}
