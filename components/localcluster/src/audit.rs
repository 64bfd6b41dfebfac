//! Which permissions each caller used: every resource request's user, verb, API group and
//! resource (with its subresource), as the real server's audit log at level Metadata records
//! them. Tests compare it with the RBAC roles a component is deployed with, so a grant the
//! component never uses, or a request it makes without one, shows.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::auth::{Attributes, Identity};

/// One permission a caller used (or was refused).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditEntry {
    pub user: String,
    pub api_group: String,
    /// `pods`, or `sessionlivedbackends/status` with its subresource.
    pub resource: String,
    pub verb: String,
    pub allowed: bool,
}

/// The set of distinct [`AuditEntry`]s a server has seen; cheap to clone, shared.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    seen: Arc<Mutex<BTreeSet<AuditEntry>>>,
}

impl Audit {
    pub fn record(&self, who: &Identity, a: &Attributes<'_>, allowed: bool) {
        let entry = AuditEntry {
            user: who.user.clone(),
            api_group: a.api_group.to_string(),
            resource: a.resource.clone(),
            verb: a.verb.to_string(),
            allowed,
        };
        // A panic while holding the lock leaves a consistent set (one insert).
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(entry);
    }

    /// Every distinct entry so far.
    pub fn entries(&self) -> BTreeSet<AuditEntry> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
