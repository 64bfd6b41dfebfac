//! The OpenAPI 3.1 document of the api, served at `/openapi.json` and kept in
//! `docs/openapi.json` (a test fails when they drift). Schemas come from the Rust types, so
//! the document cannot disagree with what the handlers parse and answer.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

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

/// The document.
pub fn document() -> Value {
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
    // What the handlers require beyond the types: an image or a command (`to_spec`), and a key
    // for /connect. Said here so that a schema-valid request is one the api accepts.
    if let Some(spawn) = schemas
        .get_mut("SpawnRequest")
        .and_then(Value::as_object_mut)
    {
        // Present and not null: `"image": null` is absent to the api.
        spawn.insert(
            "anyOf".into(),
            json!([
                { "required": ["image"], "properties": { "image": { "type": "string" } } },
                { "required": ["command"], "properties": { "command": { "type": "array" } } }
            ]),
        );
    }
    schemas.insert(
        "ConnectRequest".into(),
        json!({
            "description": "A SpawnRequest with its `key`, which /connect requires.",
            "allOf": [schema_ref("SpawnRequest"), { "required": ["key"] }]
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
                        "text/event-stream": { "schema": schema_ref("PhaseEvent") }
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

    /// The constraints the handlers check are in the document: schemathesis found
    /// schema-valid requests the api refused (no image nor command; /connect without a key).
    #[test]
    fn an_image_or_a_command_and_the_connect_key_are_required() {
        let doc = document();
        let spawn = &doc["components"]["schemas"]["SpawnRequest"];
        assert_eq!(spawn["anyOf"][0]["required"], json!(["image"]));
        assert_eq!(spawn["anyOf"][0]["properties"]["image"]["type"], "string");
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
                .contains(&json!({ "required": ["key"] }))
        );
    }
}
