//! Runs kproxy's IPVS tests in a VM.
//!
//! The host kernel has neither IPVS nor dummy links, so these tests boot a
//! distribution kernel (Debian's linux-image-amd64) with virtme-ng over the
//! host's filesystem: the freshly built test binaries are there as they are on
//! the host. A boot costs about half a minute without KVM, so a test file runs
//! all its kernel cases in one boot:
//!
//! ```ignore
//! #[test]
//! fn ipvs_cases_in_vm() {
//!     let Some(tools) = kproxy_vm_runner::vm_or_skip("ipvs_cases_in_vm") else { return };
//!     kproxy_vm_runner::run_ignored_tests_in_vm(&tools, &["in_vm::one", "in_vm::two"], &Default::default());
//! }
//!
//! mod in_vm {
//!     #[test]
//!     #[ignore = "runs inside the VM through ipvs_cases_in_vm"]
//!     fn one() {
//!         if !kproxy_vm_runner::in_vm_or_skip("one") { return }
//!         // ... real kernel work ...
//!     }
//! }
//! ```

mod boot;
mod tools;

use std::time::Duration;

pub use boot::{VmOptions, VmOutput};
pub use tools::{KERNEL_ENV, VmTools, find_tools};

/// Set to 1 inside the guest, for the test cases that must only run there.
pub const IN_VM_ENV: &str = "KPROXY_IN_VM";
/// Set to 1 to skip the VM tests on purpose, even under CI.
pub const SKIP_ENV: &str = "KPROXY_SKIP_VM";

/// Whether this host can boot the test VM.
pub fn vm_available() -> bool {
    find_tools().is_ok()
}

/// The tools for a test that needs the VM, or `None` when it is skipped here
/// (with the reason printed). Missing tools fail the test under CI, where
/// `.ci/run` installs them: a VM test never passes without having run.
pub fn vm_or_skip(test: &str) -> Option<VmTools> {
    if env_flag(SKIP_ENV) {
        eprintln!("{test}: skipped, {SKIP_ENV} is set");
        return None;
    }
    match find_tools() {
        Ok(tools) => Some(tools),
        Err(why) if env_flag("CI") => {
            panic!("{test}: the VM tests cannot run under CI: {why}")
        }
        Err(why) => {
            eprintln!("{test}: skipped, no test VM on this host: {why}");
            None
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Runs `script` with `sh` as root in a fresh VM, the default VM size and the
/// given timeout. Panics when the VM tools are missing: gate on
/// [`vm_or_skip`] first.
pub fn run_in_vm(script: &str, timeout: Duration) -> VmOutput {
    let tools = find_tools().unwrap_or_else(|why| panic!("no test VM: {why}"));
    run_in_vm_with(&tools, script, &VmOptions::with_timeout(timeout))
}

/// Runs `script` with `sh` as root in a fresh VM.
pub fn run_in_vm_with(tools: &VmTools, script: &str, opts: &VmOptions) -> VmOutput {
    boot::run_script(tools, script, opts)
}

/// True inside the test VM. Outside it, says that the in-VM case was skipped:
/// such cases are `#[ignore]`d and run through [`run_ignored_tests_in_vm`].
pub fn in_vm_or_skip(test: &str) -> bool {
    let inside = std::env::var(IN_VM_ENV).is_ok_and(|v| v == "1");
    if !inside {
        eprintln!("{test}: skipped, it runs only inside the test VM ({IN_VM_ENV}=1)");
    }
    inside
}

/// Boots one VM that runs the named `#[ignore]`d tests of the current test
/// binary (exact names, as libtest prints them), one at a time, and panics
/// unless every one of them ran and passed.
pub fn run_ignored_tests_in_vm(tools: &VmTools, tests: &[&str], opts: &VmOptions) -> VmOutput {
    assert!(!tests.is_empty(), "no in-VM tests named");
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = run_in_vm_with(
        tools,
        &ignored_tests_script(&exe.to_string_lossy(), tests),
        opts,
    );
    if let Err(why) = check_tests_passed(&out.stdout, tests) {
        panic!("in-VM tests failed: {why}\n{}", out.describe());
    }
    eprintln!(
        "{} in-VM tests passed in one boot of {:.1?}",
        tests.len(),
        out.elapsed
    );
    out
}

fn ignored_tests_script(exe: &str, tests: &[&str]) -> String {
    let names: Vec<String> = tests.iter().map(|t| shell_quote(t)).collect();
    format!(
        "export {IN_VM_ENV}=1 RUST_BACKTRACE=1\nexec {} --ignored --exact --test-threads=1 {}\n",
        shell_quote(exe),
        names.join(" ")
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Every named test reported `ok` by libtest, and none failed: a misspelled
/// name or a filter that matched nothing is a failure, not a pass.
fn check_tests_passed(stdout: &str, tests: &[&str]) -> Result<(), String> {
    let mut problems = Vec::new();
    for test in tests {
        let ok = format!("test {test} ... ok");
        if !stdout.lines().any(|line| line.trim_end() == ok) {
            problems.push(format!("{test} did not pass"));
        }
    }
    if !stdout.lines().any(|l| l.starts_with("test result: ok.")) {
        problems.push("libtest did not report `test result: ok`".to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_for_the_guest_shell() {
        let script = ignored_tests_script("/work/target/debug/deps/t-1", &["a::b", "it's"]);
        assert!(script.contains("export KPROXY_IN_VM=1"));
        assert!(script.contains(
            "exec '/work/target/debug/deps/t-1' --ignored --exact --test-threads=1 'a::b' 'it'\\''s'"
        ));
    }

    #[test]
    fn every_named_test_must_pass() {
        let stdout = "running 2 tests\ntest in_vm::a ... ok\ntest in_vm::b ... FAILED\n\ntest result: FAILED. 1 passed; 1 failed\n";
        let err = check_tests_passed(stdout, &["in_vm::a", "in_vm::b"]).unwrap_err();
        assert!(err.contains("in_vm::b did not pass"), "{err}");
        assert!(!err.contains("in_vm::a did not"), "{err}");

        let stdout =
            "running 1 test\ntest in_vm::a ... ok\n\ntest result: ok. 1 passed; 0 failed\n";
        assert_eq!(check_tests_passed(stdout, &["in_vm::a"]), Ok(()));
        // A name that matched nothing is not a pass.
        let err = check_tests_passed(stdout, &["in_vm::a", "in_vm::typo"]).unwrap_err();
        assert!(err.contains("in_vm::typo"), "{err}");
    }
}
