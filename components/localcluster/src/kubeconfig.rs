//! Writes kubeconfig files pointing at a localcluster server.

use std::path::Path;

use serde_json::json;

/// A kubeconfig with one cluster, user and context named `localcluster`; `ca_pem` is the CA
/// that signed an `https://` server's certificate ([`crate::tls`]).
pub fn kubeconfig_yaml(
    server_url: &str,
    ca_pem: Option<&str>,
    token: Option<&str>,
    namespace: Option<&str>,
) -> String {
    use base64::Engine as _;
    let mut cluster = json!({"server": server_url});
    if let Some(pem) = ca_pem {
        cluster["certificate-authority-data"] =
            json!(base64::engine::general_purpose::STANDARD.encode(pem));
    }
    let mut user = json!({});
    if let Some(t) = token {
        user["token"] = json!(t);
    }
    let mut context = json!({"cluster": "localcluster", "user": "localcluster"});
    if let Some(ns) = namespace {
        context["namespace"] = json!(ns);
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localcluster", "cluster": cluster}],
        "users": [{"name": "localcluster", "user": user}],
        "contexts": [{"name": "localcluster", "context": context}],
        "current-context": "localcluster",
        "preferences": {},
    });
    // A JSON value always has a YAML form.
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// Writes [`kubeconfig_yaml`] to `path` (mode 0600: it may hold a token).
pub fn write_kubeconfig(
    path: &Path,
    server_url: &str,
    ca_pem: Option<&str>,
    token: Option<&str>,
    namespace: Option<&str>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let text = kubeconfig_yaml(server_url, ca_pem, token, namespace);
    // Created 0600, never readable by others even for an instant; an existing file is made
    // 0600 before the token is written into it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_names_server_token_and_namespace() {
        let text = kubeconfig_yaml("http://127.0.0.1:6443", None, Some("t0k"), Some("demo"));
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["current-context"].as_str(), Some("localcluster"));
        assert_eq!(
            v["clusters"][0]["cluster"]["server"].as_str(),
            Some("http://127.0.0.1:6443")
        );
        assert_eq!(v["users"][0]["user"]["token"].as_str(), Some("t0k"));
        assert_eq!(
            v["contexts"][0]["context"]["namespace"].as_str(),
            Some("demo")
        );
    }

    #[test]
    fn the_kubeconfig_file_is_private_even_when_it_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kubeconfig-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        for existing in [false, true] {
            if existing {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
            write_kubeconfig(&path, "http://127.0.0.1:1", None, Some("t"), None).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
