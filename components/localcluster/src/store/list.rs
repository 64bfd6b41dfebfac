//! Lists: selection, key order, and pagination with continue tokens.

use serde_json::Value;

use super::object::namespace_of;
use super::{Obj, Store};
use crate::error::ApiError;

/// The result of a list.
#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Obj>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// Selection of a list or watch.
pub struct Filter<'a> {
    pub namespace: Option<&'a str>,
    pub labels: &'a crate::selector::LabelSelector,
    pub fields: &'a crate::selector::FieldSelector,
}

impl Filter<'_> {
    pub fn matches(&self, obj: &Value) -> bool {
        self.namespace.is_none_or(|ns| namespace_of(obj) == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

impl Store {
    /// Lists in key order; `limit`/`continue` paginate (continuing at the first page's version).
    pub fn list(
        &self,
        kind: usize,
        filter: &Filter<'_>,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListResult, ApiError> {
        let ks = &self.kinds[kind];
        let (list_rv, start) = match continue_token {
            Some(tok) => {
                let (rv, ns, name) = decode_continue(tok)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < ks.compacted_rv {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some((ns, name)))
            }
            None => (self.rv, None),
        };
        let range: Box<dyn Iterator<Item = (&(String, String), &Obj)>> =
            match (&start, filter.namespace) {
                (Some(s), _) => Box::new(ks.objects.range((
                    std::ops::Bound::Excluded(s.clone()),
                    std::ops::Bound::Unbounded,
                ))),
                (None, Some(ns)) => Box::new(ks.objects.range((ns.to_string(), String::new())..)),
                (None, None) => Box::new(ks.objects.iter()),
            };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = false;
        let mut remaining = 0usize;
        for (key, obj) in range {
            if let Some(ns) = filter.namespace
                && key.0 != ns
            {
                if key.0.as_str() > ns {
                    break;
                }
                continue;
            }
            if !filter.matches(obj) {
                continue;
            }
            if let Some(l) = limit
                && items.len() >= l
            {
                more = true;
                remaining += 1;
                continue;
            }
            last_key = Some(key.clone());
            items.push(obj.clone());
        }
        let continue_token = match (more, last_key) {
            (true, Some((ns, name))) => Some(encode_continue(list_rv, &ns, &name)),
            _ => None,
        };
        let selective = !filter.labels.is_empty() || !filter.fields.is_empty();
        Ok(ListResult {
            items,
            resource_version: list_rv,
            remaining: (continue_token.is_some() && !selective).then_some(remaining),
            continue_token,
        })
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    hex(&format!("{rv}\n{ns}\n{name}"))
}

fn decode_continue(tok: &str) -> Option<(u64, String, String)> {
    let s = unhex(tok)?;
    let mut parts = s.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
}
