//! `spawner dev`: the whole system on one machine, no cluster — localcluster's API server, a
//! node agent running backends as local processes, the controller, one sweeper per node, the
//! api and the router, in one process; with `--demo`, a launcher page that opens a shared demo backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::state::StateDir;
use spawner_localcluster::{Auth, Cluster, Identity, ServerConfig, SystemClock};

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Address of the Spawner api.
    #[arg(long, env = "SPAWNER_DEV_API_LISTEN", default_value = "127.0.0.1:7070")]
    pub api_listen: SocketAddr,
    /// Address of the router, the browsers' entry: backend `<name>` is
    /// `http://<name>.localhost:<port>/`.
    #[arg(
        long,
        env = "SPAWNER_DEV_ROUTER_LISTEN",
        default_value = "127.0.0.1:7072"
    )]
    pub router_listen: SocketAddr,
    /// Address of the embedded Kubernetes API server (port 0: any free port).
    #[arg(long, env = "SPAWNER_DEV_KUBE_LISTEN", default_value = "127.0.0.1:0")]
    pub kube_listen: SocketAddr,
    /// Another name (DNS name or IP address) clients may dial the Kubernetes API by, added to
    /// its certificate (served over HTTPS; the listen address, localhost and loopback are
    /// always in it). Repeatable.
    #[arg(long = "kube-tls-san", value_name = "NAME")]
    pub kube_tls_sans: Vec<String>,
    /// Number of simulated nodes, each with its own sweeper.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub nodes: u8,
    /// The api's bearer token (random when absent).
    #[arg(long, env = "SPAWNER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also serve the demo launcher: a page that opens a shared multiplayer demo backend.
    #[arg(long)]
    pub demo: bool,
    /// Address of the demo launcher.
    #[arg(
        long,
        env = "SPAWNER_DEV_DEMO_LISTEN",
        default_value = "127.0.0.1:7071"
    )]
    pub demo_listen: SocketAddr,
    /// Grace period of the demo backend, in seconds.
    #[arg(long, default_value_t = 30)]
    pub demo_grace_seconds: u32,
    /// Seconds a finished backend stays readable before it is deleted.
    #[arg(long, default_value_t = 60)]
    pub retention_seconds: u64,
    /// Where the kubeconfig and the backends' logs go, made private (0700; refused when
    /// another user owns it). Default: a fresh private temporary directory with an
    /// unpredictable name, removed on exit.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The api (spawns and connects) and the router (WebSocket connections, messages,
    /// disconnects) record one session trace (docs/traces.md); without --trace-key, the ids are
    /// hashed with a random key.
    #[command(flatten)]
    pub trace: spawner_trace_recorder::TraceRecordArgs,
}

/// The names in the Kubernetes API's certificate: the address it listens on, loopback by name
/// and number, and `extra`.
fn certificate_names(listen: std::net::IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        listen.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Starts the recorder of the api and the router when `--record-trace` asks for one (with a
/// random key unless `--trace-key` gives one).
fn start_recording(
    trace: &spawner_trace_recorder::TraceRecordArgs,
) -> anyhow::Result<crate::trace::Recording> {
    let mut trace_args = trace.clone();
    if trace_args.trace_key.is_none() {
        trace_args.trace_key = Some(random_token()?);
    }
    crate::trace::start_recording(&trace_args, "api+router", chrono::Utc::now())
}

fn random_token() -> anyhow::Result<String> {
    // A backend id without its prefix: 100 random bits in base32.
    Ok(spawner_core::id::new_backend_id("t")?[1..].to_string())
}

/// How often the embedded API server sends watch bookmarks (to `kubectl` and other clients of
/// its TCP listener, too).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// How long the embedded API server keeps an Event (a real cluster's `--event-ttl` is 1 h):
/// enough to read a backend's story with kubectl, short enough that a long session with many
/// spawns does not keep every Event (docs/dev.md, the soak).
const EVENT_TTL: Duration = Duration::from_secs(10 * 60);

/// How far back a watch of the embedded API server can resume (older: 410, and the client
/// lists again). Every client in `spawner dev` gets a bookmark every 5 s, so it resumes from
/// seconds ago. Kept for ever (up to 50,000 changes per type), the history grew by 300 KiB per
/// spawn, gigabytes at 1,000 spawns a minute (docs/dev.md, the soak).
const HISTORY_WINDOW: Duration = Duration::from_secs(60);

/// A kube client whose requests go straight to the embedded API server's router, as
/// `token`: every component of `spawner dev` runs in this process, so loopback TCP and HTTP/1.1
/// framing in both directions were pure overhead (about a third of `spawner dev`'s CPU per
/// spawn went to the kernel's TCP and hyper). Everything above the transport is the same
/// kube-rs code (`Api`, watchers, reflectors, the controller runtime), and requests are still
/// authenticated and authorized; `kubectl` and other clients use the TCP listener.
pub fn in_process_client(router: axum::Router, token: &str) -> anyhow::Result<kube::Client> {
    use tower::ServiceExt;
    let bearer =
        http::HeaderValue::from_str(&format!("Bearer {token}")).context("token in a header")?;
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let mut request = request.map(axum::body::Body::new);
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, bearer.clone());
        router.clone().oneshot(request)
    });
    Ok(kube::Client::new(service, "default"))
}

