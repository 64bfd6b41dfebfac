//! A real Kubernetes control plane for tests: etcd, kube-apiserver (RBAC on, static tokens,
//! ServiceAccount signing keys) and kube-controller-manager (garbage collector, namespace and
//! serviceaccount controllers), built from the Go modules pinned in `e2e/controlplane/go.mod`,
//! started on free loopback ports, with Spawner's CRD installed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spawner_e2e::controlplane::Error> {
//! use spawner_e2e::controlplane::{ControlPlane, Identity};
//! let Some(cp) = ControlPlane::shared_or_skip("my_test").await else { return Ok(()) };
//! let admin = cp.admin_client().await?;
//! let sweeper = cp.client_for(Identity::Sweeper).await?;
//! let namespace = cp.create_namespace("my-test").await?;
//! # let _ = (admin, sweeper, namespace); Ok(()) }
//! ```
//!
//! See docs/controlplane.md for versions and how the binaries are built.

pub mod binaries;
mod identity;
mod pki;
mod process;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::{Client, Config};
use tokio::time::Instant;

pub use binaries::{etcd_version, kubernetes_version};
pub use identity::{DEPLOY_RBAC, Identity, SYSTEM_NAMESPACE};

use process::ManagedProcess;

/// Set to `1` (by `.ci/run`) to turn "Go is not installed" skips into failures.
pub const REQUIRE_ENV: &str = "SPAWNER_REQUIRE_CONTROLPLANE";

/// The CRD the control plane installs: the committed manifest, not a regenerated one.
pub const CRD_YAML: &str = include_str!("../../deploy/crd.yaml");

/// Bootstrap ClusterRoles bound to `Identity::NodeAgent`: it registers a Node, binds pods to it
/// and reports their status, as a kubelet and a scheduler would.
pub const NODE_AGENT_ROLES: [&str; 2] = ["system:node", "system:kube-scheduler"];

/// Field manager for everything the harness applies.
const FIELD_MANAGER: &str = "spawner-e2e";

/// How long each startup step may take. Generous: two shared cores, other builds running.
const STEP_TIMEOUT: Duration = Duration::from_secs(240);

const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Startup attempts: a free port found by binding `:0` can be taken by someone else before the
/// child binds it; such a child exits at once and the whole start is retried on new ports.
const START_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binaries are absent and cannot be built here (no Go): tests may skip.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
    #[error("building the control plane failed: {0}")]
    Build(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating credentials: {0}")]
    Certificate(String),
    #[error("{component} exited during startup ({status})\n{log}")]
    Exited {
        component: String,
        status: String,
        log: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}\n{logs}")]
    Timeout {
        timeout: Duration,
        what: String,
        logs: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid manifest: {0}")]
    Manifest(String),
}

/// A running control plane. Dropping it kills every process it started and removes its
/// directory (certificates, tokens, etcd data, logs).
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    server_url: String,
    etcd_url: String,
    kubeconfig_path: PathBuf,
    kubeconfig: Option<Kubeconfig>,
    processes: Mutex<Vec<ManagedProcess>>,
}

static SHARED: tokio::sync::OnceCell<Result<ControlPlane, Error>> =
    tokio::sync::OnceCell::const_new();

extern "C" fn shut_down_shared() {
    if let Some(Ok(control_plane)) = SHARED.get() {
        control_plane.shut_down();
    }
}

