//! Running `iptables-save` and `iptables-restore`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;

use crate::Table;
use crate::error::{Error, FailedLine, failing_line_number, tidy_stderr};
use crate::save::ParseError;

/// Seconds `iptables-restore` waits for the xtables lock (`-w`). Only the legacy
/// backend takes that lock, but every other writer on the node (kubelet, CNI
/// plugins, firewalls) shares it there, so kproxy waits rather than failing.
const LOCK_WAIT_SECONDS: &str = "5";

/// How often the legacy backend polls the lock, in microseconds (`-W`). The
/// nf_tables backend ignores this flag and warns about it, so it is only passed
/// to the legacy programs.
const LOCK_POLL_MICROSECONDS: &str = "100000";

/// Which iptables implementation to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft-*`: iptables rules stored as nf_tables objects.
    Nft,
    /// `iptables-legacy-*`: the old in-kernel xtables.
    Legacy,
}

impl Backend {
    fn infix(self) -> &'static str {
        match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        }
    }
}

/// What an [`Iptables`] has run so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    pub restores: u64,
    pub restore_failures: u64,
    pub restore_time: Duration,
    pub saves: u64,
    pub save_time: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    restores: AtomicU64,
    restore_failures: AtomicU64,
    restore_nanos: AtomicU64,
    saves: AtomicU64,
    save_nanos: AtomicU64,
}

/// A program's whole output, as text: what [`Iptables::save`] and
/// [`Iptables::list_table`] return.
fn read_text(out: &mut dyn BufRead) -> Result<String, ParseError> {
    let mut bytes = Vec::new();
    out.read_to_end(&mut bytes).map_err(|e| ParseError {
        line: 0,
        reason: format!("cannot read the output: {e}"),
    })?;
    String::from_utf8(bytes).map_err(|e| ParseError {
        line: 0,
        reason: format!("output is not UTF-8: {e}"),
    })
}