fn progress(step: &str) {
    eprintln!("  · {step}");
}

/// The listeners of `spawner dev`, all bound before anything starts so that a busy port is
/// reported at once.
struct Listeners {
    kube: TcpListener,
    api: TcpListener,
    router: TcpListener,
    demo: Option<TcpListener>,
}

async fn bind_listeners(args: &DevArgs) -> anyhow::Result<Listeners> {
    let kube = TcpListener::bind(args.kube_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.kube_listen))?;
    let api = TcpListener::bind(args.api_listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another `spawner dev` running? use --api-listen)",
            args.api_listen
        )
    })?;
    let router = TcpListener::bind(args.router_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another `spawner dev` running? use --router-listen)",
                args.router_listen
            )
        })?;
    let demo = if args.demo {
        Some(
            TcpListener::bind(args.demo_listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.demo_listen))?,
        )
    } else {
        None
    };
    Ok(Listeners {
        kube,
        api,
        router,
        demo,
    })
}

/// The secrets of one `spawner dev` run, random unless the user gave the api token.
struct Secrets {
    api_token: String,
    /// The components' (and kubectl's) token for the embedded API server.
    admin_token: String,
    events_secret: String,
    key_secret: String,
    connect_key: String,
}

impl Secrets {
    fn new(api_token: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self {
            api_token: match api_token {
                Some(t) => t.to_string(),
                None => random_token()?,
            },
            admin_token: random_token()?,
            events_secret: random_token()?,
            key_secret: random_token()?,
            connect_key: format!("dev:{}", random_token()?),
        })
    }
}

/// Where the components run: their tasks, the shutdown they share, and their way to the
/// embedded API server.
struct Components {
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    kube_router: axum::Router,
    admin_token: String,
}

impl Components {
    fn client(&self) -> anyhow::Result<kube::Client> {
        in_process_client(self.kube_router.clone(), &self.admin_token)
    }