impl ControlPlane {
    /// Builds or finds the binaries, then starts a fresh control plane of its own.
    pub async fn start() -> Result<ControlPlane, Error> {
        let binaries = tokio::task::spawn_blocking(binaries::find_or_build)
            .await
            .map_err(|e| Error::Io {
                context: "the binary build task".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::start_once(&binaries).await {
                Ok(control_plane) => {
                    progress(&format!(
                        "Kubernetes {} control plane ready at {} in {:.1}s ({})",
                        kubernetes_version(),
                        control_plane.server_url,
                        started.elapsed().as_secs_f64(),
                        control_plane.dir.display()
                    ));
                    return Ok(control_plane);
                }
                Err(error @ Error::Exited { .. }) if attempt < START_ATTEMPTS => {
                    progress(&format!(
                        "control plane start {attempt} failed, retrying: {error}"
                    ));
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One control plane per test binary, started on first use and killed when the binary exits.
    /// Tests share it, each in namespaces of its own (`create_namespace`).
    pub async fn shared() -> Result<&'static ControlPlane, &'static Error> {
        let result = SHARED
            .get_or_init(|| async {
                let started = ControlPlane::start().await;
                if started.is_ok() {
                    // SAFETY: registers a plain `extern "C" fn` without arguments.
                    unsafe {
                        libc::atexit(shut_down_shared);
                    }
                }
                started
            })
            .await;
        result.as_ref()
    }

    /// The shared control plane, or `None` after printing one line when it cannot exist here
    /// (Go missing) and `SPAWNER_REQUIRE_CONTROLPLANE` is not `1`. Panics on any other failure:
    /// a broken build or a control plane that does not start is a test failure, not a skip.
    pub async fn shared_or_skip(test: &str) -> Option<&'static ControlPlane> {
        match Self::shared().await {
            Ok(control_plane) => Some(control_plane),
            Err(Error::Unavailable(why)) if !required() => {
                report_skip(test, why);
                None
            }
            Err(error) => panic!("control plane for {test}: {error}"),
        }
    }

    /// Finds or builds the binaries without starting anything: `false` after printing one line
    /// when they cannot exist here (same rule as `shared_or_skip`), panics on a failed build.
    pub async fn binaries_or_skip(test: &str) -> bool {
        match tokio::task::spawn_blocking(binaries::find_or_build).await {
            Ok(Ok(_)) => true,
            Ok(Err(Error::Unavailable(why))) if !required() => {
                report_skip(test, &why);
                false
            }
            Ok(Err(error)) => panic!("control plane for {test}: {error}"),
            Err(error) => panic!("control plane for {test}: {error}"),
        }
    }

    async fn start_once(binaries: &binaries::Binaries) -> Result<ControlPlane, Error> {
        let dir = run_dir()?;
        // From here on, dropping `control_plane` (on any error) cleans up.
        let mut control_plane = ControlPlane {
            kubeconfig_path: dir.join("kubeconfig"),
            dir,
            server_url: String::new(),
            etcd_url: String::new(),
            kubeconfig: None,
            processes: Mutex::new(Vec::new()),
        };
        let dir = control_plane.dir.clone();
        let credentials = pki::generate(&dir)?;
        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;

        control_plane.etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        control_plane.spawn(
            "etcd",
            &binaries.etcd,
            &[
                "--name=spawner-e2e".to_string(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={}", control_plane.etcd_url),
                format!("--advertise-client-urls={}", control_plane.etcd_url),
                format!("--listen-peer-urls={etcd_peer_url}"),
                format!("--initial-advertise-peer-urls={etcd_peer_url}"),
                format!("--initial-cluster=spawner-e2e={etcd_peer_url}"),
                // Test data dies with the test: durability costs fsyncs and buys nothing.
                "--unsafe-no-fsync=true".to_string(),
                "--log-level=warn".to_string(),
            ],
        )?;
        control_plane
            .wait_until("etcd to accept connections", || async move {
                std::net::TcpStream::connect(("127.0.0.1", etcd_port))
                    .ok()
                    .map(|_| ())
            })
            .await?;

        control_plane.server_url = format!("https://127.0.0.1:{apiserver_port}");
        control_plane.spawn(
            "kube-apiserver",
            &binaries.kube_apiserver,
            &[
                format!("--etcd-servers={}", control_plane.etcd_url),
                "--bind-address=127.0.0.1".to_string(),
                "--advertise-address=127.0.0.1".to_string(),
                format!("--secure-port={apiserver_port}"),
                format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                format!("--tls-cert-file={}", credentials.serving_cert.display()),
                format!(
                    "--tls-private-key-file={}",
                    credentials.serving_key.display()
                ),
                format!("--token-auth-file={}", credentials.token_file.display()),
                "--authorization-mode=RBAC".to_string(),
                "--service-account-issuer=https://kubernetes.default.svc".to_string(),
                format!(
                    "--service-account-key-file={}",
                    credentials.service_account_public_key.display()
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    credentials.service_account_key.display()
                ),
                "--service-cluster-ip-range=10.96.0.0/16".to_string(),
                // The `kubernetes` Service would point at 127.0.0.1, which Endpoints reject.
                "--endpoint-reconciler-type=none".to_string(),
                "--allow-privileged=true".to_string(),
                // API Priority and Fairness adds controllers and startup work tests do not need.
                "--enable-priority-and-fairness=false".to_string(),
                "--profiling=false".to_string(),
            ],
        )?;
        let admin_kubeconfig =
            pki::kubeconfig_yaml(&control_plane.server_url, &credentials, Identity::Admin)?;
        write_file(&control_plane.kubeconfig_path, &admin_kubeconfig)?;
        control_plane.kubeconfig = Some(Kubeconfig::from_yaml(&admin_kubeconfig)?);

        let admin = control_plane.admin_client().await?;
        control_plane
            .wait_until("kube-apiserver /readyz", || {
                let admin = admin.clone();
                async move {
                    let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
                    admin.request_text(request).await.ok().map(|_| ())
                }
            })
            .await?;

        // The CRD goes in before kube-controller-manager starts, so the garbage collector's
        // first discovery already includes SessionLivedBackends.
        control_plane.install_crd(&admin).await?;
        control_plane.create_system_objects(&admin).await?;

        let controller_manager_kubeconfig = dir.join("kube-controller-manager.kubeconfig");
        write_file(
            &controller_manager_kubeconfig,
            &pki::kubeconfig_yaml(
                &control_plane.server_url,
                &credentials,
                Identity::KubeControllerManager,
            )?,
        )?;
        control_plane.spawn(
            "kube-controller-manager",
            &binaries.kube_controller_manager,
            &[
                format!("--kubeconfig={}", controller_manager_kubeconfig.display()),
                "--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller"
                    .to_string(),
                "--leader-elect=false".to_string(),
                "--use-service-account-credentials=false".to_string(),
                // No HTTPS endpoint: nothing scrapes it, and it would need a port and a cert.
                "--secure-port=0".to_string(),
                "--profiling=false".to_string(),
            ],
        )?;
        // kube-controller-manager has no endpoint to poll without its secure port; the default
        // ServiceAccount it creates in `spawner-system` shows its controllers are running.
        let service_accounts: Api<ServiceAccount> =
            Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
        control_plane
            .wait_until(
                "kube-controller-manager to create the default ServiceAccount",
                || {
                    let service_accounts = service_accounts.clone();
                    async move { service_accounts.get_opt("default").await.ok().flatten() }
                },
            )
            .await?;
        Ok(control_plane)
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Result<(), Error> {
        let process =
            ManagedProcess::spawn(name, program, args, self.dir.join(format!("{name}.log")))?;
        self.lock_processes().push(process);
        Ok(())
    }

    fn lock_processes(&self) -> std::sync::MutexGuard<'_, Vec<ManagedProcess>> {
        self.processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `Err(Exited)` when a control-plane process has died.
    pub fn check_running(&self) -> Result<(), Error> {
        let mut processes = self.lock_processes();
        for process in processes.iter_mut() {
            if let Some(status) = process.exited() {
                return Err(Error::Exited {
                    component: process.name().to_string(),
                    status: status.to_string(),
                    log: process.log_tail(4096),
                });
            }
        }
        Ok(())
    }

    fn all_log_tails(&self) -> String {
        self.lock_processes()
            .iter()
            .map(|p| p.log_tail(2048))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `probe` until it yields a value, failing fast when a process exits.
    async fn wait_until<T, F, Fut>(&self, what: &str, mut probe: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if let Some(value) = probe().await {
                return Ok(value);
            }
            if start.elapsed() > STEP_TIMEOUT {
                return Err(Error::Timeout {
                    timeout: STEP_TIMEOUT,
                    what: what.to_string(),
                    logs: self.all_log_tails(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn install_crd(&self, admin: &Client) -> Result<(), Error> {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(CRD_YAML).map_err(|e| Error::Manifest(e.to_string()))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
        self.wait_until(&format!("CRD {name} to be Established"), || {
            let (crds, name) = (crds.clone(), name.clone());
            async move {
                let crd = crds.get(&name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await
    }

    /// The `spawner-system` namespace and a ServiceAccount per component identity, so bindings
    /// in `deploy/rbac/` name objects that exist; and the node agent's bindings to the bootstrap
    /// roles of the kubelet (`system:node`) and the scheduler (`system:kube-scheduler`), whose
    /// jobs it does.
    async fn create_system_objects(&self, admin: &Client) -> Result<(), Error> {
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(SYSTEM_NAMESPACE.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .patch(
                SYSTEM_NAMESPACE,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&namespace),
            )
            .await?;
        let service_accounts: Api<ServiceAccount> =
            Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
        for name in Identity::ALL.iter().filter_map(|i| i.service_account()) {
            let account = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            };
            service_accounts
                .patch(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&account),
                )
                .await?;
        }
        let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
        for role in NODE_AGENT_ROLES {
            let name = format!("spawner-e2e:node-agent:{role}");
            let binding = ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_string(),
                    kind: "ClusterRole".to_string(),
                    name: role.to_string(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_string(),
                    name: Identity::NodeAgent.name().to_string(),
                    namespace: Some(SYSTEM_NAMESPACE.to_string()),
                    ..Default::default()
                }]),
            };
            bindings
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&binding),
                )
                .await?;
        }
        Ok(())
    }

    /// Process ids of etcd, kube-apiserver and kube-controller-manager (each leads its group).
    pub fn pids(&self) -> Vec<u32> {
        self.lock_processes().iter().map(|p| p.pid()).collect()
    }

    /// The directory holding credentials, etcd data and the processes' logs (`<name>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`), for tests that look under the API server.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// A kubeconfig with a context per identity (named by `Identity::name`); `admin` is current.
    /// Use it with `kubectl --kubeconfig`. It lives as long as the control plane.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// Client configuration for `identity`.
    pub async fn config_for(&self, identity: Identity) -> Result<Config, Error> {
        let kubeconfig = self.kubeconfig.clone().ok_or_else(|| {
            Error::Manifest("the control plane has no kubeconfig yet".to_string())
        })?;
        let options = KubeConfigOptions {
            context: Some(identity.name().to_string()),
            ..Default::default()
        };
        Ok(Config::from_custom_kubeconfig(kubeconfig, &options).await?)
    }

    /// A client authenticated as `identity`. Clients are bound to the tokio runtime they are
    /// created in: make one per test.
    pub async fn client_for(&self, identity: Identity) -> Result<Client, Error> {
        Ok(Client::try_from(self.config_for(identity).await?)?)
    }

    /// A client in `system:masters`.
    pub async fn admin_client(&self) -> Result<Client, Error> {
        self.client_for(Identity::Admin).await
    }

    /// Creates a namespace named `<prefix>-<random>` and waits until its `default`
    /// ServiceAccount exists (pods cannot be created before). Tests sharing the control plane
    /// each work in namespaces of their own.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String, Error> {
        let admin = self.admin_client().await?;
        let suffix = &pki::random_token()?[..8];
        let name = format!("{prefix}-{suffix}");
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        let service_accounts: Api<ServiceAccount> = Api::namespaced(admin, &name);
        self.wait_until(&format!("the default ServiceAccount in {name}"), || {
            let service_accounts = service_accounts.clone();
            async move { service_accounts.get_opt("default").await.ok().flatten() }
        })
        .await?;
        Ok(name)
    }

    /// Server-side applies every document of a multi-document YAML manifest as `client`.
    /// Namespaced objects without a namespace go to `default_namespace`.
    pub async fn apply_yaml(
        &self,
        client: &Client,
        yaml: &str,
        default_namespace: &str,
    ) -> Result<Vec<DynamicObject>, Error> {
        let mut applied = Vec::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document)
                .map_err(|e| Error::Manifest(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let object: DynamicObject =
                serde_json::from_value(value).map_err(|e| Error::Manifest(e.to_string()))?;
            let types = object
                .types
                .clone()
                .ok_or_else(|| Error::Manifest("a document has no apiVersion/kind".into()))?;
            let gvk =
                GroupVersionKind::try_from(&types).map_err(|e| Error::Manifest(e.to_string()))?;
            let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk).await?;
            let name = object
                .metadata
                .name
                .clone()
                .ok_or_else(|| Error::Manifest(format!("a {} has no name", types.kind)))?;
            let api: Api<DynamicObject> =
                if capabilities.scope == kube::discovery::Scope::Namespaced {
                    let namespace = object
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or(default_namespace);
                    Api::namespaced_with(client.clone(), namespace, &resource)
                } else {
                    Api::all_with(client.clone(), &resource)
                };
            applied.push(
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await?,
            );
        }
        Ok(applied)
    }

    /// Kills every process (whole process groups) and removes the directory. Idempotent.
    pub fn shut_down(&self) {
        let mut processes = self.lock_processes();
        // Controller manager first, etcd last: the reverse of the start order.
        while let Some(mut process) = processes.pop() {
            process.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Runs `check` (e.g. one of the conformance checks, which take a `kube::Client`) against the
/// shared real API server as admin. `None` when the test is skipped (see
/// `ControlPlane::shared_or_skip`); panics when the control plane fails.
pub async fn with_real_server<F, Fut, T>(test: &str, check: F) -> Option<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = T>,
{
    let control_plane = ControlPlane::shared_or_skip(test).await?;
    let admin = control_plane
        .admin_client()
        .await
        .unwrap_or_else(|error| panic!("admin client for {test}: {error}"));
    Some(check(admin).await)
}

/// Writes a line to the real stderr: libtest captures `eprintln!` of passing tests, and a skip or
/// a build in progress must be seen.
pub(crate) fn progress(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "spawner-e2e: {line}");
}

/// One line per test binary: the first skipped test names the reason.
fn report_skip(test: &str, why: &str) {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| {
        progress(&format!(
            "skipping the real-control-plane tests of this binary (first: {test}): {why} \
             (set {REQUIRE_ENV}=1 to fail instead)"
        ));
    });
}

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// Distinct free loopback ports: all listeners are held until every port is chosen.
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in ports.iter_mut() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|source| Error::Io {
            context: "finding a free loopback port".into(),
            source,
        })?;
        *port = listener
            .local_addr()
            .map_err(|source| Error::Io {
                context: "reading a listener's port".into(),
                source,
            })?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// A fresh directory `$TMPDIR/spawner-controlplane/<pid>-<random>`, after removing those left
/// by test binaries that no longer run (killed before they could clean up).
fn run_dir() -> Result<PathBuf, Error> {
    let base = std::env::temp_dir().join("spawner-controlplane");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let owner = entry
                .file_name()
                .to_str()
                .and_then(|name| name.split('-').next()?.parse::<u32>().ok());
            if let Some(pid) = owner
                && pid != std::process::id()
                && !process::process_alive(pid)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!(
        "{}-{}",
        std::process::id(),
        &pki::random_token()?[..12]
    ));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}
