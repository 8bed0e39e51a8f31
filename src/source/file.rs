//! `--from-file`: files, directories and standard input.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::de::DeserializeSeed;
use serde_json::{Map, Value};
use tracing::{debug, warn};

use super::SourceError;
use super::document::{DocumentSeed, ListItems, Origin};
use super::list::{self, ListLayout};
use super::split::{SplitError, Splitter};
use crate::inventory::Inventory;

/// Reads every path into `inventory`, in order. A directory stands for its
/// `*.yaml`, `*.yml` and `*.json` files in name order (not recursive); `-` is
/// standard input.
pub fn load_files(paths: &[PathBuf], inventory: &mut Inventory) -> Result<(), SourceError> {
    for path in paths {
        if path.as_os_str() == "-" {
            load_yaml(io::stdin().lock(), Path::new("<stdin>"), inventory)?;
            continue;
        }
        for file in expand(path)? {
            load_file(&file, inventory)?;
        }
    }
    Ok(())
}

fn expand(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !path.metadata().map_err(io_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let file = entry.map_err(io_err)?.path();
        let wanted = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        warn!(
            "{}: no *.yaml, *.yml or *.json file in this directory",
            path.display()
        );
    }
    Ok(files)
}

fn load_file(path: &Path, inventory: &mut Inventory) -> Result<(), SourceError> {
    debug!("reading {}", path.display());
    let file = File::open(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    if path.extension().is_some_and(|e| e == "json") {
        load_json(reader, path, inventory)
    } else {
        load_yaml(reader, path, inventory)
    }
}

fn load_yaml(
    reader: impl BufRead,
    path: &Path,
    inventory: &mut Inventory,
) -> Result<(), SourceError> {
    let shown = path.display().to_string();
    let mut splitter = Splitter::new(reader);
    let mut document = 0;
    loop {
        let chunk = match splitter.next_chunk() {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(()),
            Err(SplitError::Io(source)) => {
                return Err(SourceError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
            Err(SplitError::Utf8(line)) => {
                return Err(SourceError::Utf8 {
                    path: path.to_path_buf(),
                    line,
                });
            }
        };
        if let Some(layout) = list::split(chunk.text) {
            // Empty documents may precede the list in its chunk.
            document += count_markers(chunk.text, chunk.content_line - chunk.first_line).max(1);
            let origin = Origin {
                file: &shown,
                document,
                line: Some(chunk.content_line),
                item: None,
            };
            load_list(layout, path, chunk.first_line - 1, origin, inventory)?;
            continue;
        }
        // A chunk is normally one document; empty ones may precede it.
        for doc in serde_yaml::Deserializer::from_str(chunk.text) {
            document += 1;
            let seed = DocumentSeed {
                inventory: &mut *inventory,
                origin: Origin {
                    file: &shown,
                    document,
                    line: Some(chunk.content_line),
                    item: None,
                },
            };
            seed.deserialize(doc)
                .map_err(|err| yaml_error(path, &err, chunk.first_line - 1))?;
        }
    }
}

/// `---` lines among the first `lines` lines of `text`.
fn count_markers(text: &str, lines: usize) -> usize {
    text.lines()
        .take(lines)
        .filter(|l| {
            l.strip_prefix("---")
                .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
        })
        .count()
}

/// A list cut into items: each item is parsed alone, then the rest.
fn load_list(
    layout: ListLayout,
    path: &Path,
    offset: usize,
    origin: Origin,
    inventory: &mut Inventory,
) -> Result<(), SourceError> {
    let mut items = ListItems::new(inventory, origin);
    for item in layout.items {
        let value: Value = serde_yaml::from_str(&item.text)
            .map_err(|err| yaml_error_at(path, &err, offset + item.line, item.indent))?;
        items.push(value, Some(offset + item.line + 1));
    }
    let header: Value =
        serde_yaml::from_str(&layout.header).map_err(|err| yaml_error(path, &err, offset))?;
    let fields = match header {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    items.finish(&fields);
    Ok(())
}

/// A YAML error with its lines counted in the whole file rather than in the
/// document.
fn yaml_error(path: &Path, err: &serde_yaml::Error, offset: usize) -> SourceError {
    yaml_error_at(path, err, offset, 0)
}

/// As [`yaml_error`], for text cut `columns` columns from the left.
fn yaml_error_at(
    path: &Path,
    err: &serde_yaml::Error,
    offset: usize,
    columns: usize,
) -> SourceError {
    let (line, column) = err.location().map_or((offset + 1, 1), |l| {
        (l.line() + offset, l.column() + columns)
    });
    SourceError::Yaml {
        path: path.to_path_buf(),
        line,
        column,
        message: shift_positions(&err.to_string(), offset, columns),
    }
}

/// Adds `lines` to every "line N" and `columns` to every "column N" in
/// `message`.
fn shift_positions(message: &str, lines: usize, columns: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let next = [("line ", lines), ("column ", columns)]
            .into_iter()
            .filter_map(|(word, by)| rest.find(word).map(|at| (at, word, by)))
            .min_by_key(|(at, ..)| *at);
        let Some((at, word, by)) = next else { break };
        let (head, tail) = rest.split_at(at + word.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// A JSON file holds one object or list, read as a stream.
fn load_json(
    reader: impl io::Read,
    path: &Path,
    inventory: &mut Inventory,
) -> Result<(), SourceError> {
    let shown = path.display().to_string();
    let mut de = serde_json::Deserializer::from_reader(reader);
    let seed = DocumentSeed {
        inventory,
        origin: Origin {
            file: &shown,
            document: 1,
            line: None,
            item: None,
        },
    };
    let json_error = |err: serde_json::Error| {
        if err.is_io() {
            SourceError::Io {
                path: path.to_path_buf(),
                source: err.into(),
            }
        } else {
            SourceError::Json {
                path: path.to_path_buf(),
                line: err.line(),
                column: err.column(),
                message: err.to_string(),
            }
        }
    };
    seed.deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("kproxy-src-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            File::create(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
        )
    }

    fn load(paths: &[PathBuf]) -> Result<Inventory, SourceError> {
        let mut inv = Inventory::default();
        load_files(paths, &mut inv).map(|()| inv)
    }

    #[test]
    fn reads_multi_document_files() {
        let dir = TempDir::new("multi");
        let f = dir.file("c.yaml", &format!("{}---\n{}", service("a"), service("b")));
        let inv = load(&[f]).unwrap();
        assert_eq!(inv.services.len(), 2);
    }

    #[test]
    fn reads_directories_in_name_order_and_repeated_paths() {
        let dir = TempDir::new("dir");
        dir.file("b.yml", &service("b"));
        dir.file("a.yaml", &service("a"));
        dir.file(
            "c.json",
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}"#,
        );
        dir.file("notes.txt", "not: [yaml");
        // A later copy of an object replaces an earlier one: `b.yml` is read
        // after `a.yaml`, whatever the directory order.
        let dup = |ip: &str| service("dup").replace("10.96.0.1", ip);
        dir.file("a-dup.yaml", &dup("10.96.0.7"));
        dir.file("b-dup.yaml", &dup("10.96.0.8"));
        let extra = dir.file("extra.yaml", &service("x"));
        let inv = load(&[dir.0.clone(), extra]).unwrap();
        let mut names: Vec<&str> = inv.services.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "dup", "x"]);
        // x twice (the directory holds extra.yaml too), dup twice, the Node.
        assert_eq!(inv.counts.objects, 7);
        let dup = inv.services.iter().find(|s| s.name == "dup").unwrap();
        assert_eq!(
            dup.cluster_ips,
            ["10.96.0.8".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(inv.nodes.len(), 1);
    }

    #[test]
    fn a_yaml_syntax_error_names_file_line_and_column() {
        let dir = TempDir::new("bad");
        let f = dir.file(
            "bad.yaml",
            &format!(
                "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [x\n",
                service("a")
            ),
        );
        let err = load(std::slice::from_ref(&f)).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:", f.display())), "{err}");
        // The broken flow sequence starts on line 8 of the file.
        let SourceError::Yaml { line, .. } = load(&[f]).unwrap_err() else {
            panic!("not a YAML error")
        };
        assert!((8..=9).contains(&line), "line {line}");
    }

    #[test]
    fn a_json_syntax_error_names_file_line_and_column() {
        let dir = TempDir::new("badjson");
        let f = dir.file("bad.json", "{\"kind\": \"List\",\n \"items\": [1,}\n");
        match load(&[f]).unwrap_err() {
            SourceError::Json { line, .. } => assert_eq!(line, 2),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_missing_file_is_an_error() {
        assert!(matches!(
            load(&[PathBuf::from("/nonexistent/kproxy.yaml")]),
            Err(SourceError::Io { .. })
        ));
    }

    #[test]
    fn an_object_of_the_wrong_shape_is_skipped_not_fatal() {
        let dir = TempDir::new("shape");
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: abc}]}\n";
        let f = dir.file("s.yaml", &format!("{bad}---\n{}", service("good")));
        let inv = load(&[f]).unwrap();
        assert_eq!(inv.services.len(), 1);
        assert_eq!(inv.counts.skipped, 1);
    }

    #[test]
    fn positions_in_messages_are_shifted() {
        assert_eq!(
            shift_positions(
                "did not find expected key at line 2 column 5, while parsing a block mapping at line 1 column 1",
                10,
                2
            ),
            "did not find expected key at line 12 column 7, while parsing a block mapping at line 11 column 3"
        );
    }

    #[test]
    fn a_syntax_error_inside_a_list_item_names_its_place_in_the_file() {
        let dir = TempDir::new("badlist");
        let text = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Node\n  metadata: {name: [b}\nkind: List\n";
        let f = dir.file("l.yaml", text);
        match load(&[f]).unwrap_err() {
            SourceError::Yaml {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!(line, 8, "{message}");
                assert!(column > 2, "{column} {message}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn kubectl_lists_are_read_item_by_item() {
        let dir = TempDir::new("list");
        let text = format!(
            "apiVersion: v1\nitems:\n{}{}kind: List\nmetadata:\n  resourceVersion: \"\"\n",
            indent_item(&service("a")),
            indent_item(&service("b"))
        );
        let f = dir.file("l.yaml", &text);
        let inv = load(&[f]).unwrap();
        assert_eq!(inv.services.len(), 2);
    }

    fn indent_item(doc: &str) -> String {
        doc.lines()
            .enumerate()
            .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
            .collect()
    }
}