    fn start_node_agent(
        &mut self,
        nodes: &[String],
        log_dir: &std::path::Path,
    ) -> anyhow::Result<()> {
        let joined = nodes.join(",");
        let log_dir = log_dir.display().to_string();
        let (node_args, config) = spawner_assembly::node_agent(
            &["--node", &joined, "--log-dir", &log_dir],
            Arc::new(SystemClock),
        )?;
        let client = self.client()?;
        let runtime = Arc::new(node_args.process_runtime());
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            spawner_node_agent::run(client, config, runtime, shutdown.cancelled_owned())
                .await
                .context("node agent")
        });
        progress(&format!("node agent running nodes {joined}"));
        Ok(())
    }

    async fn start_controller(
        &mut self,
        events_secret: &str,
        retention_seconds: u64,
    ) -> anyhow::Result<()> {
        let retention = retention_seconds.to_string();
        let config = spawner_assembly::controller(
            &[
                "--events-secret",
                events_secret,
                "--url-mode",
                "pod-ip",
                "--no-leader-election",
                "--retention-seconds",
                &retention,
            ],
            Arc::new(SystemClock),
        )?;
        let client = self.client()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        progress(&format!(
            "controller (metrics on http://{}/metrics)",
            listener.local_addr()?
        ));
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            spawner_controller::run(client, listener, config, shutdown.cancelled_owned())
                .await
                .context("controller")
        });
        Ok(())
    }

    async fn start_sweepers(
        &mut self,
        nodes: &[String],
        events_secret: &str,
    ) -> anyhow::Result<()> {
        for node in nodes {
            let config = spawner_assembly::sweeper(
                &["--node-name", node, "--events-secret", events_secret],
                Arc::new(SystemClock),
            )?;
            let client = self.client()?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            progress(&format!(
                "sweeper of {node} (metrics on http://{}/metrics)",
                listener.local_addr()?
            ));
            let shutdown = self.shutdown.clone();
            self.tasks.spawn(async move {
                spawner_sweeper::run(
                    client,
                    listener,
                    spawner_sweeper::tcp_transport(),
                    config,
                    shutdown.cancelled_owned(),
                )
                .await
                .context("sweeper")
            });
        }
        Ok(())
    }

    fn start_router(
        &mut self,
        listener: TcpListener,
        connect_key: &str,
        trace: Option<spawner_trace_recorder::TraceRecorder>,
    ) -> anyhow::Result<()> {
        let mut config = spawner_assembly::router(
            &["--domain", "localhost", "--connect-key", connect_key],
            Arc::new(SystemClock),
        )?;
        let client = self.client()?;
        config.trace = trace;
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            spawner_router::run(
                listener,
                client,
                spawner_router::TcpConnector,
                config,
                shutdown.cancelled_owned(),
            )
            .await;
            Ok(())
        });
        Ok(())
    }

    /// Starts the api, recording its spawns to `trace` if given.
    fn start_api(
        &mut self,
        listener: TcpListener,
        secrets: &Secrets,
        api_url: &str,
        url_template: &str,
        trace: Option<spawner_trace_recorder::TraceRecorder>,
    ) -> anyhow::Result<()> {
        let mut config = spawner_assembly::api(
            &[
                "--token",
                &secrets.api_token,
                "--key-secret",
                &secrets.key_secret,
                "--public-base-url",
                api_url,
                "--url-template",
                url_template,
                "--connect-key",
                &secrets.connect_key,
            ],
            Arc::new(SystemClock),
        )?;
        let client = self.client()?;
        config.trace = trace;
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            spawner_api::run(
                client,
                crate::components::without_nagle(listener),
                config,
                shutdown.cancelled_owned(),
            )
            .await
            .context("api")
        });
        Ok(())
    }

    /// Serves the demo launcher; returns its URL.
    fn start_demo(
        &mut self,
        listener: TcpListener,
        api_url: &str,
        api_token: &str,
        grace_seconds: u32,
    ) -> anyhow::Result<String> {
        let url = format!("http://{}", listener.local_addr()?);
        let launcher = crate::launcher::Launcher::new(
            api_url,
            api_token,
            std::env::current_exe().context("finding the spawner binary for the demo")?,
            grace_seconds,
        )?;
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let router = crate::launcher::router(launcher);
            let limits = spawner_serve::Limits::default();
            spawner_serve::serve(listener, router, limits, shutdown.cancelled_owned()).await;
            Ok(())
        });
        Ok(url)
    }

    /// Runs until a signal, the caller's stop, or a component failing; then stops every
    /// component (backends first, through the node agent) and returns the failure, if any.
    async fn run_until_stopped(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<anyhow::Error> {
        let failure = tokio::select! {
            _ = crate::shutdown_signal() => None,
            _ = stop => None,
            finished = self.tasks.join_next() => match finished {
                Some(Ok(Err(e))) => Some(e),
                Some(Err(e)) => Some(anyhow!("a component panicked: {e}")),
                _ => Some(anyhow!("a component stopped unexpectedly")),
            },
        };
        eprintln!("Stopping: backends first, then the components…");
        self.shutdown.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(result) = self.tasks.join_next().await {
                if let Ok(Err(e)) = result {
                    tracing::warn!(error = %format!("{e:#}"), "component stopped with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            eprintln!("Some components did not stop within 30 s.");
        }
        failure
    }
}

/// What `spawner dev` prints once everything runs: the environment to use it, and how.
struct Banner<'a> {
    api_url: &'a str,
    router_url: &'a str,
    api_token: &'a str,
    kubeconfig: &'a std::path::Path,
    demo_url: Option<&'a str>,
    demo_grace_seconds: u32,
}

impl Banner<'_> {
    fn write(&self, out: &mut (dyn std::io::Write + Send)) -> std::io::Result<()> {
        let Banner {
            api_url,
            router_url,
            api_token,
            kubeconfig,
            demo_url,
            demo_grace_seconds,
        } = self;
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "spawner".into());
        writeln!(out)?;
        writeln!(out, "Spawner is running. Ctrl-C stops everything.")?;
        writeln!(out)?;
        writeln!(out, "SPAWNER_API_URL={api_url}")?;
        writeln!(out, "SPAWNER_ROUTER_URL={router_url}")?;
        writeln!(out, "SPAWNER_TOKEN={api_token}")?;
        writeln!(out, "KUBECONFIG={}", kubeconfig.display())?;
        if let Some(url) = demo_url {
            writeln!(out, "SPAWNER_DEMO_URL={url}")?;
            writeln!(out)?;
            writeln!(
                out,
                "Open {url} in two browser tabs: both join one demo backend. Close them and it is swept after {demo_grace_seconds}s.",
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "Spawn a backend (any program that serves HTTP on $PORT):"
        )?;
        writeln!(
            out,
            "  curl -s -X POST {api_url}/spawn -H 'authorization: Bearer {api_token}' -H 'content-type: application/json' \\"
        )?;
        writeln!(
            out,
            "       -d '{{\"command\": [\"python3\", \"-m\", \"http.server\", \"$(PORT)\", \"--bind\", \"127.0.0.1\"], \"gracePeriodSeconds\": 30}}'"
        )?;
        writeln!(out, "or with the CLI:")?;
        writeln!(
            out,
            "  export SPAWNER_API_URL={api_url} SPAWNER_TOKEN={api_token}"
        )?;
        writeln!(
            out,
            "  {exe} spawn --grace 30 --wait -- python3 -m http.server '$(PORT)' --bind 127.0.0.1"
        )?;
        writeln!(
            out,
            // One type: kubectl watches a single resource type at a time.
            "Watch the objects: kubectl --kubeconfig {} get slab -w",
            kubeconfig.display()
        )?;
        out.flush()
    }
}

