//! Credentials for one control plane: a CA, the API server's serving certificate, the
//! ServiceAccount token signing key, a static token per identity, and the kubeconfig.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::Error;
use super::identity::Identity;

/// Files written into the control plane's directory.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
    pub token_file: PathBuf,
    pub tokens: BTreeMap<&'static str, String>,
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })
}

/// 32 random bytes, hex encoded.
pub fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Io {
        context: "reading random bytes for a token".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Generates everything into `dir`.
pub fn generate(dir: &Path) -> Result<Credentials, Error> {
    let ca_key = KeyPair::generate().map_err(cert_error)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "spawner-e2e-controlplane-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_error)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().map_err(cert_error)?;
    let mut serving_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .map_err(cert_error)?;
    serving_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving_params
        .signed_by(&serving_key, &ca)
        .map_err(cert_error)?;

    let service_account_key = KeyPair::generate().map_err(cert_error)?;

    let credentials = Credentials {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
        token_file: dir.join("tokens.csv"),
        tokens: Identity::ALL
            .iter()
            .map(|identity| Ok((identity.name(), random_token()?)))
            .collect::<Result<_, Error>>()?,
    };
    write(&credentials.ca_cert, &ca_cert.pem())?;
    write(&credentials.serving_cert, &serving_cert.pem())?;
    write(&credentials.serving_key, &serving_key.serialize_pem())?;
    write(
        &credentials.service_account_key,
        &service_account_key.serialize_pem(),
    )?;
    write(
        &credentials.service_account_public_key,
        &service_account_key.public_key_pem(),
    )?;
    write(&credentials.token_file, &token_file(&credentials.tokens))?;
    Ok(credentials)
}

/// kube-apiserver's `--token-auth-file`: `token,user,uid,"group1,group2"` per line.
fn token_file(tokens: &BTreeMap<&'static str, String>) -> String {
    Identity::ALL
        .iter()
        .filter_map(|identity| {
            let token = tokens.get(identity.name())?;
            Some(format!(
                "{token},{user},{uid},\"{groups}\"\n",
                user = identity.username(),
                uid = identity.name(),
                groups = identity.groups().join(",")
            ))
        })
        .collect()
}

/// A kubeconfig with one user and one context per identity, `current` being the current one.
pub fn kubeconfig_yaml(
    server_url: &str,
    credentials: &Credentials,
    current: Identity,
) -> Result<String, Error> {
    let users: Vec<serde_json::Value> = Identity::ALL
        .iter()
        .filter_map(|identity| {
            let token = credentials.tokens.get(identity.name())?;
            Some(serde_json::json!({"name": identity.name(), "user": {"token": token}}))
        })
        .collect();
    let contexts: Vec<serde_json::Value> = Identity::ALL
        .iter()
        .map(|identity| {
            serde_json::json!({
                "name": identity.name(),
                "context": {"cluster": "spawner-e2e", "user": identity.name(), "namespace": "default"},
            })
        })
        .collect();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "spawner-e2e",
            "cluster": {
                "server": server_url,
                "certificate-authority": credentials.ca_cert.to_string_lossy(),
            },
        }],
        "users": users,
        "contexts": contexts,
        "current-context": current.name(),
    });
    serde_yaml::to_string(&config).map_err(|e| Error::Certificate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_parseable_credentials_and_kubeconfig() {
        let dir = std::env::temp_dir().join(format!("spawner-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let credentials = generate(&dir).unwrap();
        let ca = std::fs::read_to_string(&credentials.ca_cert).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let tokens = std::fs::read_to_string(&credentials.token_file).unwrap();
        assert_eq!(tokens.lines().count(), Identity::ALL.len());
        assert!(tokens.contains(
            ",system:serviceaccount:spawner-system:controller,controller,\"system:serviceaccounts,system:serviceaccounts:spawner-system\""
        ));
        let yaml =
            kubeconfig_yaml("https://127.0.0.1:6443", &credentials, Identity::Admin).unwrap();
        let parsed = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("admin"));
        assert_eq!(parsed.contexts.len(), Identity::ALL.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