fn add_time(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// The iptables tools of one address family, on the host or inside a network
/// namespace.
#[derive(Debug)]
pub struct Iptables {
    family: IpFamily,
    /// `None` calls the plain `iptables-restore`, whatever the distribution's
    /// alternatives point it at.
    backend: Option<Backend>,
    netns: Option<String>,
    /// `XTABLES_LOCKFILE` for the legacy programs; `None` keeps their default,
    /// `/run/xtables.lock`.
    lock_file: Option<String>,
    counters: Counters,
}

impl Iptables {
    /// The host's tables of `family`, through the plain `iptables-*` /
    /// `ip6tables-*` programs.
    // Choosing the backend from what the node already uses (as kubelet and
    // iptables-wrapper do) belongs here, once kproxy detects it.
    pub fn new(family: IpFamily) -> Self {
        Iptables {
            family,
            backend: None,
            netns: None,
            lock_file: None,
            counters: Counters::default(),
        }
    }

    /// The tables of `family` inside network namespace `name`: every command runs
    /// as `ip netns exec NAME ...`. For tests.
    pub fn in_netns(family: IpFamily, name: impl Into<String>) -> Self {
        Iptables {
            netns: Some(name.into()),
            ..Iptables::new(family)
        }
    }

    /// Calls the programs of one backend explicitly (`iptables-nft-restore`,
    /// `iptables-legacy-restore`, ...).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Takes the xtables lock at `path` instead of `/run/xtables.lock` (the
    /// legacy programs read it from `XTABLES_LOCKFILE`): for a lock mounted
    /// elsewhere, and for tests.
    pub fn with_lock_file(mut self, path: impl Into<String>) -> Self {
        self.lock_file = Some(path.into());
        self
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    fn program(&self, tool: &str) -> String {
        format!("{}-{tool}", self.cli_program())
    }

    /// `iptables`, `ip6tables-legacy`, ...: the one-command program.
    pub fn cli_program(&self) -> String {
        let base = match self.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let infix = self.backend.map_or("", Backend::infix);
        format!("{base}{infix}")
    }

    /// `iptables-save`, `ip6tables-legacy-save`, ...
    pub fn save_program(&self) -> String {
        self.program("save")
    }

    /// `iptables-restore`, `ip6tables-nft-restore`, ...
    pub fn restore_program(&self) -> String {
        self.program("restore")
    }

    /// The arguments kproxy passes to the restore program.
    pub fn restore_args(&self) -> Vec<&'static str> {
        let mut args = vec!["--noflush", "-w", LOCK_WAIT_SECONDS];
        if self.backend == Some(Backend::Legacy) {
            args.extend(["-W", LOCK_POLL_MICROSECONDS]);
        }
        args
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        };
        if let Some(path) = &self.lock_file {
            cmd.env("XTABLES_LOCKFILE", path);
        }
        cmd
    }

    fn spawn_error(&self, program: &str, source: std::io::Error) -> Error {
        // Under `ip netns exec` a missing iptables shows up as a failed exit, so a
        // spawn-time NotFound is about whichever binary was spawned.
        let spawned = if self.netns.is_some() { "ip" } else { program };
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                program: spawned.to_string(),
                source,
            }
        } else {
            Error::Spawn {
                program: spawned.to_string(),
                source,
            }
        }
    }

    /// The output of `iptables-save -t TABLE`.
    pub fn save(&self, table: Table) -> Result<String, Error> {
        self.save_with(table, read_text)
    }

    /// The output of `iptables-save` for every table. The legacy backend is read
    /// this way when probing it: `-t TABLE` would create a missing table.
    pub fn save_all(&self) -> Result<String, Error> {
        let program = self.save_program();
        let output = self
            .command(&program)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(&program, e))?;
        if !output.status.success() {
            return Err(Error::SaveFailed {
                program,
                table: "(all)",
                status: output.status,
                stderr: tidy_stderr(&String::from_utf8_lossy(&output.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `iptables -w 5 -t TABLE -S`: every chain of one table, its rules as
    /// `iptables-save` prints them ([`save::parse_listing`](crate::save::parse_listing)
    /// reads it). Under nf_tables `iptables-save -t TABLE` fetches every table
    /// whichever is asked for, so this is far cheaper for a small table beside
    /// a big one. Counted as a save in [`Iptables::stats`].
    pub fn list_table(&self, table: Table) -> Result<String, Error> {
        self.list_table_with(table, read_text)
    }

    /// [`list_table`](Iptables::list_table), its output handed to `read` as
    /// it comes instead of collected: the nat table of a large node lists
    /// tens of MB. Counted as a save in [`Iptables::stats`].
    pub fn list_table_with<T>(
        &self,
        table: Table,
        read: impl FnOnce(&mut dyn BufRead) -> Result<T, ParseError>,
    ) -> Result<T, Error> {
        let program = self.cli_program();
        let shown = format!("{program} -S");
        self.read_output(
            &program,
            &["-w", LOCK_WAIT_SECONDS, "-t", table.as_str(), "-S"],
            &shown,
            table,
            read,
        )
    }

    /// [`save`](Iptables::save), its output handed to `read` as it comes.
    pub fn save_with<T>(
        &self,
        table: Table,
        read: impl FnOnce(&mut dyn BufRead) -> Result<T, ParseError>,
    ) -> Result<T, Error> {
        let program = self.save_program();
        self.read_output(&program, &["-t", table.as_str()], &program, table, read)
    }

    /// Runs `program args` and hands its standard output to `read` while it
    /// runs. Whatever `read` leaves is drained, so the program always runs
    /// to its end; its failure is reported before `read`'s.
    fn read_output<T>(
        &self,
        program: &str,
        args: &[&str],
        shown: &str,
        table: Table,
        read: impl FnOnce(&mut dyn BufRead) -> Result<T, ParseError>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(program, e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        // stderr on a thread of its own: a chatty program must not block on a
        // full stderr pipe while stdout is being read.
        let (result, stderr, status) = std::thread::scope(|s| {
            let errors = s.spawn(move || {
                let mut text = Vec::new();
                let _ = stderr.read_to_end(&mut text);
                text
            });
            let mut stdout = BufReader::with_capacity(1 << 16, stdout);
            let result = read(&mut stdout);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
            drop(stdout);
            let status = child.wait();
            (
                result,
                errors.join().expect("stderr reader panicked"),
                status,
            )
        });
        let status = status.map_err(|e| self.spawn_error(program, e))?;
        self.counters.saves.fetch_add(1, Ordering::Relaxed);
        add_time(&self.counters.save_nanos, start.elapsed());
        if !status.success() {
            return Err(Error::SaveFailed {
                program: shown.to_string(),
                table: table.as_str(),
                status,
                stderr: tidy_stderr(&String::from_utf8_lossy(&stderr)),
            });
        }
        result.map_err(|e| Error::SaveUnparseable {
            program: shown.to_string(),
            table: table.as_str(),
            line: e.line,
            reason: e.reason,
        })
    }

    /// `iptables -w 5 -t TABLE -S CHAIN`: the chain's `-N`/`-A` lines, or
    /// `None` if the chain (or the table) does not exist. Under nf_tables this
    /// fetches that one chain only, a few milliseconds with 10,000 services
    /// loaded; so it is how the canaries are watched.
    pub fn list_chain(&self, table: Table, chain: &str) -> Result<Option<String>, Error> {
        let program = self.cli_program();
        let output = self
            .command(&program)
            .args(["-w", LOCK_WAIT_SECONDS, "-t", table.as_str(), "-S", chain])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(&program, e))?;
        if output.status.success() {
            return Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()));
        }
        // Exit status 1 is iptables' "other problem": here, no such chain
        // (nf_tables words it "chain ... is incompatible", legacy "No
        // chain/target/match by that name"). A held lock is status 4, a bad
        // argument 2, and `ip netns exec` failing is 255.
        if output.status.code() == Some(1) {
            return Ok(None);
        }
        Err(Error::ListFailed {
            program,
            table: table.as_str(),
            chain: chain.to_string(),
            status: output.status,
            stderr: tidy_stderr(&String::from_utf8_lossy(&output.stderr)),
        })
    }

    /// Feeds `input` (one table's `*table ... COMMIT` block) to
    /// `iptables-restore --noflush`, and returns how long it took. `table` names
    /// the table in errors.
    pub fn restore(&self, table: Table, input: &str) -> Result<Duration, Error> {
        let program = self.restore_program();
        let start = Instant::now();
        let mut child = self
            .command(&program)
            .args(self.restore_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(&program, e))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // Write from another thread: a large input must not block on a full pipe
        // while the child blocks on a full stderr.
        let (written, output) = std::thread::scope(|s| {
            let writer = s.spawn(move || {
                let result = stdin.write_all(input.as_bytes());
                drop(stdin);
                result
            });
            let output = child.wait_with_output();
            (writer.join().expect("stdin writer panicked"), output)
        });
        let output = output.map_err(|e| self.spawn_error(&program, e))?;
        let elapsed = start.elapsed();
        self.counters.restores.fetch_add(1, Ordering::Relaxed);
        add_time(&self.counters.restore_nanos, elapsed);
        if !output.status.success() {
            self.counters
                .restore_failures
                .fetch_add(1, Ordering::Relaxed);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let at = failing_line_number(&stderr).and_then(|n| {
                let text = input.lines().nth(n.checked_sub(1)?)?;
                Some((n, text.to_string()))
            });
            return Err(Error::RestoreFailed {
                program,
                table: table.as_str(),
                status: output.status,
                stderr: tidy_stderr(&stderr),
                at: FailedLine(at),
            });
        }
        // A write error with a successful exit means the input was cut short.
        written.map_err(|source| Error::Spawn { program, source })?;
        Ok(elapsed)
    }

    /// Counts and total times of every save and restore so far.
    pub fn stats(&self) -> ExecStats {
        let c = &self.counters;
        ExecStats {
            restores: c.restores.load(Ordering::Relaxed),
            restore_failures: c.restore_failures.load(Ordering::Relaxed),
            restore_time: Duration::from_nanos(c.restore_nanos.load(Ordering::Relaxed)),
            saves: c.saves.load(Ordering::Relaxed),
            save_time: Duration::from_nanos(c.save_nanos.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_follow_family_and_backend() {
        let v4 = Iptables::new(IpFamily::V4);
        assert_eq!(v4.restore_program(), "iptables-restore");
        assert_eq!(v4.save_program(), "iptables-save");
        let v6 = Iptables::new(IpFamily::V6).with_backend(Backend::Nft);
        assert_eq!(v6.restore_program(), "ip6tables-nft-restore");
        let legacy = Iptables::new(IpFamily::V4).with_backend(Backend::Legacy);
        assert_eq!(legacy.save_program(), "iptables-legacy-save");
        assert_eq!(legacy.cli_program(), "iptables-legacy");
        assert_eq!(v6.cli_program(), "ip6tables-nft");
    }

    #[test]
    fn the_lock_file_reaches_the_programs() {
        let ipt = Iptables::in_netns(IpFamily::V4, "kpt-x").with_lock_file("/tmp/kpt-lock");
        let cmd = ipt.command("iptables-restore");
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(
            env,
            [(
                std::ffi::OsStr::new("XTABLES_LOCKFILE"),
                Some(std::ffi::OsStr::new("/tmp/kpt-lock"))
            )]
        );
        assert_eq!(cmd.get_program(), "ip");
        assert!(
            Iptables::new(IpFamily::V4)
                .command("x")
                .get_envs()
                .next()
                .is_none()
        );
    }

    #[test]
    fn only_legacy_gets_the_poll_interval() {
        let plain = Iptables::new(IpFamily::V4);
        assert_eq!(plain.restore_args(), ["--noflush", "-w", "5"]);
        let legacy = Iptables::new(IpFamily::V4).with_backend(Backend::Legacy);
        assert_eq!(
            legacy.restore_args(),
            ["--noflush", "-w", "5", "-W", "100000"]
        );
    }

    #[test]
    fn a_missing_program_is_reported_as_such() {
        let ipt = Iptables::new(IpFamily::V4);
        let err = ipt.spawn_error(
            "iptables-restore",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(
            matches!(err, Error::NotFound { ref program, .. } if program == "iptables-restore")
        );
    }
}
