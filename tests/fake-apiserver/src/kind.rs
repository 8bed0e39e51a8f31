//! The resource kinds the fake server stores, and how they map onto URL paths.

use std::fmt;

/// A resource kind served by the fake API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::Node => "node",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// `/api/v1` or `/apis/<group>/<version>`: the prefix resource paths hang off.
    pub fn group_version_path(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }

    /// Looks a kind up by the `apiVersion` and `kind` fields of an object.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// The kind of a k8s-openapi resource type, e.g. `Kind::of::<Service>()`.
    pub fn of<K: k8s_openapi::Resource>() -> Option<Kind> {
        Kind::from_type(K::API_VERSION, K::KIND)
    }

    fn from_plural(group_version_path: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group_version_path() == group_version_path && k.plural() == plural)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// What a resource URL addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePath {
    pub kind: Kind,
    /// `None` for a cluster-wide request (`/api/v1/services`) or a cluster-scoped kind.
    pub namespace: Option<String>,
    /// `Some` for a single-object GET.
    pub name: Option<String>,
}

impl ResourcePath {
    /// Parses `/api/v1/[namespaces/NS/]PLURAL[/NAME]` and the `/apis/GROUP/VERSION/...` form.
    pub fn parse(path: &str) -> Option<ResourcePath> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (prefix, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("/api/v1", rest),
            ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("/apis/discovery.k8s.io/v1", rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name) = match rest {
            [plural] => (*plural, None),
            [plural, name] => (*plural, Some(name.to_string())),
            _ => return None,
        };
        let kind = Kind::from_plural(prefix, plural)?;
        if namespace.is_some() && !kind.namespaced() {
            return None;
        }
        if name.is_some() && kind.namespaced() && namespace.is_none() {
            return None;
        }
        Some(ResourcePath {
            kind,
            namespace,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_collection_and_object_paths() {
        let p = ResourcePath::parse("/api/v1/services").unwrap();
        assert_eq!((p.kind, p.namespace, p.name), (Kind::Service, None, None));

        let p = ResourcePath::parse("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices/s-1")
            .unwrap();
        assert_eq!(p.kind, Kind::EndpointSlice);
        assert_eq!(p.namespace.as_deref(), Some("ns1"));
        assert_eq!(p.name.as_deref(), Some("s-1"));

        let p = ResourcePath::parse("/api/v1/nodes/n1").unwrap();
        assert_eq!((p.kind, p.name.as_deref()), (Kind::Node, Some("n1")));
    }

    #[test]
    fn rejects_wrong_group_and_scope() {
        assert!(ResourcePath::parse("/api/v1/endpointslices").is_none());
        assert!(ResourcePath::parse("/apis/discovery.k8s.io/v1/services").is_none());
        assert!(ResourcePath::parse("/api/v1/namespaces/ns1/nodes").is_none());
        assert!(ResourcePath::parse("/api/v1/services/no-namespace").is_none());
        assert!(ResourcePath::parse("/api/v1/pods").is_none());
    }

    #[test]
    fn kind_of_openapi_types() {
        use k8s_openapi::api::{core::v1, discovery::v1 as discovery};
        assert_eq!(Kind::of::<v1::Service>(), Some(Kind::Service));
        assert_eq!(
            Kind::of::<discovery::EndpointSlice>(),
            Some(Kind::EndpointSlice)
        );
        assert_eq!(Kind::of::<v1::Node>(), Some(Kind::Node));
        assert_eq!(Kind::of::<v1::Pod>(), None);
    }
}
