//! What can go wrong between kproxy and the iptables tools.

use std::fmt;
use std::io;
use std::process::ExitStatus;

/// An error from running `iptables-save` or `iptables-restore`, or from reading
/// what they print.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program is not installed (or not on `PATH`).
    #[error("{program} not found: is iptables installed? ({source})")]
    NotFound { program: String, source: io::Error },

    /// The program exists but could not be started or fed.
    #[error("could not run {program}: {source}")]
    Spawn { program: String, source: io::Error },

    /// `iptables-restore` refused a transaction. Nothing of that transaction was
    /// applied: iptables-restore commits a table atomically.
    #[error("{program} failed ({status}) in the {table} table{at}: {stderr}")]
    RestoreFailed {
        program: String,
        table: &'static str,
        status: ExitStatus,
        stderr: String,
        at: FailedLine,
    },

    /// `iptables-save` exited with an error.
    #[error("{program} -t {table} failed ({status}): {stderr}")]
    SaveFailed {
        program: String,
        table: &'static str,
        status: ExitStatus,
        stderr: String,
    },

    /// `iptables -S CHAIN` failed for another reason than a missing chain.
    #[error("{program} -t {table} -S {chain} failed ({status}): {stderr}")]
    ListFailed {
        program: String,
        table: &'static str,
        chain: String,
        status: ExitStatus,
        stderr: String,
    },

    /// `iptables-save` printed something kproxy does not understand.
    #[error("cannot read {program} -t {table} output, line {line}: {reason}")]
    SaveUnparseable {
        program: String,
        table: &'static str,
        line: usize,
        reason: String,
    },
}

/// The line of restore input iptables complained about, if it named one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailedLine(pub Option<(usize, String)>);

impl FailedLine {
    pub fn number(&self) -> Option<usize> {
        self.0.as_ref().map(|(n, _)| *n)
    }

    pub fn text(&self) -> Option<&str> {
        self.0.as_ref().map(|(_, t)| t.as_str())
    }
}

impl fmt::Display for FailedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some((n, text)) => write!(f, " at input line {n} `{text}`"),
            None => Ok(()),
        }
    }
}

impl Error {
    /// For a failed restore: the number and text of the input line iptables
    /// named.
    pub fn failed_line(&self) -> Option<(usize, &str)> {
        match self {
            Error::RestoreFailed { at, .. } => at.0.as_ref().map(|(n, t)| (*n, t.as_str())),
            _ => None,
        }
    }
}

/// Finds the input line a failed restore names. iptables reports parse errors as
/// `Error occurred at line: N` and, under nf_tables, commit errors as
/// `line N: CHAIN_DEL failed (...)`. Lines count from 1.
pub(crate) fn failing_line_number(stderr: &str) -> Option<usize> {
    for line in stderr.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Error occurred at line:")
            && let Ok(n) = rest.trim().parse()
        {
            return Some(n);
        }
        if let Some(rest) = line.strip_prefix("line ")
            && let Some((n, _)) = rest.split_once(':')
            && let Ok(n) = n.trim().parse()
        {
            return Some(n);
        }
        // A rule that fails to apply (a `-D` of a rule that is not there):
        // `iptables-restore: line N failed: Bad rule ...`.
        if let Some((_, rest)) = line.split_once(": line ")
            && let Some((n, _)) = rest.split_once(" failed")
            && let Ok(n) = n.trim().parse()
        {
            return Some(n);
        }
    }
    None
}

/// Keeps what iptables said about the failure and drops its usage hint and
/// deprecation chatter, on one line.
pub(crate) fn tidy_stderr(stderr: &str) -> String {
    let kept: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("Try `")
                && !l.starts_with("Ignoring deprecated")
                && !l.starts_with("Error occurred at line:")
        })
        .collect();
    if kept.is_empty() {
        "(no message)".to_string()
    } else {
        kept.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_line_of_a_parse_error() {
        let stderr = "iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"\n\
                      Error occurred at line: 4\n\
                      Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        assert_eq!(failing_line_number(stderr), Some(4));
        assert_eq!(
            tidy_stderr(stderr),
            "iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\""
        );
    }

    #[test]
    fn finds_the_line_of_a_commit_error() {
        let stderr = "iptables-restore v1.8.9 (nf_tables): \n\
                      line 2: CHAIN_DEL failed (Device or resource busy): chain KUBE-Z\n";
        assert_eq!(failing_line_number(stderr), Some(2));
    }

    #[test]
    fn finds_the_line_of_a_rule_that_does_not_apply() {
        let stderr = "iptables-restore: line 15 failed: Bad rule (does a matching rule exist in that chain?).\n";
        assert_eq!(failing_line_number(stderr), Some(15));
    }

    #[test]
    fn no_line_when_none_is_named() {
        assert_eq!(
            failing_line_number("Another app is currently holding the xtables lock"),
            None
        );
    }

    #[test]
    fn restore_error_names_the_line() {
        use std::os::unix::process::ExitStatusExt;
        let err = Error::RestoreFailed {
            program: "iptables-restore".into(),
            table: "nat",
            status: ExitStatus::from_raw(2 << 8),
            stderr: "unknown option \"--bogus\"".into(),
            at: FailedLine(Some((4, "-A KUBE-Y -p tcp --bogus 1 -j RETURN".into()))),
        };
        let text = err.to_string();
        assert!(
            text.contains("at input line 4 `-A KUBE-Y -p tcp --bogus 1 -j RETURN`"),
            "{text}"
        );
        assert!(
            text.contains("failed (exit status: 2) in the nat table"),
            "{text}"
        );
        assert_eq!(
            err.failed_line(),
            Some((4, "-A KUBE-Y -p tcp --bogus 1 -j RETURN"))
        );
    }
}
