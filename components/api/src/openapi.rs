//! The OpenAPI 3.1 document of the api, served at `/openapi.json` and kept in
//! `docs/openapi.json` (a test fails when they drift). Schemas come from the Rust types, so
//! the document cannot disagree with what the handlers parse and answer.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};
use spawner_core::connect_token::MAX_USER_LEN;
use spawner_core::validation::Limits;

use crate::error::ErrorBody;
use crate::model::{
    BackendList, BackendStatus, PhaseEvent, SpawnRequest, SpawnResponse, TerminateResponse,
};

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_content(name: &str) -> Value {
    json!({ "application/json": { "schema": schema_ref(name) } })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": json_content("ErrorBody") })
}

/// Rust's `char::is_whitespace`, as a JSON Schema character class body.
const WHITESPACE: &str =
    r"\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
/// Rust's `char::is_control` (Unicode category Cc), likewise.
const CONTROL: &str = r"\u0000-\u001f\u007f-\u009f";
/// A DNS-1123 label.
const DNS_LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";
/// A label value, or a label key's name part when not empty.
const LABEL_NAME: &str = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?";

/// Sets the constraints `SpawnRequest::to_spec` checks on the generated schema of `property`,
/// so that a request the document allows is one the api accepts (and the other way round).
fn constrain(spawn: &mut Value, property: &str, constraints: Value) {
    if let (Some(schema), Value::Object(constraints)) =
        (spawn["properties"][property].as_object_mut(), constraints)
    {
        schema.extend(constraints);
    }
}

fn constrain_spawn_request(spawn: &mut Value, limits: &Limits) {
    let mut reserved = limits.reserved_ports.clone();
    reserved.sort_unstable();
    constrain(
        spawn,
        "port",
        json!({ "minimum": 1, "maximum": 65535, "not": { "enum": reserved } }),
    );
    constrain(
        spawn,
        "gracePeriodSeconds",
        json!({ "minimum": 1, "maximum": limits.max_grace_period_seconds }),
    );
    constrain(
        spawn,
        "maxLifetimeSeconds",
        json!({ "minimum": 1, "maximum": limits.max_lifetime_seconds }),
    );
    constrain(
        spawn,
        "key",
        json!({ "minLength": 1, "maxLength": limits.max_key_len, "pattern": format!("^[^{CONTROL}]*$") }),
    );
    constrain(
        spawn,
        "user",
        json!({ "minLength": 1, "maxLength": MAX_USER_LEN, "pattern": "^[ -~]*$" }),
    );
    constrain(
        spawn,
        "env",
        json!({
            "maxProperties": limits.max_env_vars,
            "propertyNames": {
                "pattern": "^[A-Za-z_.-][A-Za-z0-9_.-]*$",
                "not": { "const": "PORT" }
            }
        }),
    );
    let prefix = format!("{DNS_LABEL}(\\.{DNS_LABEL})*");
    constrain(
        spawn,
        "labels",
        json!({
            "propertyNames": {
                "pattern": format!("^({prefix}/)?{LABEL_NAME}$"),
                "maxLength": 253 + 1 + 63,
                "not": { "pattern": "^(.*\\.)?spawner\\.dev/" }
            },
            "additionalProperties": { "type": "string", "pattern": format!("^({LABEL_NAME})?$") }
        }),
    );
    // An image that is not only whitespace, or a command of at least one word. `"image": null`
    // is absent to the api.
    spawn["anyOf"] = json!([
        { "required": ["image"],
          "properties": { "image": { "type": "string", "pattern": format!("[^{WHITESPACE}]") } } },
        { "required": ["command"],
          "properties": { "command": { "type": "array", "minItems": 1 } } }
    ]);
}

/// The document, with the default limits (`docs/openapi.json`).
pub fn document() -> Value {
    document_with(&Limits::default())
}

