//! Cuts a `kind: List` document, as `kubectl get -o yaml` writes it, into its
//! items, so that each item is parsed on its own. The YAML parser buffers a
//! whole document before handing out any of it, which for a list of a whole
//! cluster costs many times the file's size; items one by one cost one item.
//!
//! Only the block layout kubectl writes is cut: a top-level `items:` key
//! followed by `- ` entries all at one indentation. Anything else, and any
//! document using anchors or aliases (which may cross items), is left whole.

/// A list document's pieces.
#[derive(Debug, PartialEq, Eq)]
pub struct ListLayout {
    /// The document without its items (`items: []`), with the same line count.
    pub header: String,
    pub items: Vec<ListItem>,
}

/// One item, de-indented so it parses alone.
#[derive(Debug, PartialEq, Eq)]
pub struct ListItem {
    pub text: String,
    /// The line of the item's first line, counted from 0 within the document.
    pub line: usize,
    /// How many columns were cut from the left of every line.
    pub indent: usize,
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// `- ...` or a lone `-` at column `at`.
fn is_entry(line: &str, at: usize) -> bool {
    let rest = &line[at..];
    rest.starts_with('-') && rest[1..].starts_with([' ', '\r', '\n']) || rest.trim_end() == "-"
}

/// Anchors (`&a`) and aliases (`*a`) where YAML would read them as such.
fn has_anchors(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.windows(3).any(|w| {
        matches!(w[0], b' ' | b'\n' | b'[' | b'{' | b',')
            && matches!(w[1], b'&' | b'*')
            && !w[2].is_ascii_whitespace()
    })
}

/// The layout of `doc` if it is a list kproxy can cut.
pub fn split(doc: &str) -> Option<ListLayout> {
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let start = lines.iter().position(|l| {
        l.strip_prefix("items:").is_some_and(|rest| {
            rest.trim().is_empty()
                || rest.trim_start().starts_with('#') && rest.starts_with([' ', '\t'])
        })
    })?;
    let first = start + 1 + lines[start + 1..].iter().position(|l| !is_blank(l))?;
    let at = indentation(lines[first]);
    if !is_entry(lines[first], at) || has_anchors(doc) {
        return None;
    }
    let indent = at + 2;

    // Item boundaries: [begin, end) line ranges.
    let mut bounds: Vec<(usize, usize)> = Vec::new();
    let mut end = lines.len();
    for (i, line) in lines.iter().enumerate().skip(first) {
        if is_blank(line) {
            continue;
        }
        let n = indentation(line);
        if n == at && is_entry(line, at) {
            if let Some(last) = bounds.last_mut() {
                last.1 = i;
            }
            bounds.push((i, lines.len()));
        } else if n <= at {
            end = i;
            break;
        } else if n < indent {
            return None;
        }
    }
    if let Some(last) = bounds.last_mut() {
        last.1 = end;
    }
    let mut items = Vec::with_capacity(bounds.len());
    for (begin, stop) in bounds {
        let mut text = String::new();
        for (k, line) in lines[begin..stop].iter().enumerate() {
            if k == 0 {
                // "- key: v" -> "key: v"; the dash is cut like indentation.
                text.push_str(line.get(indent..).unwrap_or("\n"));
            } else if line.len() >= indent && line[..indent].bytes().all(|b| b == b' ') {
                text.push_str(&line[indent..]);
            } else if is_blank(line) {
                text.push('\n');
            } else {
                return None;
            }
        }
        items.push(ListItem {
            text,
            line: begin,
            indent,
        });
    }

    let mut header = String::with_capacity(doc.len() / 64);
    for line in &lines[..start] {
        header.push_str(line);
    }
    header.push_str("items: []\n");
    for _ in start + 1..end {
        header.push('\n');
    }
    for line in &lines[end..] {
        header.push_str(line);
    }
    Some(ListLayout { header, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL: &str = "apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      note: |
        two
        lines
    name: a

- apiVersion: v1
  kind: Node
  metadata: {name: n}
kind: List
metadata:
  resourceVersion: \"\"
";

    #[test]
    fn cuts_kubectl_lists_into_items() {
        let l = split(KUBECTL).unwrap();
        assert_eq!(l.items.len(), 2);
        assert_eq!(
            l.items[0].text,
            "apiVersion: v1\nkind: Service\nmetadata:\n  annotations:\n    note: |\n      two\n      lines\n  name: a\n\n"
        );
        assert_eq!(l.items[0].line, 2);
        assert_eq!(l.items[1].line, 11);
        assert_eq!(l.items[1].indent, 2);
        assert_eq!(
            l.header,
            "apiVersion: v1\nitems: []\n\n\n\n\n\n\n\n\n\n\n\n\nkind: List\nmetadata:\n  resourceVersion: \"\"\n"
        );
        assert_eq!(l.header.lines().count(), KUBECTL.lines().count());
    }

    #[test]
    fn cuts_indented_sequences_too() {
        let l = split("kind: List\nitems:\n  - kind: Node\n    metadata: {name: a}\n  - kind: Node\n    metadata: {name: b}\n").unwrap();
        assert_eq!(l.items.len(), 2);
        assert_eq!(l.items[1].text, "kind: Node\nmetadata: {name: b}\n");
        assert_eq!(l.items[1].indent, 4);
    }

    #[test]
    fn leaves_other_documents_whole() {
        assert_eq!(split("kind: Service\nmetadata: {name: a}\n"), None);
        assert_eq!(split("kind: List\nitems: []\n"), None);
        assert_eq!(split("kind: List\nitems:\nkind: x\n"), None);
        // Anchors may be used across items.
        assert_eq!(split("items:\n- &a {kind: Node}\n- *a\n"), None);
        // A line between the dash and the item's indentation is not kubectl's layout.
        assert_eq!(split("items:\n-   kind: Node\n metadata: {}\n"), None);
    }

    #[test]
    fn every_item_parses_as_the_whole_would() {
        let l = split(KUBECTL).unwrap();
        let whole: serde_json::Value = serde_yaml::from_str(KUBECTL).unwrap();
        for (i, item) in l.items.iter().enumerate() {
            let alone: serde_json::Value = serde_yaml::from_str(&item.text).unwrap();
            assert_eq!(alone, whole["items"][i]);
        }
        let header: serde_json::Value = serde_yaml::from_str(&l.header).unwrap();
        assert_eq!(header["kind"], "List");
    }
}
