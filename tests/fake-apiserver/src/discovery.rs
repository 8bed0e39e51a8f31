//! The discovery documents (`/version`, `/api`, `/apis`, resource lists) for the three served kinds.

use serde_json::{Value, json};

use crate::Kind;

pub(crate) fn document(path: &str, server_address: &str) -> Option<Value> {
    Some(match path.trim_end_matches('/') {
        "/version" => json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-kproxy-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }),
        "/apis" => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]})
        }
        "/apis/discovery.k8s.io" => {
            let mut group = discovery_group();
            group["kind"] = json!("APIGroup");
            group["apiVersion"] = json!("v1");
            group
        }
        "/api/v1" => resource_list("v1"),
        "/apis/discovery.k8s.io/v1" => resource_list("discovery.k8s.io/v1"),
        _ => return None,
    })
}

fn discovery_group() -> Value {
    let version = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    json!({"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version})
}

fn resource_list(group_version: &str) -> Value {
    let resources: Vec<Value> = Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == group_version)
        .map(|k| {
            json!({
                "name": k.plural(), "singularName": k.singular(), "namespaced": k.namespaced(),
                "kind": k.kind(), "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}