/// The document of an api that applies `limits`.
pub fn document_with(limits: &Limits) -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    // Registering each type puts it (and what it uses) under components/schemas.
    let _ = generator.subschema_for::<SpawnRequest>();
    let _ = generator.subschema_for::<SpawnResponse>();
    let _ = generator.subschema_for::<BackendStatus>();
    let _ = generator.subschema_for::<BackendList>();
    let _ = generator.subschema_for::<TerminateResponse>();
    let _ = generator.subschema_for::<PhaseEvent>();
    let _ = generator.subschema_for::<ErrorBody>();
    let mut schemas = generator.take_definitions(true);
    // What the handlers require beyond the types, so that a schema-valid request is one the
    // api accepts.
    if let Some(spawn) = schemas.get_mut("SpawnRequest") {
        constrain_spawn_request(spawn, limits);
    }
    schemas.insert(
        "ConnectRequest".into(),
        json!({
            "description": "A SpawnRequest with its `key`, which /connect requires.",
            "allOf": [
                schema_ref("SpawnRequest"),
                { "required": ["key"], "properties": { "key": { "type": "string" } } }
            ]
        }),
    );

    let auth = json!([{ "bearer": [] }]);
    let id_param = json!({
        "name": "id", "in": "path", "required": true,
        "description": "The backend's name, as returned by /spawn or /connect.",
        "schema": { "type": "string" }
    });
    let bad_request = error_response(
        "Malformed JSON (`malformed_json`), or a wrong type, missing or unknown field (`invalid_request`, with the field's path).",
    );
    let unauthorized =
        error_response("Missing, malformed or unknown bearer token (`unauthorized`).");
    let not_found = error_response("No such backend (`not_found`).");
    let too_large = error_response("The body is over the configured limit (`payload_too_large`).");
    let invalid = error_response(
        "The request is well-formed but invalid (`validation_failed`, every field problem listed), or the backend store refused it (`rejected`).",
    );
    let unavailable =
        error_response("The Kubernetes API failed or is throttling (`unavailable`); try again.");
    // Open API 3.1 has the schema of an event stream describe one event: its fields as strings,
    // `data` a JSON document (contentSchema).
    let stream_event = json!({
        "description": "One event of the stream.",
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": { "const": crate::stream::PHASE_EVENT },
                    "id": { "$ref": "#/components/schemas/Phase" },
                    "data": { "type": "string", "contentMediaType": "application/json",
                              "contentSchema": schema_ref("PhaseEvent") }
                }
            },
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": { "const": crate::stream::DELETED_EVENT },
                    "data": { "type": "string", "contentMediaType": "application/json",
                              "contentSchema": {
                                  "type": "object", "required": ["name"],
                                  "properties": { "name": { "type": "string" } }
                              } }
                }
            }
        ]
    });
    let spawn_body = json!({ "required": true, "content": json_content("SpawnRequest") });
    let connect_body = json!({ "required": true, "content": json_content("ConnectRequest") });
    // The answer names the backend: the operations on it take that name (OpenAPI links, which
    // stateful testers such as schemathesis follow to reach real backends).
    let backend_links = json!({
        "status": { "operationId": "status", "parameters": { "id": "$response.body#/name" } },
        "statusStream": { "operationId": "statusStream", "parameters": { "id": "$response.body#/name" } },
        "ready": { "operationId": "ready", "parameters": { "id": "$response.body#/name" } },
        "terminate": { "operationId": "terminate", "parameters": { "id": "$response.body#/name" } }
    });
    let spawn_responses = |created: &str, ok: &str| {
        json!({
            "201": { "description": created, "content": json_content("SpawnResponse"), "links": backend_links },
            "200": { "description": ok, "content": json_content("SpawnResponse"), "links": backend_links },
            "400": bad_request, "401": unauthorized, "413": too_large,
            "422": invalid, "503": unavailable
        })
    };

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Spawner API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Spawn, find, watch and terminate session-lived backends. See docs/api.md."
        },
        "paths": {
            "/spawn": { "post": {
                "operationId": "spawn",
                "summary": "Start a new backend (with `key`: get-or-create, as /connect).",
                "security": auth,
                "requestBody": spawn_body,
                "responses": spawn_responses(
                    "A backend was created.",
                    "`key` was given and a live backend for it exists."
                )
            }},
            "/connect": { "post": {
                "operationId": "connect",
                "summary": "The live backend of `key`, created when there is none.",
                "security": auth,
                "requestBody": connect_body,
                "responses": spawn_responses(
                    "No live backend had the key; this call created one (`spawned: true`).",
                    "The key's live backend (`spawned: false`)."
                )
            }},
            "/backends": { "get": {
                "operationId": "listBackends",
                "summary": "List backends, optionally of one key or matching a label selector.",
                "security": auth,
                "parameters": [
                    { "name": "key", "in": "query", "required": false, "schema": { "type": "string" } },
                    { "name": "labelSelector", "in": "query", "required": false,
                      "description": "Kubernetes label selector, e.g. `team=a,tier!=x`.",
                      "schema": { "type": "string" } }
                ],
                "responses": {
                    "200": { "description": "The backends.", "content": json_content("BackendList") },
                    "400": error_response("Unknown query parameter or invalid label selector (`invalid_request`)."),
                    "401": unauthorized, "503": unavailable
                }
            }},
            "/backend/{id}": { "delete": {
                "operationId": "terminate",
                "summary": "Terminate a backend. Recorded at once (also while it is starting); the controller stops it. Idempotent.",
                "security": auth,
                "parameters": [id_param],
                "responses": {
                    "202": { "description": "The terminate request is recorded.", "content": json_content("TerminateResponse") },
                    "401": unauthorized, "404": not_found, "503": unavailable
                }
            }},
            "/backend/{id}/status": { "get": {
                "operationId": "status",
                "summary": "A backend's phase, node, URL, failure reason, exit code and conditions.",
                "parameters": [id_param],
                "responses": {
                    "200": { "description": "The status.", "content": json_content("BackendStatus") },
                    "404": not_found, "503": unavailable
                }
            }},
            "/backend/{id}/status/stream": { "get": {
                "operationId": "statusStream",
                "summary": "Server-Sent Events of phase transitions: the history, then live; ends after a terminal phase.",
                "description": "Each event is `event: phase`, `id: <phase>`, `data: PhaseEvent` (JSON). Send `Last-Event-ID: <phase>` to resume after that phase. An event `deleted` ends the stream when the backend disappears without a terminal phase. Comment lines (`:heartbeat`) are sent between events.",
                "parameters": [
                    id_param,
                    { "name": "Last-Event-ID", "in": "header", "required": false, "schema": { "type": "string" } }
                ],
                "responses": {
                    "200": { "description": "The event stream.", "content": {
                        "text/event-stream": { "schema": stream_event }
                    }},
                    "404": not_found,
                    "503": error_response("The Kubernetes API failed (`unavailable`), or `--max-status-streams` streams are open (`too_many_streams`); try again.")
                }
            }},
            "/backend/{id}/ready": { "get": {
                "operationId": "ready",
                "summary": "302 to the backend's URL when it is Ready; 409 with its phase otherwise.",
                "parameters": [id_param],
                "responses": {
                    "302": { "description": "Ready: `Location` is the backend's URL.",
                             "headers": { "Location": { "schema": { "type": "string" } } } },
                    "404": not_found,
                    "409": error_response("Not Ready (`not_ready`); `phase` and `name` are in the body."),
                    "503": unavailable
                }
            }},
            "/openapi.json": { "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": { "200": { "description": "OpenAPI 3.1 document.",
                                        "content": { "application/json": {} } } }
            }},
            "/healthz": { "get": {
                "operationId": "healthz",
                "summary": "Liveness of the api process.",
                "responses": { "200": { "description": "`ok`",
                                        "content": { "text/plain": {} } } }
            }}
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is what clients read; it must be exactly what the api serves.
    /// Regenerate with `SPAWNER_BLESS_OPENAPI=1 cargo test -p spawner-api openapi`.
    #[test]
    fn docs_copy_matches_the_served_document() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let served = serde_json::to_string_pretty(&document()).expect("serializes") + "\n";
        if std::env::var_os("SPAWNER_BLESS_OPENAPI").is_some() {
            std::fs::write(path, &served).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(path).expect("docs/openapi.json exists");
        assert!(
            committed == served,
            "docs/openapi.json differs from the served document; run SPAWNER_BLESS_OPENAPI=1 cargo test -p spawner-api openapi"
        );
    }

    #[test]
    fn every_reference_resolves_and_every_route_is_documented() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for name in [
            "SpawnRequest",
            "SpawnResponse",
            "BackendStatus",
            "BackendList",
            "TerminateResponse",
            "PhaseEvent",
            "ErrorBody",
            "Phase",
            "ConnectRequest",
        ] {
            assert!(schemas.contains_key(name), "{name}");
        }
        let mut rest = text.as_str();
        while let Some(at) = rest.find("#/components/schemas/") {
            rest = &rest[at + "#/components/schemas/".len()..];
            let name: String = rest.chars().take_while(|c| *c != '"').collect();
            assert!(schemas.contains_key(&name), "dangling $ref {name}");
        }
        let paths = doc["paths"].as_object().expect("paths");
        for path in [
            "/spawn",
            "/connect",
            "/backends",
            "/backend/{id}",
            "/backend/{id}/status",
            "/backend/{id}/status/stream",
            "/backend/{id}/ready",
            "/openapi.json",
            "/healthz",
        ] {
            assert!(paths.contains_key(path), "{path}");
        }
    }

    fn connect_key_type(doc: &Value) -> Value {
        doc["components"]["schemas"]["ConnectRequest"]["allOf"][1]["properties"]["key"]["type"]
            .clone()
    }

    fn matches(schema: &Value, text: &str) -> bool {
        let pattern = schema["pattern"].as_str().expect("a pattern");
        regex::Regex::new(pattern).expect("pattern").is_match(text)
    }

    /// Each pattern of the document accepts exactly what the handlers accept (schemathesis
    /// found a `user`, an empty `command` and label keys the document allowed and the api
    /// refused; its negative tests fail on the other way round).
    #[test]
    fn the_patterns_agree_with_the_handlers() {
        use crate::naming::{is_label_key, is_label_value, is_reserved_label_key};
        let doc = document();
        let spawn = &doc["components"]["schemas"]["SpawnRequest"];
        let props = &spawn["properties"];
        let long = "a".repeat(64);
        let samples = [
            "",
            "a",
            "A",
            "0",
            "-a",
            "a-",
            "a.b",
            "a_b",
            "a b",
            "a/b",
            "a/b/c",
            "/a",
            "a/",
            "example.com/x",
            "Example.com/x",
            "ex_ample.com/x",
            "a..b/x",
            "spawner.dev/key",
            "x.spawner.dev/k",
            "notspawner.dev/k",
            "PORT",
            "1BAD",
            "_OK",
            ".ok",
            "é",
            "a\u{7}",
            "tab\there",
            " ",
            "~",
            "\u{7f}",
            "\u{85}",
            "\u{3000}",
            "x\u{3000}",
            &long,
        ];
        let label_key = &props["labels"]["propertyNames"];
        let label_value = &props["labels"]["additionalProperties"];
        let env_name = &props["env"]["propertyNames"];
        let user = &props["user"];
        let key = &props["key"];
        let image = &spawn["anyOf"][0]["properties"]["image"];
        let control = |s: &str| s.chars().any(char::is_control);
        for s in samples {
            let reserved = regex::Regex::new(label_key["not"]["pattern"].as_str().expect("not"))
                .expect("pattern")
                .is_match(s);
            assert_eq!(matches(label_key, s), is_label_key(s), "label key {s:?}");
            assert_eq!(
                matches(label_key, s) && !reserved,
                is_label_key(s) && !is_reserved_label_key(s),
                "label key {s:?}"
            );
            assert_eq!(
                matches(label_value, s),
                is_label_value(s),
                "label value {s:?}"
            );
            assert_eq!(
                matches(env_name, s) && s != "PORT",
                spawner_core::validation::is_env_var_name(s) && s != "PORT",
                "env {s:?}"
            );
            assert_eq!(
                matches(user, s) && !s.is_empty(),
                spawner_core::connect_token::is_valid_user(s),
                "user {s:?}"
            );
            assert_eq!(matches(key, s), !control(s), "key {s:?}");
            assert_eq!(matches(image, s), !s.trim().is_empty(), "image {s:?}");
        }
        assert_eq!(env_name["not"]["const"], "PORT");
        assert_eq!(user["maxLength"], 256);
        assert_eq!(key["maxLength"], 253);
        assert_eq!(spawn["anyOf"][1]["properties"]["command"]["minItems"], 1);
    }

    /// The limits the api applies are the document's bounds (u32 fields had none: 2^32 was
    /// schema-valid and refused), and the served document follows the configured limits.
    #[test]
    fn number_bounds_are_the_limits() {
        let limits = Limits {
            max_grace_period_seconds: 60,
            max_lifetime_seconds: 600,
            ..Limits::default()
        };
        let doc = document_with(&limits);
        let props = &doc["components"]["schemas"]["SpawnRequest"]["properties"];
        assert_eq!(props["gracePeriodSeconds"]["minimum"], 1);
        assert_eq!(props["gracePeriodSeconds"]["maximum"], 60);
        assert_eq!(props["maxLifetimeSeconds"]["maximum"], 600);
        assert_eq!(props["port"]["minimum"], 1);
        assert_eq!(props["port"]["maximum"], 65535);
        assert_eq!(
            props["port"]["not"]["enum"],
            json!([spawner_core::children::DEFAULT_SIDECAR_PORT])
        );
        let spec = |grace: u32| {
            crate::model::SpawnRequest {
                image: Some("x".into()),
                grace_period_seconds: Some(grace),
                ..Default::default()
            }
            .to_spec(&limits)
        };
        assert!(spec(60).is_ok());
        assert!(spec(61).is_err());
        assert!(spec(0).is_err());
    }

    /// The stream's events as the api writes them: `phase` with the phase as id and a
    /// PhaseEvent as data, or `deleted` with the name (schemathesis read the old schema, a bare
    /// PhaseEvent, as the shape of the event itself).
    #[test]
    fn the_stream_schema_describes_each_event() {
        let doc = document();
        let event = &doc["paths"]["/backend/{id}/status/stream"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"]["schema"];
        let shapes = event["oneOf"].as_array().expect("oneOf");
        assert_eq!(
            shapes[0]["properties"]["event"]["const"],
            crate::stream::PHASE_EVENT
        );
        assert_eq!(
            shapes[0]["properties"]["data"]["contentSchema"],
            schema_ref("PhaseEvent")
        );
        assert_eq!(
            shapes[1]["properties"]["event"]["const"],
            crate::stream::DELETED_EVENT
        );
    }

    /// The constraints the handlers check are in the document: schemathesis found
    /// schema-valid requests the api refused (no image nor command; /connect without a key).
    #[test]
    fn an_image_or_a_command_and_the_connect_key_are_required() {
        let doc = document();
        let spawn = &doc["components"]["schemas"]["SpawnRequest"];
        assert_eq!(spawn["anyOf"][0]["required"], json!(["image"]));
        assert_eq!(spawn["anyOf"][0]["properties"]["image"]["type"], "string");
        assert_eq!(connect_key_type(&document()), "string");
        assert_eq!(spawn["anyOf"][1]["required"], json!(["command"]));
        assert_eq!(spawn["anyOf"][1]["properties"]["command"]["type"], "array");
        let connect = &doc["paths"]["/connect"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(connect, &schema_ref("ConnectRequest"));
        let connect = &doc["components"]["schemas"]["ConnectRequest"];
        assert!(
            connect["allOf"]
                .as_array()
                .expect("allOf")
                .iter()
                .any(|part| part["required"] == json!(["key"]))
        );
    }
}
