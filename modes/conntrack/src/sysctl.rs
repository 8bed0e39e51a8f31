//! The conntrack table's size and timeouts, as kube-proxy sets them once at
//! start-up: `nf_conntrack_max` (and the hash table behind it) and the
//! `net.netfilter.nf_conntrack_*` timeouts.
//!
//! Plain numbers in, files under `/proc/sys` and `/sys` out. Each setting is
//! written only when it differs from the kernel's, and a zero [`Settings`]
//! field leaves its setting alone. A setting that cannot be written does not
//! stop the others: [`Sysctls::apply`] returns what changed and what failed,
//! and the caller decides how loud to be.
//!
//! `nf_conntrack_max` and the hash size are global, owned by the host's
//! (initial) network namespace: elsewhere the kernel makes
//! `nf_conntrack_max` read-only and refuses hash size changes, so both are
//! skipped there, with a [`SysctlError::Global`] if the limit is lower than
//! wanted. The timeouts are per network namespace and are set wherever kproxy
//! runs.
//!
//! The rules are upstream's (`pkg/proxy/conntrack/sysctls.go`, Kubernetes
//! 1.34): the limit is `max_per_core` times the CPUs, at least `min`; the hash
//! size is raised to a quarter of the limit, never lowered.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const NF_CONNTRACK_MAX: &str = "net.netfilter.nf_conntrack_max";
pub const TCP_TIMEOUT_ESTABLISHED: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
pub const TCP_TIMEOUT_CLOSE_WAIT: &str = "net.netfilter.nf_conntrack_tcp_timeout_close_wait";
pub const TCP_BE_LIBERAL: &str = "net.netfilter.nf_conntrack_tcp_be_liberal";
pub const UDP_TIMEOUT: &str = "net.netfilter.nf_conntrack_udp_timeout";
pub const UDP_TIMEOUT_STREAM: &str = "net.netfilter.nf_conntrack_udp_timeout_stream";
/// The hash table's bucket count, a module parameter under `/sys`.
pub const HASHSIZE: &str = "module/nf_conntrack/parameters/hashsize";

/// What to ask of the kernel. A zero (or false) field leaves its setting as
/// the kernel has it; a timeout under a second counts as zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// Conntrack entries per CPU; 0 leaves `nf_conntrack_max` (and `min`)
    /// alone.
    pub max_per_core: u32,
    /// The least `nf_conntrack_max` kproxy sets, whatever the CPU count.
    pub min: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_close_wait_timeout: Duration,
    /// Sets `nf_conntrack_tcp_be_liberal` to 1; false leaves it.
    pub tcp_be_liberal: bool,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

impl Settings {
    /// `nf_conntrack_max` for a machine of `cpus` CPUs: `max_per_core` per
    /// CPU, at least `min`; `None` leaves it alone.
    pub fn conntrack_max(&self, cpus: u32) -> Option<u64> {
        (self.max_per_core > 0)
            .then(|| (u64::from(self.max_per_core) * u64::from(cpus)).max(u64::from(self.min)))
    }

    /// The per-namespace sysctls to set and their values, in the order
    /// kube-proxy sets them.
    pub fn per_netns(&self) -> Vec<(&'static str, u64)> {
        let seconds = |d: Duration| d.as_secs();
        [
            (
                TCP_TIMEOUT_ESTABLISHED,
                seconds(self.tcp_established_timeout),
            ),
            (TCP_TIMEOUT_CLOSE_WAIT, seconds(self.tcp_close_wait_timeout)),
            (TCP_BE_LIBERAL, u64::from(self.tcp_be_liberal)),
            (UDP_TIMEOUT, seconds(self.udp_timeout)),
            (UDP_TIMEOUT_STREAM, seconds(self.udp_stream_timeout)),
        ]
        .into_iter()
        .filter(|(_, value)| *value > 0)
        .collect()
    }
}

