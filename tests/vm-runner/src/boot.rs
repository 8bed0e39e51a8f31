//! One VM boot: a shell script runs as root in a virtme-ng guest over the
//! host's filesystem, and its output comes back through a shared directory.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::tools::VmTools;

/// How a VM boots.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// From the boot to the guest's power-off; the VM is killed past it.
    pub timeout: Duration,
    /// One vCPU boots faster than two under TCG (no KVM here), and the host's
    /// two cores are shared with the build.
    pub cpus: u32,
    pub memory_mib: u32,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            timeout: Duration::from_secs(600),
            cpus: 1,
            memory_mib: 1024,
        }
    }
}

impl VmOptions {
    pub fn with_timeout(timeout: Duration) -> Self {
        VmOptions {
            timeout,
            ..VmOptions::default()
        }
    }
}

/// What a guest script did.
#[derive(Debug)]
pub struct VmOutput {
    /// The script's exit status; `None` when it never finished (the VM did not
    /// boot, crashed, or timed out).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// vng's and QEMU's own output: boot errors and kernel panics show here.
    pub console: String,
    /// Wall time of the whole boot, script included.
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Everything a failure message needs.
    pub fn describe(&self) -> String {
        format!(
            "guest status {:?}{} after {:.1?}\n--- guest stdout ---\n{}\n--- guest stderr ---\n{}\n--- vng console (tail) ---\n{}",
            self.status,
            if self.timed_out { " (timed out)" } else { "" },
            self.elapsed,
            self.stdout,
            self.stderr,
            tail(&self.console, 6000),
        )
    }
}

fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Boots the VM, runs `script` with `sh` as root in it, and powers it off.
///
/// Boots are serialized across processes (a file lock): two TCG guests at once
/// would only slow each other down on a two-core machine.
pub fn run_script(tools: &VmTools, script: &str, opts: &VmOptions) -> VmOutput {
    let _lock = BootLock::acquire();
    let dir = ShareDir::new();
    let wrapper = dir.path().join("boot.sh");
    std::fs::write(dir.path().join("script.sh"), script).expect("write the guest script");
    std::fs::write(&wrapper, wrapper_script(dir.path())).expect("write the guest wrapper");
    let console_path = dir.path().join("console");
    let console = File::create(&console_path).expect("create the console file");

    let started = Instant::now();
    let mut child = Command::new(&tools.vng)
        .arg("--run")
        .arg(&tools.kernel)
        .args(["--user", "root", "--disable-kvm"])
        .args(["--cpus", &opts.cpus.to_string()])
        .args(["--memory", &format!("{}M", opts.memory_mib)])
        .arg(format!("--rwdir={}", dir.path().display()))
        .arg("--exec")
        .arg(format!("sh {}", wrapper.display()))
        .stdin(Stdio::null())
        .stdout(console.try_clone().expect("clone the console file"))
        .stderr(console)
        // Its own process group, so a timeout kills QEMU along with vng.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tools.vng.display()));

    let deadline = started + opts.timeout;
    let mut timed_out = false;
    loop {
        match child.try_wait().expect("wait for vng") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                timed_out = true;
                // SAFETY: kill(2) on the process group the child leads; no
                // memory is involved.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break;
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let elapsed = started.elapsed();

    let read = |name: &str| {
        std::fs::read(dir.path().join(name))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    };
    VmOutput {
        status: read("status").trim().parse().ok(),
        stdout: read("stdout"),
        stderr: read("stderr"),
        console: read("console"),
        elapsed,
        timed_out,
    }
}

/// The guest command: vng hands back neither the guest's stderr nor, reliably,
/// a status distinct from its own failures, so both go through files.
fn wrapper_script(dir: &Path) -> String {
    let d = dir.display();
    format!("sh {d}/script.sh >{d}/stdout 2>{d}/stderr </dev/null\necho $? >{d}/status\nsync\n")
}

/// A host directory the guest writes through (`--rwdir`), removed afterwards.
struct ShareDir(PathBuf);

impl ShareDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kproxy-vm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the VM share directory");
        ShareDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShareDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct BootLock(#[allow(dead_code)] File);

impl BootLock {
    fn acquire() -> Self {
        let path = std::env::temp_dir().join("kproxy-vm.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        if file.try_lock().is_err() {
            eprintln!(
                "waiting for another test VM to power off ({})",
                path.display()
            );
            file.lock()
                .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
        }
        BootLock(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        // 'é' is two bytes: a cut inside it moves forward.
        assert_eq!(tail("aéb", 2), "b");
    }

    #[test]
    fn wrapper_records_output_and_status_in_the_share() {
        let script = wrapper_script(Path::new("/tmp/kproxy-vm-1-0"));
        assert!(script.contains(">/tmp/kproxy-vm-1-0/stdout 2>/tmp/kproxy-vm-1-0/stderr"));
        assert!(script.contains("echo $? >/tmp/kproxy-vm-1-0/status"));
    }
}
