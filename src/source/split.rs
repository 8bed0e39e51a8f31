//! Cuts a YAML stream into its documents by their `---` / `...` marker lines,
//! so that each document is parsed on its own and a large file never sits in
//! memory whole. YAML forbids those markers at the start of a line inside a
//! document, so a marker line always separates documents.

use std::io::{self, BufRead};

/// One document's text.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub text: &'a str,
    /// The line (from 1) of the first line of `text` in the stream.
    pub first_line: usize,
    /// The line of the document's first content line.
    pub content_line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("line {0} is not UTF-8 text")]
    Utf8(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// `---`, with content after it on the same line or not.
    Start {
        content: bool,
    },
    /// `...`
    End,
    /// `%YAML ...`, `%TAG ...`: belongs to the next document.
    Directive,
    /// Empty or a comment.
    Blank,
    Content,
}

fn classify(line: &str) -> Line {
    let marker = |m: &str| {
        line.strip_prefix(m)
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    if let Some(rest) = marker("---") {
        let rest = rest.trim();
        return Line::Start {
            content: !rest.is_empty() && !rest.starts_with('#'),
        };
    }
    if marker("...").is_some() {
        return Line::End;
    }
    if line.starts_with('%') {
        return Line::Directive;
    }
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        Line::Blank
    } else {
        Line::Content
    }
}

pub struct Splitter<R> {
    reader: R,
    buf: Vec<u8>,
    chunk: String,
    /// Lines read so far.
    line_no: usize,
    /// A line read that belongs to the next document, with its number.
    carry: Option<(String, usize)>,
}

impl<R: BufRead> Splitter<R> {
    pub fn new(reader: R) -> Self {
        Splitter {
            reader,
            buf: Vec::new(),
            chunk: String::new(),
            line_no: 0,
            carry: None,
        }
    }

    /// The next document holding any content; `None` at the end.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk<'_>>, SplitError> {
        self.chunk.clear();
        let mut first_line = self.line_no + 1;
        let mut content_line = 0;
        if let Some((line, no)) = self.carry.take() {
            first_line = no;
            if classify(&line) == (Line::Start { content: true }) {
                content_line = no;
            }
            self.chunk.push_str(&line);
        }
        loop {
            self.buf.clear();
            if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
                if content_line == 0 {
                    return Ok(None);
                }
                break;
            }
            self.line_no += 1;
            let line =
                std::str::from_utf8(&self.buf).map_err(|_| SplitError::Utf8(self.line_no))?;
            let has_content = content_line != 0;
            match classify(line) {
                Line::Start { .. } | Line::Directive if has_content => {
                    self.carry = Some((line.to_string(), self.line_no));
                    break;
                }
                Line::Start { content } => {
                    self.chunk.push_str(line);
                    if content {
                        content_line = self.line_no;
                    }
                }
                Line::End if has_content => {
                    self.chunk.push_str(line);
                    break;
                }
                Line::End => {
                    self.chunk.clear();
                    first_line = self.line_no + 1;
                }
                Line::Directive | Line::Blank => self.chunk.push_str(line),
                Line::Content => {
                    self.chunk.push_str(line);
                    if !has_content {
                        content_line = self.line_no;
                    }
                }
            }
        }
        Ok(Some(Chunk {
            text: &self.chunk,
            first_line,
            content_line,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<(String, usize, usize)> {
        let mut s = Splitter::new(text.as_bytes());
        let mut out = Vec::new();
        while let Some(c) = s.next_chunk().unwrap() {
            out.push((c.text.to_string(), c.first_line, c.content_line));
        }
        out
    }

    #[test]
    fn splits_on_document_markers() {
        let docs = split("a: 1\n---\nb: 2\n--- # c\n\nc: 3\n...\nd: 4\n");
        assert_eq!(
            docs,
            vec![
                ("a: 1\n".into(), 1, 1),
                ("---\nb: 2\n".into(), 2, 3),
                ("--- # c\n\nc: 3\n...\n".into(), 4, 6),
                ("d: 4\n".into(), 8, 8),
            ]
        );
    }

    #[test]
    fn empty_documents_and_comments_do_not_make_chunks() {
        let docs = split("# header\n---\n---\n# only a comment\n---\nx: 1");
        assert_eq!(
            docs,
            vec![(
                "# header\n---\n---\n# only a comment\n---\nx: 1".into(),
                1,
                6
            )]
        );
        assert!(split("").is_empty());
        assert!(split("---\n# nothing\n").is_empty());
    }

    #[test]
    fn directives_go_with_the_next_document() {
        let docs = split("a: 1\n...\n%YAML 1.2\n---\nb: 2\n");
        assert_eq!(docs[1], ("%YAML 1.2\n---\nb: 2\n".into(), 3, 5));
    }

    #[test]
    fn inline_content_after_the_marker_counts() {
        let docs = split("a: 1\n--- {b: 2}\n");
        assert_eq!(docs[1], ("--- {b: 2}\n".into(), 2, 2));
    }

    #[test]
    fn markers_need_a_separator() {
        // "----" and "---x" are plain content, not markers.
        let docs = split("a: |\n  ----\nb: ---x\n");
        assert_eq!(docs.len(), 1);
    }

    #[test]
    fn non_utf8_is_an_error_with_its_line() {
        let mut s = Splitter::new(&b"a: 1\nb: \xff\n"[..]);
        assert!(matches!(s.next_chunk(), Err(SplitError::Utf8(2))));
    }
}