/// A setting kproxy changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// A dotted sysctl name, or [`HASHSIZE`].
    pub name: &'static str,
    pub from: u64,
    pub to: u64,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.name, self.from, self.to)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// No `/proc/sys/net/netfilter/nf_conntrack_*` at all.
    #[error("the conntrack sysctls are missing (is the nf_conntrack kernel module loaded?): {0}")]
    NoConntrack(#[source] io::Error),

    #[error("cannot read {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{name} holds {found:?}, not a number")]
    NotANumber { name: &'static str, found: String },

    #[error("cannot set {name} from {from} to {to}: {source}{hint}")]
    Write {
        name: &'static str,
        from: u64,
        to: u64,
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    /// `nf_conntrack_max` is read-only here: not the host's network
    /// namespace. The hash size is left alone too.
    #[error(
        "{NF_CONNTRACK_MAX} left at {current} (wanted {wanted}): it is global, and read-only \
         outside the host's network namespace; the conntrack hash size is left alone too"
    )]
    Global { current: u64, wanted: u64 },
}

/// What [`Sysctls::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    pub changes: Vec<Change>,
    /// The settings left as they were, one error each; the others were
    /// still set.
    pub errors: Vec<SysctlError>,
}

/// How [`Sysctls::set_max`] left `nf_conntrack_max`.
enum Max {
    /// At the wanted value, now or already.
    Holds(Option<Change>),
    /// Read-only here, and high enough: the host's to size, hash table and
    /// all.
    HostsBusiness,
}

impl Applied {
    fn record(&mut self, result: Result<Option<Change>, SysctlError>) {
        match result {
            Ok(change) => self.changes.extend(change),
            Err(err) => self.errors.push(err),
        }
    }
}

/// Reads and writes the conntrack settings under a `/proc/sys` root and a
/// `/sys` root.
#[derive(Clone, Debug)]
pub struct Sysctls {
    proc_sys: PathBuf,
    sys: PathBuf,
}

impl Default for Sysctls {
    fn default() -> Self {
        Sysctls::system()
    }
}

impl Sysctls {
    pub fn system() -> Self {
        Sysctls::with_roots("/proc/sys", "/sys")
    }

    /// Another `/proc/sys` and `/sys` (tests).
    pub fn with_roots(proc_sys: impl Into<PathBuf>, sys: impl Into<PathBuf>) -> Self {
        Sysctls {
            proc_sys: proc_sys.into(),
            sys: sys.into(),
        }
    }

    /// The machine's online CPUs, as `/sys` lists them: all of them, not only
    /// those this process may run on (kube-proxy counts them so too). Falls
    /// back to the CPUs available to the process.
    pub fn cpus(&self) -> u32 {
        std::fs::read_to_string(self.sys.join("devices/system/cpu/online"))
            .ok()
            .and_then(|list| count_cpu_list(&list))
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
    }

    /// Applies `settings` for a machine of [`Sysctls::cpus`] CPUs.
    pub fn apply(&self, settings: &Settings) -> Applied {
        self.apply_for(settings, self.cpus())
    }

    /// Applies `settings` for a machine of `cpus` CPUs: `nf_conntrack_max`
    /// and the hash size first, then the timeouts.
    pub fn apply_for(&self, settings: &Settings, cpus: u32) -> Applied {
        let mut applied = Applied::default();
        let max = settings.conntrack_max(cpus);
        let per_netns = settings.per_netns();
        if max.is_none() && per_netns.is_empty() {
            return applied;
        }
        if let Err(source) = std::fs::metadata(self.proc_sys_path(NF_CONNTRACK_MAX)) {
            applied.errors.push(SysctlError::NoConntrack(source));
            return applied;
        }
        if let Some(max) = max {
            match self.set_max(max) {
                // The hash table is sized for the limit once the limit holds.
                Ok(Max::Holds(change)) => {
                    applied.changes.extend(change);
                    applied.record(self.raise_hashsize(max / 4));
                }
                Ok(Max::HostsBusiness) => {}
                Err(err) => applied.errors.push(err),
            }
        }
        for (name, value) in per_netns {
            applied.record(self.ensure(name, value));
        }
        applied
    }

