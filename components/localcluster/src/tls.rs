//! HTTPS for the API server, as kube-apiserver and kind serve theirs: a CA made at start, a
//! server certificate it signs for the names clients dial, and the CA written into the
//! kubeconfig. Needed by `kubectl`, which sends a bearer token only over TLS.
//!
//! [`TlsListener`] wraps any [`axum::serve::Listener`] so that [`crate::serve`] (and its
//! header timeout, connection cap and panic handling) is unchanged. Handshakes run in tasks of
//! their own, bounded in number and time, so a client that connects and sends nothing holds
//! neither the accept loop nor a connection slot.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; past it, connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("making a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A CA and a server certificate it signed, made in memory (the CA's key is never written).
pub struct ServerCertificates {
    /// The CA certificate (PEM), for a kubeconfig's `certificate-authority-data`.
    pub ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificates")
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

impl ServerCertificates {
    /// A fresh CA and a server certificate for `names` (DNS names or IP addresses).
    pub fn generate(names: &[String]) -> Result<Self, TlsError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "spawner localcluster CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "spawner localcluster");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &issuer)?;

        let chain = vec![CertificateDer::from(server_cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // The server speaks HTTP/1.1 only; saying so keeps clients from trying h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: ca_cert.pem(),
            config: Arc::new(config),
        })
    }
}

/// The connections of an inner listener, after their TLS handshake.
pub struct TlsListener<L: axum::serve::Listener> {
    ready: mpsc::Receiver<(TlsStream<L::Io>, L::Addr)>,
    local_addr: L::Addr,
    accepting: JoinHandle<()>,
}

impl<L> TlsListener<L>
where
    L: axum::serve::Listener,
    L::Addr: Clone + std::fmt::Debug,
{
    /// Starts accepting on `inner` (a task of its own, ended when this listener is dropped).
    pub fn new(mut inner: L, certificates: &ServerCertificates) -> std::io::Result<Self> {
        let local_addr = inner.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(certificates.config.clone());
        // Small: handshaken connections wait here only while the server is at its cap.
        let (done, ready) = mpsc::channel(16);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (io, addr) = tokio::select! {
                    accepted = inner.accept() => accepted,
                    () = done.closed() => return,
                };
                let acceptor = acceptor.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(?addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(?addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local_addr,
            accepting,
        })
    }
}

impl<L: axum::serve::Listener> Drop for TlsListener<L> {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener,
    L::Addr: Clone + std::fmt::Debug,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (only when this listener is dropped): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr.clone())
    }
}
