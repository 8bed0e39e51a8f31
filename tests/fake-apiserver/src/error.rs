use crate::Kind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the fake API server listener: {0}")]
    Bind(#[source] std::io::Error),
    #[error("serializing the object to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no metadata.name, or is not a JSON object")]
    InvalidObject,
    #[error("the fake API server does not serve {api_version:?} kind {kind:?}")]
    UnsupportedKind { api_version: String, kind: String },
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: Kind,
        namespace: String,
        name: String,
    },
    #[error("writing kubeconfig {path}: {source}")]
    WriteKubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
