//! Validation of a backend's spec, shared by the api (to answer 422 with field paths) and the
//! controller (to fail a backend that was created around the api).

use serde::Serialize;

use crate::children::SIDECAR_CONTAINER_NAME;
use crate::resource::SessionLivedBackendSpec;

/// Bounds an operator may tighten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_grace_period_seconds: u32,
    pub max_lifetime_seconds: u32,
    /// Largest spec accepted, as serialized JSON.
    pub max_spec_bytes: usize,
    pub max_containers: usize,
    pub max_env_vars: usize,
    pub max_key_len: usize,
    /// Ports the application may not use, because the sidecar listens there.
    pub reserved_ports: Vec<u16>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_grace_period_seconds: 24 * 60 * 60,
            max_lifetime_seconds: 30 * 24 * 60 * 60,
            max_spec_bytes: 256 * 1024,
            max_containers: 16,
            max_env_vars: 256,
            max_key_len: 253,
            reserved_ports: vec![crate::children::DEFAULT_SIDECAR_PORT],
        }
    }
}

/// One problem, with the path of the field it concerns (as in `spec.template.spec.containers[0].image`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("invalid backend spec: {}", summary(.errors))]
pub struct ValidationErrors {
    pub errors: Vec<FieldError>,
}

fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

struct Collector(Vec<FieldError>);

impl Collector {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Checks `spec` against `limits`; all problems are reported at once.
pub fn validate_spec(
    spec: &SessionLivedBackendSpec,
    limits: &Limits,
) -> Result<(), ValidationErrors> {
    let mut errors = Collector(Vec::new());

    if spec.http_port == 0 {
        errors.push("spec.httpPort", "must be between 1 and 65535");
    } else if limits.reserved_ports.contains(&spec.http_port) {
        errors.push(
            "spec.httpPort",
            format!("port {} is reserved for the sidecar", spec.http_port),
        );
    }
    if spec.grace_period_seconds == 0 || spec.grace_period_seconds > limits.max_grace_period_seconds
    {
        errors.push(
            "spec.gracePeriodSeconds",
            format!("must be between 1 and {}", limits.max_grace_period_seconds),
        );
    }
    if let Some(lifetime) = spec.max_lifetime_seconds
        && (lifetime == 0 || lifetime > limits.max_lifetime_seconds)
    {
        errors.push(
            "spec.maxLifetimeSeconds",
            format!("must be between 1 and {}", limits.max_lifetime_seconds),
        );
    }
    if let Some(key) = &spec.key {
        // Characters, as the message (and the api's document) says, not bytes.
        if key.is_empty() || key.chars().count() > limits.max_key_len {
            errors.push(
                "spec.key",
                format!("must be 1 to {} characters", limits.max_key_len),
            );
        } else if key.chars().any(char::is_control) {
            errors.push("spec.key", "must not contain control characters");
        }
    }

    match &spec.template.spec {
        None => errors.push("spec.template.spec", "is required"),
        Some(pod) => {
            if pod.containers.is_empty() {
                errors.push(
                    "spec.template.spec.containers",
                    "must have at least one container (the first is the application)",
                );
            }
            if pod.containers.len() > limits.max_containers {
                errors.push(
                    "spec.template.spec.containers",
                    format!("must have at most {} containers", limits.max_containers),
                );
            }
            for (i, container) in pod.containers.iter().enumerate() {
                let path = format!("spec.template.spec.containers[{i}]");
                if !is_dns1123_label(&container.name) {
                    errors.push(
                        format!("{path}.name"),
                        "must be a DNS-1123 label: at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
                    );
                } else if container.name == SIDECAR_CONTAINER_NAME {
                    errors.push(
                        format!("{path}.name"),
                        format!("{SIDECAR_CONTAINER_NAME:?} is reserved for the injected sidecar"),
                    );
                }
                let has_image = container
                    .image
                    .as_deref()
                    .is_some_and(|s| !s.trim().is_empty());
                let has_command = container.command.as_ref().is_some_and(|c| !c.is_empty());
                if !has_image && !has_command {
                    errors.push(format!("{path}.image"), "an image or a command is required");
                }
                let env = container.env.as_deref().unwrap_or_default();
                if env.len() > limits.max_env_vars {
                    errors.push(
                        format!("{path}.env"),
                        format!("must have at most {} variables", limits.max_env_vars),
                    );
                }
                for (j, var) in env.iter().enumerate() {
                    if !is_env_var_name(&var.name) {
                        errors.push(
                            format!("{path}.env[{j}].name"),
                            "must consist of letters, digits, '_', '-' or '.', and not start with a digit",
                        );
                    } else if i == 0 && var.name == "PORT" {
                        errors.push(
                            format!("{path}.env[{j}].name"),
                            "PORT is set from spec.httpPort",
                        );
                    }
                }
            }
        }
    }

    match serde_json::to_vec(spec) {
        Ok(bytes) if bytes.len() > limits.max_spec_bytes => errors.push(
            "spec",
            format!(
                "is {} bytes; at most {} are accepted",
                bytes.len(),
                limits.max_spec_bytes
            ),
        ),
        Ok(_) => {}
        Err(e) => errors.push("spec", format!("cannot be serialized: {e}")),
    }

    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors { errors: errors.0 })
    }
}

