//! Collection GETs: consistent snapshots, `limit`/`continue` pagination and selectors.

use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::body::ResponseBody;
use crate::kind::ResourcePath;
use crate::log::param;
use crate::respond::{bad_request, error, json};
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::Shared;
use crate::store::Key;

pub(crate) fn list(
    shared: &Shared,
    path: &ResourcePath,
    query: &[(String, String)],
) -> Response<ResponseBody> {
    let labels = match LabelSelector::parse(param(query, "labelSelector").unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => return bad_request(e.to_string()),
    };
    let fields = match FieldSelector::parse(param(query, "fieldSelector").unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => return bad_request(e.to_string()),
    };
    let limit = match param(query, "limit").map(str::parse::<usize>) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };

    let store = shared.store();
    let (rv, after) = if let Some(token) = param(query, "continue").filter(|t| !t.is_empty()) {
        match ContinueToken::decode(token) {
            Some(t) => (t.rv, Some((t.namespace, t.name))),
            None => return bad_request("continue key is not valid"),
        }
    } else if param(query, "resourceVersionMatch") == Some("Exact") {
        match param(query, "resourceVersion").map(str::parse::<u64>) {
            Some(Ok(rv)) if rv > store.resource_version() => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    format!(
                        "Too large resource version: {rv}, current: {}",
                        store.resource_version()
                    ),
                );
            }
            Some(Ok(rv)) if rv > 0 => (rv, None),
            _ => return bad_request("resourceVersionMatch=Exact needs a non-zero resourceVersion"),
        }
    } else {
        // Unset, "0" and NotOlderThan are all served from the newest state.
        (store.resource_version(), None)
    };

    let objects = match store.objects_at(path.kind, rv) {
        Ok(objects) => objects,
        Err(expired) if after.is_some() => {
            return error(
                StatusCode::GONE,
                "Expired",
                format!(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter. ({} < {})",
                    expired.requested, expired.oldest
                ),
            );
        }
        Err(expired) => {
            return error(
                StatusCode::GONE,
                "Expired",
                format!(
                    "too old resource version: {} ({})",
                    expired.requested, expired.oldest
                ),
            );
        }
    };
    drop(store);

    let matching = objects
        .into_iter()
        .filter(|(k, _)| {
            after
                .as_ref()
                .is_none_or(|a| (&k.namespace, &k.name) > (&a.0, &a.1))
        })
        .filter(|(k, _)| path.namespace.as_ref().is_none_or(|ns| *ns == k.namespace))
        .filter(|(_, v)| labels.matches(v) && fields.matches(v));

    let mut items = Vec::new();
    let mut last: Option<Key> = None;
    let mut more = false;
    for (key, object) in matching {
        if limit.is_some_and(|l| items.len() == l) {
            more = true;
            break;
        }
        items.push(list_item(&object));
        last = Some(key);
    }

    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
    if more && let Some(last) = last {
        let token = ContinueToken {
            rv,
            namespace: last.namespace,
            name: last.name,
        };
        metadata.insert("continue".into(), Value::String(token.encode()));
    }
    let list = json!({
        "kind": format!("{}List", path.kind.kind()),
        "apiVersion": path.kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    json(StatusCode::OK, &list)
}

/// Items of a list carry no `kind`/`apiVersion`, as the real server encodes them.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

/// Where the next page starts: the snapshot RV and the last key served. Opaque to clients.
#[derive(Debug, PartialEq, Eq)]
struct ContinueToken {
    rv: u64,
    namespace: String,
    name: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        let plain = format!("{}/{}/{}", self.rv, self.namespace, self.name);
        plain.bytes().map(|b| format!("{b:02x}")).collect()
    }

    fn decode(token: &str) -> Option<Self> {
        if !token.len().is_multiple_of(2) {
            return None;
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let plain = String::from_utf8(bytes).ok()?;
        let mut parts = plain.splitn(3, '/');
        Some(ContinueToken {
            rv: parts.next()?.parse().ok()?,
            namespace: parts.next()?.to_string(),
            name: parts.next()?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_token_round_trips_and_rejects_garbage() {
        let t = ContinueToken {
            rv: 42,
            namespace: "ns1".into(),
            name: "svc-a".into(),
        };
        let encoded = t.encode();
        assert!(!encoded.contains("svc-a"));
        assert_eq!(ContinueToken::decode(&encoded), Some(t));
        assert_eq!(ContinueToken::decode("zz"), None);
        assert_eq!(ContinueToken::decode("abc"), None);
        assert_eq!(ContinueToken::decode(""), None);
    }
}
