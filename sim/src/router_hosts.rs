//! Router hosts: the production router (`spawner-router`'s `run`, unchanged) as turmoil hosts
//! `router-0`, `router-1` ... in host mode, the users' only way into a backend. The api replicas
//! answer `url` as `http://<name>.routers.sim:8080/?spawner_token=…` (a connect token signed
//! with the key the routers verify); a user dials one router replica (as behind a load
//! balancer) and sends that URL's host.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::clock::HostClocks;
use crate::mutants::Mutant;
use crate::net::kube_client;

/// Port every router replica listens on.
pub const ROUTER_PORT: u16 = 8080;
/// The routers' domain: backend `<name>` is `<name>.routers.sim`.
pub const ROUTER_DOMAIN: &str = "routers.sim";
/// The connect key api and routers share (`<id>:<secret>`).
pub const CONNECT_KEY: &str = "sim:sim-connect-key-0123456789abcdef";

/// The host of router replica `i`.
pub fn router_name(i: usize) -> String {
    format!("router-{i}")
}

/// The api's `--url-template`: a backend's address behind the routers.
pub fn url_template() -> String {
    format!("http://{{name}}.{ROUTER_DOMAIN}:{ROUTER_PORT}/")
}

/// What users dial: every router replica's `host:port`.
pub fn router_addresses(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("{}:{ROUTER_PORT}", router_name(i)))
        .collect()
}

/// Adds `count` router hosts watching the API server at `kube_url`.
pub fn add_routers(
    sim: &mut turmoil::Sim<'_>,
    count: usize,
    kube_url: &http::Uri,
    clocks: &HostClocks,
    mutant: Option<Mutant>,
) {
    for i in 0..count {
        let name = router_name(i);
        let clock = clocks.of(&name);
        let kube_url = kube_url.clone();
        sim.host(name, move || {
            let kube_url = kube_url.clone();
            let clock = clock.clone();
            async move {
                let client =
                    kube_client(kube_url, crate::rbac::ROUTER_TOKEN, crate::world::NAMESPACE);
                let config = crate::components::router_config(ROUTER_DOMAIN, CONNECT_KEY, clock);
                let listener = RouterListener(
                    turmoil::net::TcpListener::bind(("0.0.0.0", ROUTER_PORT)).await?,
                );
                let dialer = SidecarDialer {
                    misdials: (mutant == Some(Mutant::RouterDialsAnotherBackend))
                        .then(Arc::default),
                };
                spawner_router::run(listener, client, dialer, config, std::future::pending()).await;
                Ok(())
            }
        });
    }
}

/// A router's listener on turmoil.
struct RouterListener(turmoil::net::TcpListener);

impl spawner_router::Listener for RouterListener {
    type Io = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        self.0.accept().await
    }
}

/// Dials sidecars over turmoil; with the mutant, every fourth dial goes to another address
/// the router dialled before (a stale upstream: after slots are reused, another backend's).
#[derive(Clone, Default)]
struct SidecarDialer {
    misdials: Option<Arc<Mutex<Misdials>>>,
}

#[derive(Default)]
struct Misdials {
    seen: Vec<String>,
    dials: u64,
}

impl Misdials {
    fn pick(&mut self, addr: &str) -> String {
        self.dials += 1;
        let other = self.seen.iter().rev().find(|a| *a != addr).cloned();
        if !self.seen.iter().any(|a| a == addr) {
            self.seen.push(addr.to_string());
            if self.seen.len() > 8 {
                self.seen.remove(0);
            }
        }
        match other {
            Some(other) if self.dials.is_multiple_of(4) => other,
            _ => addr.to_string(),
        }
    }
}

impl spawner_router::Connect for SidecarDialer {
    type Io = turmoil::net::TcpStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        let addr = match &self.misdials {
            Some(misdials) => misdials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pick(addr),
            None => addr.to_string(),
        };
        turmoil::net::TcpStream::connect(addr.as_str()).await
    }
}