/// Runs everything until SIGINT/SIGTERM (or `stop` resolves), then shuts it all down.
pub async fn run(
    args: DevArgs,
    out: &mut (dyn std::io::Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let state = match &args.state_dir {
        Some(path) => StateDir::named(path)?,
        None => StateDir::fresh(&std::env::temp_dir())?,
    };
    let logs = state.subdir("logs")?;

    eprintln!("Starting Spawner dev…");
    let secrets = Secrets::new(args.token.as_deref())?;
    let mut tokens = std::collections::HashMap::new();
    tokens.insert(secrets.admin_token.clone(), Identity::admin());
    let cluster = Cluster::new(
        ServerConfig {
            auth: Auth::tokens(tokens),
            bookmark_interval: BOOKMARK_INTERVAL,
            store: spawner_localcluster::StoreConfig {
                event_ttl: Some(EVENT_TTL),
                history_window: Some(HISTORY_WINDOW),
                ..Default::default()
            },
            ..ServerConfig::default()
        },
        Arc::new(SystemClock),
    );
    let listeners = bind_listeners(&args).await?;
    let kube_addr = listeners.kube.local_addr()?;
    // HTTPS, as kubectl sends its token only over TLS; the CA goes into the kubeconfig.
    let kube_certificates = spawner_localcluster::ServerCertificates::generate(&certificate_names(
        kube_addr.ip(),
        &args.kube_tls_sans,
    ))
    .context("making the Kubernetes API's certificate")?;
    let kube_url = format!("https://{kube_addr}");
    let api_url = format!("http://{}", listeners.api.local_addr()?);
    let router_port = listeners.router.local_addr()?.port();
    // `*.localhost` resolves to loopback in browsers (and in most resolvers), so host mode
    // needs no DNS set-up.
    let router_url = format!("http://localhost:{router_port}");
    let url_template = format!("http://{{name}}.localhost:{router_port}/");

    // The API server stops last: the node agent reports its stopped pods through it.
    let kube_shutdown = CancellationToken::new();
    let kube_router = spawner_localcluster::router(cluster.clone());
    let kube_server = {
        let kube_shutdown = kube_shutdown.clone();
        let kube_listener = spawner_localcluster::TlsListener::new(
            crate::components::without_nagle(listeners.kube),
            &kube_certificates,
        )?;
        tokio::spawn(async move {
            tokio::select! {
                r = spawner_localcluster::serve(kube_listener, cluster) => r.map_err(anyhow::Error::from),
                _ = kube_shutdown.cancelled() => Ok(()),
            }
            .context("localcluster")
        })
    };
    progress(&format!("Kubernetes API (localcluster) on {kube_url}"));
    let kubeconfig = state.path.join("kubeconfig");
    spawner_localcluster::write_kubeconfig(
        &kubeconfig,
        &kube_url,
        Some(&kube_certificates.ca_pem),
        Some(&secrets.admin_token),
        Some("default"),
    )
    .with_context(|| format!("writing {}", kubeconfig.display()))?;

    let mut components = Components {
        tasks: JoinSet::new(),
        shutdown: CancellationToken::new(),
        kube_router,
        admin_token: secrets.admin_token.clone(),
    };
    let nodes: Vec<String> = (1..=args.nodes).map(|i| format!("node-{i}")).collect();
    components.start_node_agent(&nodes, &logs)?;
    components
        .start_controller(&secrets.events_secret, args.retention_seconds)
        .await?;
    components
        .start_sweepers(&nodes, &secrets.events_secret)
        .await?;
    // One recorder for the api and the router: one file, one clock, one key, so the api's
    // spawns and the router's connections of a session line up without a merge.
    let recording = start_recording(&args.trace)?;
    let recorder = recording.as_ref().map(|(recorder, _)| recorder.clone());
    components.start_router(listeners.router, &secrets.connect_key, recorder.clone())?;
    progress(&format!(
        "router on {router_url} (backend <name> at http://<name>.localhost:{router_port}/)"
    ));
    components.start_api(listeners.api, &secrets, &api_url, &url_template, recorder)?;
    progress(&format!("api on {api_url}"));
    if let Some(path) = &args.trace.record_trace {
        progress(&format!("recording a session trace to {}", path.display()));
    }
    let demo_url = match listeners.demo {
        Some(listener) => Some(components.start_demo(
            listener,
            &api_url,
            &secrets.api_token,
            args.demo_grace_seconds,
        )?),
        None => None,
    };

    Banner {
        api_url: &api_url,
        router_url: &router_url,
        api_token: &secrets.api_token,
        kubeconfig: &kubeconfig,
        demo_url: demo_url.as_deref(),
        demo_grace_seconds: args.demo_grace_seconds,
    }
    .write(out)?;

    let failure = components.run_until_stopped(stop).await;
    crate::trace::finish_recording(recording).await;
    kube_shutdown.cancel();
    let _ = kube_server.await;
    drop(state);
    eprintln!("Stopped.");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use kube::api::{
        Api, ApiResource, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams,
    };

    fn namespaces(client: kube::Client) -> Api<DynamicObject> {
        let resource = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Namespace".into(),
            plural: "namespaces".into(),
        };
        Api::all_with(client, &resource)
    }

    #[tokio::test]
    async fn the_in_process_client_writes_watches_and_is_authenticated() {
        let token = "in-process-token";
        let mut tokens = std::collections::HashMap::new();
        tokens.insert(token.to_string(), Identity::admin());
        let cluster = Cluster::new(
            ServerConfig {
                auth: Auth::tokens(tokens),
                ..ServerConfig::default()
            },
            Arc::new(SystemClock),
        );
        let router = spawner_localcluster::router(cluster);
        let api = namespaces(in_process_client(router.clone(), token).expect("client"));

        let listed = api.list(&ListParams::default()).await.expect("list");
        let mut watch = api
            .watch(
                &WatchParams::default(),
                &listed.metadata.resource_version.unwrap_or_default(),
            )
            .await
            .expect("watch")
            .boxed();
        let namespace: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}
        }))
        .expect("namespace");
        let created = api
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create");
        assert!(
            created.metadata.uid.is_some(),
            "the server filled in the object"
        );
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("an event");
        match seen {
            WatchEvent::Added(ns) => assert_eq!(ns.metadata.name.as_deref(), Some("team-a")),
            other => panic!("expected Added, got {other:?}"),
        }

        // The token is what the server authenticates: a client with another one is refused.
        let stranger = namespaces(in_process_client(router, "not-a-token").expect("client"));
        match stranger.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
            other => panic!("expected 401, got {other:?}"),
        }
    }
}
