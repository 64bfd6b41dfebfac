//! The api against an in-process localcluster API server, over loopback sockets.

mod support;

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::{Value, json};
use spawner_api::model::TERMINATE_ANNOTATION;
use spawner_core::resource::KEY_LABEL;
use support::{Harness, TOKEN, WAIT, assert_error, condition};

fn name_of(body: &Value) -> String {
    body["name"].as_str().expect("name").to_string()
}

async fn spawn(h: &Harness, body: Value) -> String {
    let (status, body) = h.post("/spawn", body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    name_of(&body)
}

#[tokio::test]
async fn spawn_creates_a_backend_and_answers_its_urls() {
    let h = Harness::start().await;
    let (status, body) = h
        .post(
            "/spawn",
            json!({
                "image": "ghcr.io/acme/room:1",
                "port": 3000,
                "env": {"MODE": "test"},
                "gracePeriodSeconds": 30,
                "maxLifetimeSeconds": 600,
                "labels": {"team": "a"}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = name_of(&body);
    assert!(name.starts_with("slab-"), "{name}");
    assert_eq!(body["spawned"], true);
    assert_eq!(body["phase"], "Submitted");
    // The default template is `{url}`, unknown until the controller writes status.url.
    assert_eq!(body["url"], Value::Null);
    assert_eq!(
        body["readyUrl"],
        format!("{}/backend/{name}/ready", h.base).as_str()
    );
    assert_eq!(
        body["statusUrl"],
        format!("{}/backend/{name}/status", h.base).as_str()
    );

    let backend = h.backends.get(&name).await.expect("backend exists");
    assert_eq!(backend.spec.http_port, 3000);
    assert_eq!(backend.spec.grace_period_seconds, 30);
    assert_eq!(backend.spec.max_lifetime_seconds, Some(600));
    assert_eq!(backend.labels()["team"], "a");
    let app = backend.app_container().expect("app");
    assert_eq!(app.image.as_deref(), Some("ghcr.io/acme/room:1"));
    assert_eq!(app.env.as_ref().expect("env")[0].name, "MODE");

    let (status, body) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "Submitted");
    assert_eq!(body["name"], name.as_str());
    assert_eq!(body["labels"]["team"], "a");

    // A process backend: command and args, no image.
    let (status, body) = h
        .post(
            "/spawn",
            json!({"command": ["python3", "-m", "http.server"], "args": ["8080"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let backend = h.backends.get(&name_of(&body)).await.expect("exists");
    let app = backend.app_container().expect("app");
    assert_eq!(app.image, None);
    assert_eq!(app.command.as_ref().expect("command")[0], "python3");
    assert_eq!(app.args.as_ref().expect("args")[0], "8080");
}

#[tokio::test]
async fn url_template_and_public_base_url_shape_the_answer() {
    let h = Harness::start_with(|c| {
        c.url_template = spawner_api::naming::UrlTemplate::parse(
            "https://{name}.{namespace}.backends.example.com/",
        )
        .expect("template");
        c.public_base_url = Some("https://api.example.com/".into());
        c.id_prefix = "room-".into();
    })
    .await;
    let (status, body) = h.post("/spawn", json!({"image": "x"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = name_of(&body);
    assert!(name.starts_with("room-"));
    assert_eq!(
        body["url"],
        format!("https://{name}.default.backends.example.com/").as_str()
    );
    assert_eq!(
        body["readyUrl"],
        format!("https://api.example.com/backend/{name}/ready").as_str()
    );
}

#[tokio::test]
async fn url_carries_a_connect_token_for_that_backend_unless_public() {
    use spawner_core::connect_token::{self, KeyRing, Purpose, TokenError};
    let keys = KeyRing::parse(["k1:0123456789abcdef"], false).expect("keys");
    let ring = keys.clone();
    let h = Harness::start_with(move |c| {
        c.url_template =
            spawner_api::naming::UrlTemplate::parse("http://{name}.localhost:8000/").expect("t");
        c.connect_keys = Some(ring);
    })
    .await;
    let now = support::fixed_time().timestamp() as u64;
    let (status, body) = h
        .post("/spawn", json!({"image": "x", "user": "alice@example.com"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = name_of(&body);
    let url = body["url"].as_str().expect("url");
    let prefix = format!("http://{name}.localhost:8000/?spawner_token=");
    assert!(url.starts_with(&prefix), "{url}");
    let token = &url[prefix.len()..];
    let claims = connect_token::verify(&keys, Purpose::Connect, token, &name, now).expect("valid");
    assert_eq!(claims.user.as_deref(), Some("alice@example.com"));
    assert_eq!(claims.expires_at, now + 300);
    assert_eq!(
        connect_token::verify(&keys, Purpose::Connect, token, "slab-other", now),
        Err(TokenError::OtherBackend)
    );
    // The unauthenticated routes never hand out a token.
    let (_, status_body) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(
        status_body["url"],
        format!("http://{name}.localhost:8000/").as_str()
    );
    h.patch_status(
        &name,
        json!({"phase": "Ready", "url": "http://10.0.0.1:9090"}),
    )
    .await;
    let (status, headers, _) = h
        .call(Method::GET, &format!("/backend/{name}/ready"), None, None)
        .await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        headers["location"],
        format!("http://{name}.localhost:8000/").as_str()
    );

    // A public backend needs no token; /connect signs too.
    let (status, body) = h
        .post(
            "/connect",
            json!({"image": "x", "key": "demo", "public": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = name_of(&body);
    assert_eq!(
        body["url"],
        format!("http://{name}.localhost:8000/").as_str()
    );
    let backend = h.backends.get(&name).await.expect("exists");
    assert!(spawner_core::resource::is_public(&backend));
    let (_, body) = h
        .post("/connect", json!({"image": "x", "key": "room"}))
        .await;
    let url = body["url"].as_str().expect("url");
    assert!(url.contains("?spawner_token=ct1.k1."), "{url}");
    assert!(!spawner_core::resource::is_public(
        &h.backends.get(&name_of(&body)).await.expect("exists")
    ));

    // A user that cannot be carried in a header is refused.
    let (status, body) = h
        .post("/spawn", json!({"image": "x", "user": "a\r\nX-Evil: 1"}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(body["error"]["fields"][0]["field"], "user");
}

#[tokio::test]
async fn ready_redirects_only_when_ready() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let (status, _, body) = h
        .call(Method::GET, &format!("/backend/{name}/ready"), None, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "not_ready");
    assert_eq!(body["phase"], "Submitted");
    assert_eq!(body["name"], name.as_str());

    h.patch_status(
        &name,
        json!({"phase": "Running", "url": "http://127.0.3.4:9090", "nodeName": "node-1"}),
    )
    .await;
    let (status, _, body) = h
        .call(Method::GET, &format!("/backend/{name}/ready"), None, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "not_ready");
    assert_eq!(body["phase"], "Running");

    h.patch_status(&name, json!({"phase": "Ready"})).await;
    let (status, headers, _) = h
        .call(Method::GET, &format!("/backend/{name}/ready"), None, None)
        .await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers["location"], "http://127.0.3.4:9090");

    let (status, body) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["phase"], "Ready");
    assert_eq!(body["node"], "node-1");
    assert_eq!(body["url"], "http://127.0.3.4:9090");

    h.patch_status(&name, json!({"phase": "Swept"})).await;
    let (status, _, body) = h
        .call(Method::GET, &format!("/backend/{name}/ready"), None, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "not_ready");
    assert_eq!(body["phase"], "Swept");
}

#[tokio::test]
async fn status_stream_sends_history_then_live_phases_and_resumes() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    h.patch_status(
        &name,
        json!({"phase": "Constructed", "conditions": [condition("Constructed")]}),
    )
    .await;

    let mut stream = h.stream(&name, None).await;
    let first = stream.next().await.expect("history");
    assert_eq!(first.id.as_deref(), Some("Submitted"));
    assert_eq!(first.event, "phase");
    let second = stream.next().await.expect("history");
    assert_eq!(second.id.as_deref(), Some("Constructed"));
    let data: Value = serde_json::from_str(&second.data).expect("json data");
    assert_eq!(data["phase"], "Constructed");
    assert_eq!(data["time"], "2030-01-02T03:04:05Z");
    assert_eq!(data["name"], name.as_str());

    // Live: two transitions in one write still arrive as two events, in order.
    h.patch_status(
        &name,
        json!({"phase": "Running", "nodeName": "node-2", "url": "http://127.0.5.6:9090", "conditions": [
            condition("Constructed"), condition("Scheduled"), condition("Running")
        ]}),
    )
    .await;
    let scheduled = stream.next().await.expect("live");
    assert_eq!(scheduled.id.as_deref(), Some("Scheduled"));
    let data: Value = serde_json::from_str(&scheduled.data).expect("json");
    assert_eq!(data["node"], "node-2");
    assert_eq!(
        stream.next().await.expect("live").id.as_deref(),
        Some("Running")
    );
    h.patch_status(
        &name,
        json!({"phase": "Ready", "conditions": [
            condition("Constructed"), condition("Scheduled"), condition("Running"), condition("Ready")
        ]}),
    )
    .await;
    let ready = stream.next().await.expect("live");
    assert_eq!(ready.id.as_deref(), Some("Ready"));
    let data: Value = serde_json::from_str(&ready.data).expect("json");
    assert_eq!(data["url"], "http://127.0.5.6:9090");

    // A client that reconnects after Running gets Ready only, then live events.
    let mut resumed = h.stream(&name, Some("Running")).await;
    assert_eq!(
        resumed.next().await.expect("resumed").id.as_deref(),
        Some("Ready")
    );

    h.patch_status(&name, json!({"phase": "Swept"})).await;
    // Terminal: both streams send Swept and end.
    assert_eq!(stream.rest().await, ["Swept"]);
    assert_eq!(resumed.rest().await, ["Swept"]);
    // History of a finished backend, and a resume after its terminal phase.
    let mut replay = h.stream(&name, None).await;
    assert_eq!(
        replay.rest().await,
        [
            "Submitted",
            "Constructed",
            "Scheduled",
            "Running",
            "Ready",
            "Swept"
        ]
    );
    let mut done = h.stream(&name, Some("Swept")).await;
    assert_eq!(done.rest().await, Vec::<String>::new());
}

#[tokio::test]
async fn status_stream_ends_when_the_backend_is_deleted() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let mut stream = h.stream(&name, None).await;
    assert_eq!(
        stream.next().await.expect("history").id.as_deref(),
        Some("Submitted")
    );
    h.backends
        .delete(&name, &Default::default())
        .await
        .expect("delete");
    let last = stream.next().await.expect("deleted event");
    assert_eq!(last.event, "deleted");
    // The event has no id of its own: a client's last event id stays the last phase.
    assert_eq!(last.id.as_deref(), Some("Submitted"));
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn status_stream_sends_heartbeats_while_nothing_changes() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let response = h
        .send(
            Method::GET,
            &format!("/backend/{name}/status/stream"),
            None,
            None,
            &[("last-event-id", "Submitted")],
        )
        .await;
    let mut body = response.into_body();
    use http_body_util::BodyExt;
    let mut heartbeats = 0;
    // Bounded: every frame is a heartbeat or fails the test.
    while heartbeats < 3 {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("heartbeat in time")
            .expect("open")
            .expect("frame");
        let data = frame.into_data().expect("data frame");
        assert_eq!(&data[..], b": heartbeat\n\n");
        heartbeats += 1;
    }
    // Still live after heartbeats (and watch restarts): a transition arrives.
    h.patch_status(&name, json!({"phase": "Failed", "exitCode": 1}))
        .await;
    let mut parser = spawner_core::state_stream::SseParser::new();
    let failed = loop {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("event in time")
            .expect("open")
            .expect("frame");
        let messages = parser
            .push(&frame.into_data().expect("data frame"))
            .expect("sse");
        if let Some(message) = messages.into_iter().next() {
            break message;
        }
    };
    assert_eq!(failed.id.as_deref(), Some("Failed"));
    let data: Value = serde_json::from_str(&failed.data).expect("json");
    assert_eq!(data["exitCode"], 1);
}

#[tokio::test]
async fn status_stream_survives_a_silent_partition_of_its_watch() {
    let (h, proxy) = support::Harness::start_behind_proxy(|c| {
        c.watch_idle_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let mut stream = h.stream(&name, None).await;
    assert_eq!(
        stream.next().await.expect("history").id.as_deref(),
        Some("Submitted")
    );
    // The api's watch (and every pooled connection) now leads nowhere, without an error or
    // a close; the API server sends no bookmark for a minute.
    proxy.partition_open_connections();
    h.patch_status(&name, json!({"phase": "Running"})).await;
    // Noticed by the idle timeout, caught up by a fresh read over a new connection.
    assert_eq!(
        stream.next().await.expect("live").id.as_deref(),
        Some("Running")
    );
    h.patch_status(&name, json!({"phase": "Terminated"})).await;
    assert_eq!(stream.rest().await, ["Terminated"]);
}

#[tokio::test]
async fn a_backend_created_while_the_shared_list_is_under_way_is_not_taken_for_deleted() {
    let (h, proxy) = support::Harness::start_behind_proxy(|c| {
        c.watch_idle_timeout = std::time::Duration::from_secs(20);
    })
    .await;
    let first = spawn(&h, json!({"image": "x"})).await;
    let mut late = h.backends.get(&first).await.expect("get");
    late.metadata = kube::api::ObjectMeta {
        name: Some("slab-created-during-the-list".into()),
        labels: late.metadata.labels.clone(),
        ..Default::default()
    };
    // The first stream starts the replica's shared watch with a list, whose answer is held
    // back; the second backend is created after the API server answered that list, and its
    // stream subscribes before the list reaches the api.
    proxy.hold_answers();
    let created_after_the_list = async {
        proxy.wait_until_held("SessionLivedBackendList").await;
        h.backends
            .create(&Default::default(), &late)
            .await
            .expect("create");
        h.stream("slab-created-during-the-list", None).await
    };
    let release = async {
        proxy.wait_until_held("SessionLivedBackendList").await;
        proxy
            .wait_until_held("\"name\":\"slab-created-during-the-list\"")
            .await;
        proxy.release_answers();
    };
    let (_first_stream, mut stream, ()) =
        tokio::join!(h.stream(&first, None), created_after_the_list, release);
    assert_eq!(
        stream.next().await.expect("history").id.as_deref(),
        Some("Submitted")
    );
    h.patch_status("slab-created-during-the-list", json!({"phase": "Running"}))
        .await;
    let next = stream.next().await.expect("live");
    assert_eq!(
        (next.event.as_str(), next.id.as_deref()),
        ("phase", Some("Running"))
    );
}

#[tokio::test]
async fn connect_gets_or_creates_exactly_one_backend_under_50_concurrent_calls() {
    let h = std::sync::Arc::new(Harness::start().await);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let h = h.clone();
        calls.spawn(async move {
            let (status, body) = h
                .post(
                    "/connect",
                    json!({"key": "room/42 shared", "image": "x", "env": {"CALL": i.to_string()}}),
                )
                .await;
            (status, body)
        });
    }
    let mut names = BTreeSet::new();
    let mut spawned = 0;
    while let Some(result) = calls.join_next().await {
        let (status, body) = result.expect("task");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{status} {body}"
        );
        assert_eq!(body["spawned"], status == StatusCode::CREATED);
        spawned += usize::from(body["spawned"] == true);
        names.insert(name_of(&body));
        assert_eq!(body["key"], "room/42 shared");
    }
    assert_eq!(spawned, 1);
    assert_eq!(names.len(), 1);
    let all = h.backends.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 1);
    assert_eq!(all.items[0].spec.key.as_deref(), Some("room/42 shared"));
    // Not a valid label value, so the label holds its hash.
    assert!(all.items[0].labels()[KEY_LABEL].starts_with("h."));
}

#[tokio::test]
async fn connect_replaces_an_ended_backend_with_the_next_generation() {
    let h = Harness::start().await;
    let body = json!({"key": "doc-7", "image": "x"});
    let (status, first) = h.post("/connect", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let first = name_of(&first);
    assert_eq!(
        h.backends.get(&first).await.expect("get").labels()["spawner.dev/key-generation"],
        "0"
    );
    let (status, again) = h.post("/connect", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(name_of(&again), first);
    assert_eq!(again["spawned"], false);
    // /spawn with a key is get-or-create too.
    let (status, via_spawn) = h.post("/spawn", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(name_of(&via_spawn), first);

    // Swept but still retained: the next call makes generation 1.
    h.patch_status(&first, json!({"phase": "Swept"})).await;
    let (status, second) = h.post("/connect", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let second = name_of(&second);
    assert_ne!(second, first);
    assert_eq!(
        h.backends.get(&second).await.expect("get").labels()["spawner.dev/key-generation"],
        "1"
    );
    // One name says nothing about the next: no shared stem beyond the prefix.
    assert_ne!(first[..first.len() - 2], second[..second.len() - 2]);

    // Terminate requested (controller not yet acted): ended too.
    let (status, _, _) = h
        .call(
            Method::DELETE,
            &format!("/backend/{second}"),
            Some(TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, third) = h.post("/connect", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{third}");
    let third = name_of(&third);
    assert_eq!(
        h.backends.get(&third).await.expect("get").labels()["spawner.dev/key-generation"],
        "2"
    );

    // The earlier generations were deleted (retention over): numbering continues from the
    // highest one left, and the live one is still found.
    h.backends
        .delete(&first, &Default::default())
        .await
        .expect("delete");
    let (status, found) = h.post("/connect", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(name_of(&found), third);

    let (status, list) = h.get("/backends?key=doc-7").await;
    assert_eq!(status, StatusCode::OK);
    let names: BTreeSet<_> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, BTreeSet::from([second, third]));
}

#[tokio::test]
async fn terminate_while_starting_is_recorded_once_and_is_idempotent() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let path = format!("/backend/{name}");
    let (status, _, body) = h.call(Method::DELETE, &path, Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["name"], name.as_str());
    assert_eq!(body["phase"], "Submitted");
    let requested_at = "2030-01-02T03:04:05.000Z";
    assert_eq!(body["terminateRequestedAt"], requested_at);

    // Recorded on the object for the controller, even though nothing runs yet.
    let backend = h.backends.get(&name).await.expect("exists");
    assert_eq!(backend.annotations()[TERMINATE_ANNOTATION], requested_at);

    let (status, _, again) = h.call(Method::DELETE, &path, Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["terminateRequestedAt"], requested_at);

    let (_, body) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(body["terminateRequestedAt"], requested_at);

    // A backend that already ended is not annotated.
    let done = spawn(&h, json!({"image": "x"})).await;
    h.patch_status(&done, json!({"phase": "Failed", "exitCode": 3}))
        .await;
    let (status, _, body) = h
        .call(
            Method::DELETE,
            &format!("/backend/{done}"),
            Some(TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["phase"], "Failed");
    assert_eq!(body["terminateRequestedAt"], Value::Null);
    let (_, status_body) = h.get(&format!("/backend/{done}/status")).await;
    assert_eq!(status_body["exitCode"], 3);
}

#[tokio::test]
async fn list_filters_by_key_and_label_selector() {
    let h = Harness::start().await;
    let a = spawn(&h, json!({"image": "x", "labels": {"team": "a"}})).await;
    let b = spawn(&h, json!({"image": "x", "labels": {"team": "b"}})).await;
    let (_, keyed) = h.post("/connect", json!({"key": "k1", "image": "x"})).await;
    let keyed = name_of(&keyed);

    let names = |body: &Value| -> BTreeSet<String> {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(name_of)
            .collect()
    };
    let (status, all) = h.get("/backends").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        names(&all),
        BTreeSet::from([a.clone(), b.clone(), keyed.clone()])
    );
    let (_, team_a) = h.get("/backends?labelSelector=team%3Da").await;
    assert_eq!(names(&team_a), BTreeSet::from([a.clone()]));
    let (_, not_a) = h.get("/backends?labelSelector=team%2Cteam%21%3Da").await;
    assert_eq!(names(&not_a), BTreeSet::from([b]));
    let (_, by_key) = h.get("/backends?key=k1").await;
    assert_eq!(names(&by_key), BTreeSet::from([keyed]));
    let (_, none) = h.get("/backends?key=k2").await;
    assert_eq!(names(&none), BTreeSet::new());
}

#[tokio::test]
async fn bad_input_is_answered_with_the_documented_status_and_body() {
    let h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let protected: Vec<(Method, String, Option<Vec<u8>>)> = vec![
        (
            Method::POST,
            "/spawn".into(),
            Some(br#"{"image":"x"}"#.to_vec()),
        ),
        (
            Method::POST,
            "/connect".into(),
            Some(br#"{"image":"x","key":"k"}"#.to_vec()),
        ),
        (Method::GET, "/backends".into(), None),
        (Method::DELETE, format!("/backend/{name}"), None),
    ];
    for (method, path, body) in &protected {
        for token in [None, Some("wrong-token"), Some("")] {
            let (status, headers, answer) = h.call(method.clone(), path, token, body.clone()).await;
            assert_error(status, &answer, StatusCode::UNAUTHORIZED, "unauthorized");
            assert!(headers.contains_key("www-authenticate"));
        }
        // Both configured tokens work; a malformed header does not.
        let response = h
            .send(
                method.clone(),
                path,
                None,
                body.clone(),
                &[("authorization", "Basic dGVzdA==")],
            )
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _, _) = h
        .call(Method::GET, "/backends", Some("test-token-2"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // Nothing was started or stopped by the refused calls.
    let backend = h.backends.get(&name).await.expect("exists");
    assert!(!backend.annotations().contains_key(TERMINATE_ANNOTATION));
    assert_eq!(
        h.backends
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    for path in ["/spawn", "/connect"] {
        let call = |body: &[u8]| h.call(Method::POST, path, Some(TOKEN), Some(body.to_vec()));
        let (status, _, answer) = call(b"{\"image\": ").await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "malformed_json");
        let (status, _, answer) = call(b"").await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "malformed_json");
        let (status, _, answer) = call(br#"{"image": "x", "gracePeriodSeconds": "soon"}"#).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(answer["error"]["fields"][0]["field"], "gracePeriodSeconds");
        let (status, _, answer) = call(br#"{"image": "x", "env": {"A": 1}}"#).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(answer["error"]["fields"][0]["field"], "env.A");
        let (status, _, answer) = call(br#"["image"]"#).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
        let huge = format!(
            r#"{{"image": "x", "key": "k", "args": ["{}"]}}"#,
            "a".repeat(100 * 1024)
        );
        let (status, _, answer) = call(huge.as_bytes()).await;
        assert_error(
            status,
            &answer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        );
        let (status, _, answer) = call(
            br#"{"key": "k", "port": 9090, "gracePeriodSeconds": 0, "env": {"PORT": "1"}, "labels": {"spawner.dev/node": "x"}}"#,
        )
        .await;
        assert_error(
            status,
            &answer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        let fields: Vec<_> = answer["error"]["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .map(|f| f["field"].as_str().expect("field").to_string())
            .collect();
        assert_eq!(
            fields,
            [
                "port",
                "gracePeriodSeconds",
                "image",
                "env.PORT",
                "labels.spawner.dev/node"
            ]
        );
    }
    let (status, answer) = h.post("/connect", json!({"image": "x"})).await;
    assert_error(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(answer["error"]["fields"][0]["field"], "key");

    for unknown in ["slab-doesnotexist", "Not_A_Name", "a%2Fb"] {
        for (method, path, token) in [
            (Method::GET, format!("/backend/{unknown}/status"), None),
            (
                Method::GET,
                format!("/backend/{unknown}/status/stream"),
                None,
            ),
            (Method::GET, format!("/backend/{unknown}/ready"), None),
            (Method::DELETE, format!("/backend/{unknown}"), Some(TOKEN)),
        ] {
            let (status, _, answer) = h.call(method, &path, token, None).await;
            assert_error(status, &answer, StatusCode::NOT_FOUND, "not_found");
        }
    }
    let (status, answer) = h.get("/backends?limit=3").await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, answer) = h.get("/backends?labelSelector=team%20in%20%28a").await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(answer["error"]["fields"][0]["field"], "labelSelector");
    let (status, answer) = h.get("/nothing/here").await;
    assert_error(status, &answer, StatusCode::NOT_FOUND, "not_found");
    let (status, _, answer) = h.call(Method::PUT, "/spawn", Some(TOKEN), None).await;
    assert_error(
        status,
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn kubernetes_failures_are_503_without_their_text() {
    let h = Harness::start_without_kubernetes().await;
    let (status, body) = h.post("/spawn", json!({"image": "x"})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    let (status, body) = h.post("/connect", json!({"image": "x", "key": "k"})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    let (status, body) = h.get("/backend/slab-abc/status").await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    let text = body.to_string().to_lowercase();
    assert!(
        !text.contains("refused") && !text.contains("127.0.0.1") && !text.contains("hyper"),
        "{text}"
    );
}

#[tokio::test]
async fn openapi_and_health_are_served() {
    let h = Harness::start().await;
    let (status, _, body) = h.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, spawner_api::openapi::document());
    let (status, _, body) = h.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn shutdown_ends_open_status_streams() {
    let mut h = Harness::start().await;
    let name = spawn(&h, json!({"image": "x"})).await;
    let mut stream = h.stream(&name, None).await;
    assert_eq!(
        stream.next().await.expect("history").id.as_deref(),
        Some("Submitted")
    );
    h.shutdown();
    assert!(stream.next().await.is_none());
    let task = h.api_task.take().expect("running");
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("run returns after shutdown")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_burst_of_1000_status_streams_is_capped_and_the_api_stays_responsive() {
    let h = std::sync::Arc::new(
        Harness::start_with(|c| {
            c.max_status_streams = 100;
        })
        .await,
    );
    let name = spawn(&h, json!({"image": "x"})).await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let h = h.clone();
        let path = format!("/backend/{name}/status/stream");
        burst.spawn(async move { h.send(Method::GET, &path, None, None, &[]).await });
    }
    // The api answers other requests while the burst is served.
    let (status, _) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(status, StatusCode::OK);
    let mut open = Vec::new();
    let mut refused = 0;
    while let Some(response) = burst.join_next().await {
        let response = response.expect("task");
        match response.status() {
            StatusCode::OK => open.push(response),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(response.headers()["retry-after"], "1");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((open.len(), refused), (100, 900));
    let (status, _) = h.get(&format!("/backend/{name}/status")).await;
    assert_eq!(status, StatusCode::OK);
    // Every open stream follows the one shared watch.
    let mut streams: Vec<_> = open.into_iter().map(support::EventStream::new).collect();
    h.patch_status(&name, json!({"phase": "Running"})).await;
    for stream in &mut streams {
        assert_eq!(
            stream.next().await.expect("history").id.as_deref(),
            Some("Submitted")
        );
        assert_eq!(
            stream.next().await.expect("live").id.as_deref(),
            Some("Running")
        );
    }
    // Closed streams give their places back.
    drop(streams);
    let mut reopened = None;
    for _ in 0..50 {
        let response = h
            .send(
                Method::GET,
                &format!("/backend/{name}/status/stream"),
                None,
                None,
                &[],
            )
            .await;
        if response.status() == StatusCode::OK {
            reopened = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "no stream slot came back");
}

/// With a trace recorder, every answered spawn and connect is one `spawn` event: the session
/// from the `x-spawner-session` header (one per request without it), the key (the backend's
/// name without one), both as opaque ids; refused requests and bodies are not recorded.
#[tokio::test]
async fn answered_spawns_and_connects_are_recorded_with_opaque_ids() {
    let dir = std::env::temp_dir().join(format!("spawner-api-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("api.jsonl");
    let config = spawner_trace_recorder::RecorderConfig::new(
        &path,
        b"trace-key".as_slice(),
        "api",
        "2030-01-02T03:04:05Z",
    );
    let (recorder, handle) =
        spawner_trace_recorder::TraceRecorder::start(config).expect("recorder");
    let h = Harness::start_with(|c| c.trace = Some(recorder)).await;
    let body = json!({"command": ["secret-program"], "key": "doc-7"});
    let bytes = serde_json::to_vec(&body).expect("json");
    for session in ["alice", "bob"] {
        let response = h
            .send(
                Method::POST,
                "/connect",
                Some(TOKEN),
                Some(bytes.clone()),
                &[("x-spawner-session", session)],
            )
            .await;
        assert!(response.status().is_success(), "{}", response.status());
    }
    let anonymous = spawn(&h, json!({"command": ["secret-program"]})).await;
    // Refused: not recorded.
    let (status, _) = h.post("/connect", json!({"command": ["x"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let stats = tokio::task::spawn_blocking(move || handle.finish())
        .await
        .expect("finish");
    assert_eq!(
        (stats.written, stats.dropped_full, stats.dropped_io),
        (3, 0, 0)
    );

    let text = std::fs::read_to_string(&path).expect("trace");
    for private in [
        "alice",
        "bob",
        "doc-7",
        "secret-program",
        anonymous.as_str(),
    ] {
        assert!(!text.contains(private), "{private} in {text}");
    }
    let trace = spawner_core::trace::Trace::read(text.as_bytes()).expect("valid trace");
    assert_eq!(trace.header.source, "api");
    let id = |s: &str| spawner_trace_recorder::opaque_id(b"trace-key", s);
    let seen: Vec<(String, String)> = trace
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.kind, spawner_core::trace::TraceEventKind::Spawn);
            (e.session.clone(), e.key.clone())
        })
        .collect();
    assert_eq!(
        seen[..2],
        [(id("alice"), id("doc-7")), (id("bob"), id("doc-7"))]
    );
    assert_eq!(seen[2].1, id(&anonymous));
    assert!(![id("alice"), id("bob")].contains(&seen[2].0));
    let _ = std::fs::remove_dir_all(dir);
}
