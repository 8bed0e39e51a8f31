//! `labelSelector` and `fieldSelector` query parameters, parsed and matched the way the API server does.

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, LabelOp)>);

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let err = |reason| SelectorError {
            selector: selector.to_string(),
            reason,
        };
        let mut requirements = Vec::new();
        for term in split_top_level(selector) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let requirement = if let Some(key) = term.strip_prefix('!') {
                (
                    valid_key(key.trim()).ok_or(err("bad key"))?,
                    LabelOp::NotExists,
                )
            } else if let Some(open) = term.find('(') {
                let close = term
                    .rfind(')')
                    .filter(|c| *c > open)
                    .ok_or(err("unclosed set"))?;
                let head: Vec<&str> = term[..open].split_whitespace().collect();
                let values: Vec<String> = term[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                match head.as_slice() {
                    [key, "in"] => (valid_key(key).ok_or(err("bad key"))?, LabelOp::In(values)),
                    [key, "notin"] => (
                        valid_key(key).ok_or(err("bad key"))?,
                        LabelOp::NotIn(values),
                    ),
                    _ => return Err(err("expected `in` or `notin`")),
                }
            } else if let Some((key, value)) = term.split_once("!=") {
                let key = valid_key(key.trim()).ok_or(err("bad key"))?;
                (key, LabelOp::NotEq(value.trim().to_string()))
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                let key = valid_key(key.trim()).ok_or(err("bad key"))?;
                (key, LabelOp::Eq(value.trim().to_string()))
            } else {
                (valid_key(term).ok_or(err("bad key"))?, LabelOp::Exists)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|(key, op)| match op {
            LabelOp::Eq(v) => label(key) == Some(v.as_str()),
            LabelOp::NotEq(v) => label(key) != Some(v.as_str()),
            LabelOp::In(vs) => label(key).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::NotIn(vs) => !label(key).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::Exists => label(key).is_some(),
            LabelOp::NotExists => label(key).is_none(),
        })
    }
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, comma separated.
/// Paths are dotted JSON paths such as `metadata.name` or `spec.type`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v.strip_prefix('=').unwrap_or(v))
            } else {
                return Err(SelectorError {
                    selector: selector.to_string(),
                    reason: "field selectors need `=`, `==` or `!=`",
                });
            };
            requirements.push((path.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            // The API server compares an absent field as the empty string.
            let actual = match object.pointer(&pointer) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

/// Splits on commas that are not inside an `in (...)` set.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns1", "labels": labels}, "spec": {"type": "NodePort"}})
    }

    #[test]
    fn label_equality_and_existence() {
        let o = obj(json!({"app": "web", "tier": "fe"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier=fe"));
        assert!(!m("app=db"));
        assert!(m("app!=db"));
        assert!(!m("app!=web"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!service.kubernetes.io/service-proxy-name"));
        assert!(!m("service.kubernetes.io/headless"));
        assert!(m("missing!=x"));
    }

    #[test]
    fn label_sets() {
        let o = obj(json!({"app": "web"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app in (db, web)"));
        assert!(!m("app in (db)"));
        assert!(m("app notin (db,cache),!x"));
        assert!(!m("app notin (web)"));
        assert!(m("other notin (web)"));
        assert!(!m("other in (web)"));
    }

    #[test]
    fn label_parse_errors() {
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("app within (a)").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn fields() {
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m("metadata.name=a"));
        assert!(m("metadata.name==a,metadata.namespace=ns1"));
        assert!(!m("metadata.name=b"));
        assert!(m("metadata.name!=b"));
        assert!(m("spec.type=NodePort"));
        assert!(m("spec.clusterIP="));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
