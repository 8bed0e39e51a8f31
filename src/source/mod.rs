//! Where Kubernetes objects come from: cluster files (`--from-file`), or the
//! API server (watchers).

pub mod document;
pub mod file;
pub mod list;
pub mod split;
pub mod watch;

use std::io;
use std::path::PathBuf;

pub use file::load_files;

/// A cluster file kproxy cannot read. Any of these fails the whole run before
/// anything is rendered or applied.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("{path}:{line}: not UTF-8 text")]
    Utf8 { path: PathBuf, line: usize },

    #[error("{path}:{line}:{column}: not valid YAML: {message}")]
    Yaml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{path}:{line}:{column}: not valid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}