    /// Sets `nf_conntrack_max`, unless this is not the host's network
    /// namespace (where the kernel makes it read-only). There a limit at
    /// least as high as wanted is left quietly, as kube-proxy does since
    /// 1.37; a lower one is an error.
    fn set_max(&self, wanted: u64) -> Result<Max, SysctlError> {
        let path = self.proc_sys_path(NF_CONNTRACK_MAX);
        let current = read_number(&path, NF_CONNTRACK_MAX)?;
        let read_only = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o222 == 0)
            .unwrap_or(false);
        match (read_only, current >= wanted) {
            (true, true) => Ok(Max::HostsBusiness),
            (true, false) => Err(SysctlError::Global { current, wanted }),
            (false, _) => self.ensure(NF_CONNTRACK_MAX, wanted).map(Max::Holds),
        }
    }

    /// Raises the hash size to `wanted`; never lowers it.
    fn raise_hashsize(&self, wanted: u64) -> Result<Option<Change>, SysctlError> {
        let path = self.sys.join(HASHSIZE);
        let current = read_number(&path, HASHSIZE)?;
        if current >= wanted {
            return Ok(None);
        }
        write_number(&path, HASHSIZE, current, wanted)
    }

    /// Sets the sysctl `name` to `value` unless it has that value already.
    fn ensure(&self, name: &'static str, value: u64) -> Result<Option<Change>, SysctlError> {
        let path = self.proc_sys_path(name);
        let current = read_number(&path, name)?;
        if current == value {
            return Ok(None);
        }
        write_number(&path, name, current, value)
    }

    fn proc_sys_path(&self, name: &str) -> PathBuf {
        name.split('.')
            .fold(self.proc_sys.clone(), |path, part| path.join(part))
    }
}

fn read_number(path: &Path, name: &'static str) -> Result<u64, SysctlError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SysctlError::Read { name, source })?;
    let text = text.trim();
    text.parse().map_err(|_| SysctlError::NotANumber {
        name,
        found: text.to_string(),
    })
}

fn write_number(
    path: &Path,
    name: &'static str,
    from: u64,
    to: u64,
) -> Result<Option<Change>, SysctlError> {
    match std::fs::write(path, to.to_string()) {
        Ok(()) => Ok(Some(Change { name, from, to })),
        Err(source) => Err(SysctlError::Write {
            name,
            from,
            to,
            hint: write_hint(&source),
            source,
        }),
    }
}