/// Checks a backend's own name (`metadata.name`): it also names its Pod and Service, and a
/// Service name must be a DNS-1035 label.
pub fn validate_backend_name(name: &str) -> Result<(), FieldError> {
    if is_dns1035_label(name) {
        Ok(())
    } else {
        Err(FieldError {
            field: "metadata.name".into(),
            message: "must be a DNS-1035 label: at most 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit".into(),
        })
    }
}

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1035 label: a DNS-1123 label that starts with a letter.
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// Environment variable names as Kubernetes accepts them: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn is_env_var_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(c) if c.is_ascii_alphabetic() || matches!(c, b'_' | b'-' | b'.') => {}
        _ => return false,
    }
    bytes.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(json: serde_json::Value) -> SessionLivedBackendSpec {
        serde_json::from_value(json).expect("spec parses")
    }

    fn valid() -> SessionLivedBackendSpec {
        spec(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "ghcr.io/acme/room:1"}]}},
            "gracePeriodSeconds": 30
        }))
    }

    fn fields(result: Result<(), ValidationErrors>) -> Vec<String> {
        result
            .expect_err("invalid")
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        assert_eq!(validate_spec(&valid(), &Limits::default()), Ok(()));
    }

    /// The key's limit is in characters (as the CRD's `maxLength` and the api's document
    /// count), not bytes: 253 three-byte characters are a valid key, 254 are not.
    #[test]
    fn the_key_limit_counts_characters() {
        let mut spec = valid();
        spec.key = Some("€".repeat(253));
        assert_eq!(validate_spec(&spec, &Limits::default()), Ok(()));
        spec.key = Some("€".repeat(254));
        assert_eq!(
            fields(validate_spec(&spec, &Limits::default())),
            ["spec.key"]
        );
    }

    #[test]
    fn command_without_image_is_valid() {
        let s = spec(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "command": ["python3", "-m", "http.server"]}]}}
        }));
        assert_eq!(validate_spec(&s, &Limits::default()), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let s = spec(serde_json::json!({
            "template": {"spec": {"containers": [
                {"name": "App", "env": [{"name": "1BAD", "value": "x"}, {"name": "PORT", "value": "1"}]},
                {"name": "spawner-sidecar", "image": "x"}
            ]}},
            "httpPort": 0,
            "gracePeriodSeconds": 0,
            "maxLifetimeSeconds": 0,
            "key": ""
        }));
        assert_eq!(
            fields(validate_spec(&s, &Limits::default())),
            [
                "spec.httpPort",
                "spec.gracePeriodSeconds",
                "spec.maxLifetimeSeconds",
                "spec.key",
                "spec.template.spec.containers[0].name",
                "spec.template.spec.containers[0].image",
                "spec.template.spec.containers[0].env[0].name",
                "spec.template.spec.containers[0].env[1].name",
                "spec.template.spec.containers[1].name",
            ]
        );
    }

    #[test]
    fn missing_containers_and_reserved_port_are_refused() {
        let s = spec(serde_json::json!({
            "template": {"spec": {"containers": []}},
            "httpPort": crate::children::DEFAULT_SIDECAR_PORT
        }));
        assert_eq!(
            fields(validate_spec(&s, &Limits::default())),
            ["spec.httpPort", "spec.template.spec.containers"]
        );
        let s = spec(serde_json::json!({"template": {}}));
        assert_eq!(
            fields(validate_spec(&s, &Limits::default())),
            ["spec.template.spec"]
        );
    }

    #[test]
    fn oversized_specs_are_refused() {
        let mut s = valid();
        let big = "x".repeat(300 * 1024);
        s.template.spec.as_mut().expect("pod spec").containers[0].args = Some(vec![big]);
        assert_eq!(fields(validate_spec(&s, &Limits::default())), ["spec"]);
    }

    #[test]
    fn limits_are_configurable() {
        let limits = Limits {
            max_grace_period_seconds: 10,
            ..Limits::default()
        };
        assert_eq!(
            fields(validate_spec(&valid(), &limits)),
            ["spec.gracePeriodSeconds"]
        );
    }

    #[test]
    fn names() {
        assert!(is_dns1123_label("a-1"));
        assert!(is_dns1123_label("1a"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("a-"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(!is_dns1035_label("1a"));
        assert!(validate_backend_name("slab-abc").is_ok());
        assert!(validate_backend_name("slab_abc").is_err());
        assert!(is_env_var_name("_A.b-c1"));
        assert!(!is_env_var_name("A=B"));
        assert!(!is_env_var_name(""));
    }

    proptest! {
        #[test]
        fn grace_bounds_are_exact(grace in any::<u32>()) {
            let mut s = valid();
            s.grace_period_seconds = grace;
            let limits = Limits::default();
            let ok = (1..=limits.max_grace_period_seconds).contains(&grace);
            prop_assert_eq!(validate_spec(&s, &limits).is_ok(), ok);
        }

        #[test]
        fn port_bounds_are_exact(port in any::<u16>()) {
            let mut s = valid();
            s.http_port = port;
            let limits = Limits::default();
            let ok = port != 0 && !limits.reserved_ports.contains(&port);
            prop_assert_eq!(validate_spec(&s, &limits).is_ok(), ok);
        }

        #[test]
        fn dns_label_check_matches_its_regex(s in "[a-z0-9-]{0,70}") {
            let expected = !s.is_empty() && s.len() <= 63 && !s.starts_with('-') && !s.ends_with('-');
            prop_assert_eq!(is_dns1123_label(&s), expected);
        }

        #[test]
        fn validation_never_panics_on_arbitrary_names(name in ".{0,80}", env in ".{0,20}") {
            let mut s = valid();
            let c = &mut s.template.spec.as_mut().expect("pod spec").containers[0];
            c.name = name;
            c.env = Some(vec![k8s_openapi::api::core::v1::EnvVar { name: env, ..Default::default() }]);
            let _ = validate_spec(&s, &Limits::default());
        }
    }
}
