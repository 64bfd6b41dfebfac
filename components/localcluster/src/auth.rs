//! Bearer-token authentication and optional RBAC authorization from Role/ClusterRole/
//! RoleBinding/ClusterRoleBinding YAML.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;
use serde_json::json;

use crate::audit::Audit;
use crate::error::ApiError;

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// The cluster administrator (`system:masters`, never subject to RBAC).
    pub fn admin() -> Self {
        Self {
            user: "admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    /// A service account, named and grouped as the real token authenticator does.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }

    pub fn user(name: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        groups.push("system:authenticated".into());
        Self {
            user: name.into(),
            groups,
        }
    }

    fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What a request asks to do, in RBAC terms.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub api_group: &'a str,
    /// `pods`, or `sessionlivedbackends/status` with its subresource.
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PolicyRule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

impl PolicyRule {
    fn allows(&self, a: &Attributes<'_>) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == a.resource
                || (r.ends_with("/*")
                    && a.resource.split_once('/').map(|(base, _)| base) == Some(&r[..r.len() - 2]))
                || (r.starts_with("*/")
                    && a.resource.split_once('/').map(|(_, sub)| sub) == Some(&r[2..]))
        });
        any(&self.verbs, a.verb)
            && any(&self.api_groups, a.api_group)
            && resource_ok
            && (self.resource_names.is_empty()
                || a.name
                    .is_some_and(|n| self.resource_names.iter().any(|x| x == n)))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subject {
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl Subject {
    fn matches(&self, who: &Identity, binding_ns: Option<&str>) -> bool {
        match self.kind.as_str() {
            "User" => self.name == who.user,
            "Group" => who.groups.contains(&self.name),
            "ServiceAccount" => {
                let ns = self.namespace.as_deref().or(binding_ns).unwrap_or("");
                who.user == format!("system:serviceaccount:{ns}:{}", self.name)
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoleRef {
    kind: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Binding {
    /// `None` for a ClusterRoleBinding.
    namespace: Option<String>,
    subjects: Vec<Subject>,
    role: RoleRef,
}

/// Why a policy document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{kind} without metadata.name")]
    MissingName { kind: String },
    #[error("{kind} {name}: {what}")]
    Invalid {
        kind: String,
        name: String,
        what: String,
    },
}

/// RBAC policy: roles and bindings loaded from YAML documents.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    bindings: Vec<Binding>,
}

impl Rbac {
    /// Loads every Role, ClusterRole, RoleBinding and ClusterRoleBinding in a (multi-document)
    /// YAML text; other kinds are ignored, so whole `deploy/` manifests can be passed.
    pub fn load_yaml(&mut self, text: &str) -> Result<(), PolicyError> {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = serde_yaml::Value::deserialize(doc)?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_string();
            let meta = value.get("metadata");
            let name = meta
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string);
            let ns = meta
                .and_then(|m| m.get("namespace"))
                .and_then(|n| n.as_str())
                .map(str::to_string);
            let invalid = |what: String| PolicyError::Invalid {
                kind: kind.clone(),
                name: name.clone().unwrap_or_default(),
                what,
            };
            match kind.as_str() {
                "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {}
                _ => continue,
            }
            let name = name
                .clone()
                .ok_or_else(|| PolicyError::MissingName { kind: kind.clone() })?;
            match kind.as_str() {
                "Role" | "ClusterRole" => {
                    let rules: Vec<PolicyRule> = match value.get("rules") {
                        Some(r) => serde_yaml::from_value(r.clone())
                            .map_err(|e| invalid(format!("rules: {e}")))?,
                        None => Vec::new(),
                    };
                    if kind == "Role" {
                        let ns = ns.unwrap_or_else(|| "default".into());
                        self.roles.insert((ns, name), rules);
                    } else {
                        self.cluster_roles.insert(name, rules);
                    }
                }
                _ => {
                    let subjects: Vec<Subject> = match value.get("subjects") {
                        Some(s) => serde_yaml::from_value(s.clone())
                            .map_err(|e| invalid(format!("subjects: {e}")))?,
                        None => Vec::new(),
                    };
                    let role: RoleRef = value
                        .get("roleRef")
                        .cloned()
                        .ok_or_else(|| invalid("roleRef is required".into()))
                        .and_then(|r| {
                            serde_yaml::from_value(r).map_err(|e| invalid(format!("roleRef: {e}")))
                        })?;
                    let namespace = if kind == "RoleBinding" {
                        Some(ns.unwrap_or_else(|| "default".into()))
                    } else {
                        None
                    };
                    self.bindings.push(Binding {
                        namespace,
                        subjects,
                        role,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every (API group, resource, verb) the roles bound to `who` name, in any namespace, as
    /// written (a `*` stays a `*`).
    pub fn grants(&self, who: &Identity) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for b in &self.bindings {
            if !b
                .subjects
                .iter()
                .any(|s| s.matches(who, b.namespace.as_deref()))
            {
                continue;
            }
            let rules = match (b.role.kind.as_str(), &b.namespace) {
                ("ClusterRole", _) => self.cluster_roles.get(&b.role.name),
                ("Role", Some(ns)) => self.roles.get(&(ns.clone(), b.role.name.clone())),
                _ => None,
            };
            for rule in rules.into_iter().flatten() {
                for group in &rule.api_groups {
                    for resource in &rule.resources {
                        for verb in &rule.verbs {
                            out.insert((group.clone(), resource.clone(), verb.clone()));
                        }
                    }
                }
            }
        }
        out
    }

    pub fn allows(&self, who: &Identity, a: &Attributes<'_>) -> bool {
        if who.is_master() {
            return true;
        }
        self.bindings.iter().any(|b| {
            if let Some(bns) = &b.namespace
                && a.namespace != Some(bns.as_str())
            {
                return false;
            }
            if !b
                .subjects
                .iter()
                .any(|s| s.matches(who, b.namespace.as_deref()))
            {
                return false;
            }
            let rules = match (b.role.kind.as_str(), &b.namespace) {
                ("ClusterRole", _) => self.cluster_roles.get(&b.role.name),
                ("Role", Some(ns)) => self.roles.get(&(ns.clone(), b.role.name.clone())),
                _ => None,
            };
            rules.is_some_and(|rules| rules.iter().any(|r| r.allows(a)))
        })
    }
}

/// Authentication and authorization settings of a server. The default fails closed: no token
/// is known, so every request but the public health and version paths is a 401.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Bearer token → identity.
    pub tokens: HashMap<String, Identity>,
    /// The identity of a request without a known token, when such requests are let in (tests
    /// and examples that run a throwaway server); `None` answers them 401.
    pub anonymous: Option<Identity>,
    /// When set, every resource request is checked against it.
    pub rbac: Option<Rbac>,
    /// When set, records which permissions each caller used.
    pub audit: Option<Audit>,
}

impl Auth {
    /// Only these tokens get in, each as its identity.
    pub fn tokens(tokens: HashMap<String, Identity>) -> Self {
        Self {
            tokens,
            ..Self::default()
        }
    }

    /// Every caller is the administrator: for a throwaway server in a test or an example only.
    pub fn anyone_is_admin() -> Self {
        Self {
            anonymous: Some(Identity::admin()),
            ..Self::default()
        }
    }

    /// Maps a request's `Authorization` header to an identity (401 when unknown).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, ApiError> {
        let known = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .and_then(|token| self.tokens.get(token));
        known
            .or(self.anonymous.as_ref())
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }

    /// 403 with the real server's wording when RBAC denies the request.
    pub fn authorize(
        &self,
        who: &Identity,
        a: &Attributes<'_>,
        plural_group: (&str, &str),
    ) -> Result<(), ApiError> {
        let allowed = self.rbac.as_ref().is_none_or(|rbac| rbac.allows(who, a));
        if let Some(audit) = &self.audit {
            audit.record(who, a, allowed);
        }
        if allowed {
            return Ok(());
        }
        let (plural, group) = plural_group;
        let qualified = if group.is_empty() {
            plural.to_string()
        } else {
            format!("{plural}.{group}")
        };
        let subject = match a.name {
            Some(n) => format!("{qualified} \"{n}\""),
            None => qualified,
        };
        let scope = match a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        let mut details = json!({"kind": plural});
        if let Some(n) = a.name {
            details["name"] = json!(n);
        }
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        Err(ApiError::forbidden(
            format!(
                "{subject} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
                who.user, a.verb, a.resource, a.api_group
            ),
            Some(details),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: backends}
rules:
- apiGroups: ["spawner.dev"]
  resources: ["sessionlivedbackends"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["spawner.dev"]
  resources: ["sessionlivedbackends/status"]
  verbs: ["patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sweeper}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: backends}
subjects:
- {kind: ServiceAccount, name: sweeper, namespace: spawner}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease, namespace: spawner}
rules:
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: ["controller"]
  verbs: ["get", "update"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease, namespace: spawner}
roleRef: {kind: Role, name: lease}
subjects:
- {kind: ServiceAccount, name: controller}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ignored}
"#;

    fn attrs<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &str,
        ns: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Attributes<'a> {
        Attributes {
            verb,
            api_group: group,
            resource: resource.into(),
            namespace: ns,
            name,
        }
    }

    #[test]
    fn rbac_grants_exactly_the_rules() {
        let mut rbac = Rbac::default();
        rbac.load_yaml(POLICY).unwrap();
        let sweeper = Identity::service_account("spawner", "sweeper");
        let controller = Identity::service_account("spawner", "controller");
        assert!(rbac.allows(
            &sweeper,
            &attrs(
                "watch",
                "spawner.dev",
                "sessionlivedbackends",
                Some("x"),
                None
            )
        ));
        assert!(rbac.allows(
            &sweeper,
            &attrs(
                "patch",
                "spawner.dev",
                "sessionlivedbackends/status",
                Some("x"),
                Some("b")
            )
        ));
        assert!(!rbac.allows(
            &sweeper,
            &attrs(
                "patch",
                "spawner.dev",
                "sessionlivedbackends",
                Some("x"),
                Some("b")
            )
        ));
        assert!(!rbac.allows(&sweeper, &attrs("list", "", "pods", Some("x"), None)));
        assert!(rbac.allows(
            &controller,
            &attrs(
                "update",
                "coordination.k8s.io",
                "leases",
                Some("spawner"),
                Some("controller")
            )
        ));
        assert!(!rbac.allows(
            &controller,
            &attrs(
                "update",
                "coordination.k8s.io",
                "leases",
                Some("spawner"),
                Some("other")
            )
        ));
        assert!(!rbac.allows(
            &controller,
            &attrs(
                "update",
                "coordination.k8s.io",
                "leases",
                Some("default"),
                Some("controller")
            )
        ));
        assert!(rbac.allows(
            &Identity::admin(),
            &attrs("delete", "", "nodes", None, Some("n"))
        ));
    }

    #[test]
    fn forbidden_message_reads_like_the_real_server() {
        let mut rbac = Rbac::default();
        rbac.load_yaml(POLICY).unwrap();
        let auth = Auth {
            rbac: Some(rbac),
            ..Auth::default()
        };
        let who = Identity::service_account("spawner", "sweeper");
        let err = auth
            .authorize(
                &who,
                &attrs("list", "", "pods", Some("x"), None),
                ("pods", ""),
            )
            .unwrap_err();
        assert_eq!(err.code, 403);
        assert_eq!(
            err.message,
            "pods is forbidden: User \"system:serviceaccount:spawner:sweeper\" cannot list resource \"pods\" in API group \"\" in the namespace \"x\""
        );
    }

    #[test]
    fn unknown_tokens_are_unauthorized() {
        let mut tokens = HashMap::new();
        tokens.insert("t1".to_string(), Identity::admin());
        let auth = Auth::tokens(tokens);
        assert!(auth.authenticate(Some("Bearer t1")).is_ok());
        assert_eq!(auth.authenticate(Some("Bearer t2")).unwrap_err().code, 401);
        assert_eq!(auth.authenticate(None).unwrap_err().code, 401);
    }

    #[test]
    fn the_default_lets_nobody_in() {
        let auth = Auth::default();
        assert_eq!(auth.authenticate(None).unwrap_err().code, 401);
        assert_eq!(auth.authenticate(Some("Bearer x")).unwrap_err().code, 401);
        assert_eq!(
            Auth::anyone_is_admin().authenticate(None).unwrap(),
            Identity::admin()
        );
    }
}