fn write_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EROFS) => {
            " (mounted read-only: the container needs a writable /proc/sys and /sys)"
        }
        Some(libc::EOPNOTSUPP) => " (only the host's network namespace may change it)",
        Some(libc::EINVAL) => " (the kernel refuses that value)",
        _ => "",
    }
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    list.split(',').try_fold(0u32, |total, part| {
        let n = match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<u32>().ok()?, last.parse::<u32>().ok()?);
                last.checked_sub(first)? + 1
            }
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
        total.checked_add(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// kube-proxy's defaults.
    fn defaults() -> Settings {
        Settings {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: 24 * HOUR,
            tcp_close_wait_timeout: HOUR,
            ..Settings::default()
        }
    }

    /// A `/proc/sys` and a `/sys` in a temp dir, removed when dropped.
    struct FakeKernel(PathBuf);

    impl FakeKernel {
        fn new(tag: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("kpt-conntrack-sysctl-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let fake = FakeKernel(root);
            for (name, value) in [
                (NF_CONNTRACK_MAX, 65536),
                (TCP_TIMEOUT_ESTABLISHED, 432000),
                (TCP_TIMEOUT_CLOSE_WAIT, 60),
                (TCP_BE_LIBERAL, 0),
                (UDP_TIMEOUT, 30),
                (UDP_TIMEOUT_STREAM, 120),
            ] {
                fake.set(name, value);
            }
            fake.set_hashsize(16384);
            fake
        }

        fn sysctls(&self) -> Sysctls {
            Sysctls::with_roots(self.0.join("proc/sys"), self.0.join("sys"))
        }

        fn set(&self, name: &str, value: u64) {
            let path = self.sysctls().proc_sys_path(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }

        fn set_hashsize(&self, value: u64) {
            let path = self.0.join("sys").join(HASHSIZE);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }

        fn get(&self, name: &str) -> u64 {
            read_number(&self.sysctls().proc_sys_path(name), "test").unwrap()
        }

        fn hashsize(&self) -> u64 {
            read_number(&self.0.join("sys").join(HASHSIZE), "test").unwrap()
        }

        /// Makes `name` read-only, as the kernel does for `nf_conntrack_max`
        /// outside the host's network namespace.
        fn make_read_only(&self, name: &str) {
            let path = self.sysctls().proc_sys_path(name);
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
    }

    impl Drop for FakeKernel {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(applied: &Applied) -> Vec<&'static str> {
        applied.changes.iter().map(|c| c.name).collect()
    }

    #[test]
    fn conntrack_max_scales_with_cpus_above_the_minimum() {
        let s = defaults();
        // 2 CPUs: 65536, below the minimum.
        assert_eq!(s.conntrack_max(2), Some(131072));
        assert_eq!(s.conntrack_max(4), Some(131072));
        assert_eq!(s.conntrack_max(5), Some(163840));
        assert_eq!(s.conntrack_max(64), Some(2_097_152));
        let no_min = Settings { min: 0, ..s };
        assert_eq!(no_min.conntrack_max(1), Some(32768));
        // No per-core value: the limit stays, whatever the minimum says.
        let leave = Settings {
            max_per_core: 0,
            ..s
        };
        assert_eq!(leave.conntrack_max(64), None);
        // No overflow on big machines.
        let huge = Settings {
            max_per_core: u32::MAX,
            ..s
        };
        assert_eq!(huge.conntrack_max(4096), Some(u64::from(u32::MAX) * 4096));
    }

    #[test]
    fn zero_timeouts_and_false_leave_their_sysctl_alone() {
        assert_eq!(
            defaults().per_netns(),
            [
                (TCP_TIMEOUT_ESTABLISHED, 86400),
                (TCP_TIMEOUT_CLOSE_WAIT, 3600)
            ]
        );
        let all = Settings {
            tcp_established_timeout: Duration::from_secs(10800),
            tcp_close_wait_timeout: Duration::from_millis(60_900),
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(45),
            udp_stream_timeout: Duration::from_secs(180),
            ..Settings::default()
        };
        assert_eq!(
            all.per_netns(),
            [
                (TCP_TIMEOUT_ESTABLISHED, 10800),
                // Whole seconds, as kube-proxy truncates them.
                (TCP_TIMEOUT_CLOSE_WAIT, 60),
                (TCP_BE_LIBERAL, 1),
                (UDP_TIMEOUT, 45),
                (UDP_TIMEOUT_STREAM, 180),
            ]
        );
        let sub_second = Settings {
            udp_timeout: Duration::from_millis(500),
            ..Settings::default()
        };
        assert_eq!(sub_second.per_netns(), []);
    }

    #[test]
    fn only_differing_values_are_written_and_reported() {
        let fake = FakeKernel::new("apply");
        let sysctls = fake.sysctls();
        let applied = sysctls.apply_for(&defaults(), 2);
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        assert_eq!(
            names(&applied),
            [
                NF_CONNTRACK_MAX,
                HASHSIZE,
                TCP_TIMEOUT_ESTABLISHED,
                TCP_TIMEOUT_CLOSE_WAIT
            ]
        );
        assert_eq!(
            applied.changes[0].to_string(),
            "net.netfilter.nf_conntrack_max: 65536 -> 131072"
        );
        assert_eq!(fake.get(NF_CONNTRACK_MAX), 131072);
        assert_eq!(fake.hashsize(), 32768, "a quarter of the limit");
        assert_eq!(fake.get(TCP_TIMEOUT_ESTABLISHED), 86400);
        assert_eq!(fake.get(TCP_TIMEOUT_CLOSE_WAIT), 3600);
        // Left alone: zero and false.
        assert_eq!(fake.get(TCP_BE_LIBERAL), 0);
        assert_eq!(fake.get(UDP_TIMEOUT), 30);
        assert_eq!(fake.get(UDP_TIMEOUT_STREAM), 120);

        // A second start has nothing to do.
        let again = sysctls.apply_for(&defaults(), 2);
        assert!(again.changes.is_empty() && again.errors.is_empty());
    }

    #[test]
    fn the_hash_table_only_grows() {
        let fake = FakeKernel::new("hashsize");
        fake.set_hashsize(262144);
        let applied = fake.sysctls().apply_for(&defaults(), 8);
        assert_eq!(fake.get(NF_CONNTRACK_MAX), 262144);
        assert_eq!(fake.hashsize(), 262144, "already more than 262144 / 4");
        assert!(!names(&applied).contains(&HASHSIZE));
        // Checked also when the limit was right already.
        fake.set_hashsize(100);
        let applied = fake.sysctls().apply_for(&defaults(), 8);
        assert_eq!(names(&applied), [HASHSIZE]);
        assert_eq!(fake.hashsize(), 65536);
    }

    #[test]
    fn a_read_only_limit_is_skipped_and_the_rest_still_set() {
        // Outside the host's network namespace.
        let fake = FakeKernel::new("netns");
        fake.make_read_only(NF_CONNTRACK_MAX);
        let applied = fake.sysctls().apply_for(&defaults(), 2);
        assert_eq!(
            names(&applied),
            [TCP_TIMEOUT_ESTABLISHED, TCP_TIMEOUT_CLOSE_WAIT]
        );
        assert!(
            matches!(
                applied.errors[..],
                [SysctlError::Global {
                    current: 65536,
                    wanted: 131072
                }]
            ),
            "{:?}",
            applied.errors
        );
        assert!(
            applied.errors[0]
                .to_string()
                .contains("read-only outside the host's network namespace")
        );
        assert_eq!(fake.get(NF_CONNTRACK_MAX), 65536);
        assert_eq!(fake.hashsize(), 16384, "global too: left alone");
        assert_eq!(fake.get(TCP_TIMEOUT_ESTABLISHED), 86400);

        // A read-only limit that is high enough already is no news.
        fake.set(NF_CONNTRACK_MAX, 131072);
        fake.make_read_only(NF_CONNTRACK_MAX);
        let applied = fake.sysctls().apply_for(&defaults(), 2);
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        assert!(applied.changes.is_empty(), "{:?}", applied.changes);
        assert_eq!(fake.hashsize(), 16384, "the host's to size");
    }

    #[test]
    fn a_failed_write_is_reported_and_the_next_setting_still_set() {
        let fake = FakeKernel::new("fail");
        // A directory where the file should be: reads and writes fail.
        let path = fake.sysctls().proc_sys_path(TCP_TIMEOUT_ESTABLISHED);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(fake.0.join("sys").join(HASHSIZE), "lots").unwrap();
        let applied = fake.sysctls().apply_for(&defaults(), 2);
        assert_eq!(names(&applied), [NF_CONNTRACK_MAX, TCP_TIMEOUT_CLOSE_WAIT]);
        let errors: Vec<String> = applied.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0],
            format!("{HASHSIZE} holds \"lots\", not a number")
        );
        assert!(
            errors[1].starts_with(&format!("cannot read {TCP_TIMEOUT_ESTABLISHED}: ")),
            "{errors:?}"
        );
    }

    #[test]
    fn missing_conntrack_sysctls_are_one_error() {
        let fake = FakeKernel::new("missing");
        std::fs::remove_dir_all(fake.0.join("proc")).unwrap();
        let applied = fake.sysctls().apply_for(&defaults(), 2);
        assert!(applied.changes.is_empty());
        assert!(
            matches!(applied.errors[..], [SysctlError::NoConntrack(_)]),
            "{:?}",
            applied.errors
        );
        assert!(applied.errors[0].to_string().contains("nf_conntrack"));
        // Nothing asked, nothing looked at.
        let applied = fake.sysctls().apply_for(&Settings::default(), 2);
        assert!(applied.errors.is_empty());
    }

    #[test]
    fn cpus_are_counted_from_the_online_list() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a-b"), None);

        let fake = FakeKernel::new("cpus");
        let online = fake.0.join("sys/devices/system/cpu/online");
        std::fs::create_dir_all(online.parent().unwrap()).unwrap();
        std::fs::write(&online, "0-5,7\n").unwrap();
        assert_eq!(fake.sysctls().cpus(), 7);
        std::fs::write(&online, "garbage").unwrap();
        let available = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(fake.sysctls().cpus(), available);
    }
}
