//! The kernel modules IPVS mode needs: found loaded or built in, else loaded
//! with `modprobe`.
//!
//! A missing scheduler module would otherwise surface only as an ENOENT from
//! the first virtual server that uses it; checking at start names it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::types::Scheduler;

/// How a module was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// Loaded before kproxy looked.
    Loaded,
    /// Compiled into the kernel.
    Builtin,
    /// kproxy loaded it with modprobe.
    LoadedNow,
}

/// ip_vs, the module of each scheduler in use, and nf_conntrack (IPVS keeps
/// conntrack entries with `net.ipv4.vs.conntrack=1`), in that order.
pub fn required_modules(schedulers: impl IntoIterator<Item = Scheduler>) -> Vec<String> {
    let schedulers: BTreeSet<Scheduler> = schedulers.into_iter().collect();
    let mut modules = vec!["ip_vs".to_string()];
    modules.extend(schedulers.into_iter().map(Scheduler::module));
    modules.push("nf_conntrack".to_string());
    modules
}

/// Where module state is read from, and how modules are loaded.
#[derive(Clone, Debug)]
pub struct Modules {
    /// `/proc/modules`: the loaded modules.
    pub proc_modules: PathBuf,
    /// `/sys/module`: also lists built-in modules that have parameters.
    pub sys_module: PathBuf,
    /// The running kernel's `modules.builtin`.
    pub builtin: PathBuf,
    /// The `modprobe` program.
    pub modprobe: PathBuf,
}

impl Default for Modules {
    fn default() -> Self {
        Modules::system()
    }
}

impl Modules {
    pub fn system() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Modules {
            proc_modules: "/proc/modules".into(),
            sys_module: "/sys/module".into(),
            builtin: PathBuf::from("/lib/modules")
                .join(release.trim())
                .join("modules.builtin"),
            modprobe: "modprobe".into(),
        }
    }

    /// Whether `name` is there already, without loading anything.
    pub fn state(&self, name: &str) -> Option<ModuleState> {
        let name = canonical(name);
        let loaded = std::fs::read_to_string(&self.proc_modules).is_ok_and(|list| {
            list.lines()
                .filter_map(|line| line.split_whitespace().next())
                .any(|module| canonical(module) == name)
        });
        if loaded {
            return Some(ModuleState::Loaded);
        }
        let builtin = std::fs::read_to_string(&self.builtin).is_ok_and(|list| {
            list.lines().any(|line| {
                let file = line.trim().rsplit('/').next().unwrap_or_default();
                file.strip_suffix(".ko")
                    .is_some_and(|module| canonical(module) == name)
            })
        });
        if builtin || self.sys_module.join(&name).is_dir() {
            return Some(ModuleState::Builtin);
        }
        None
    }

    /// Finds `name` or loads it; `Err` carries why it could not be loaded.
    pub fn ensure(&self, name: &str) -> std::result::Result<ModuleState, String> {
        if let Some(state) = self.state(name) {
            return Ok(state);
        }
        let output = Command::new(&self.modprobe)
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.modprobe.display()))?;
        if output.status.success() {
            return Ok(ModuleState::LoadedNow);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.trim();
        Err(if why.is_empty() {
            format!("modprobe {name} failed ({})", output.status)
        } else {
            why.to_string()
        })
    }

    /// Finds or loads every module, logging those it loads. One error names
    /// every module that is missing.
    pub fn ensure_all(&self, names: &[String]) -> Result<Vec<(String, ModuleState)>> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for name in names {
            match self.ensure(name) {
                Ok(state) => {
                    if state == ModuleState::LoadedNow {
                        tracing::info!(module = %name, "loaded kernel module");
                    }
                    found.push((name.clone(), state));
                }
                Err(why) => missing.push(format!("{name} ({why})")),
            }
        }
        if missing.is_empty() {
            Ok(found)
        } else {
            Err(Error::ModulesMissing { missing })
        }
    }
}

/// Module names use `_` and `-` interchangeably; the kernel lists `_`.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        dir: PathBuf,
        modules: Modules,
    }

    impl Fake {
        /// A fake system whose modprobe succeeds for the names in `loadable`.
        fn new(tag: &str, loaded: &str, builtin: &str, loadable: &[&str]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kpt-modules-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("sys/module/nf_nat")).unwrap();
            std::fs::write(dir.join("modules"), loaded).unwrap();
            std::fs::write(dir.join("modules.builtin"), builtin).unwrap();
            let cases: String = loadable
                .iter()
                .map(|m| format!("  {m}) exit 0 ;;\n"))
                .collect();
            let script = format!(
                "#!/bin/sh\ncase \"$1\" in\n{cases}  *) echo \"modprobe: FATAL: Module $1 not found in directory /lib/modules/test\" >&2; exit 1 ;;\nesac\n"
            );
            let modprobe = dir.join("modprobe");
            std::fs::write(&modprobe, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&modprobe, std::fs::Permissions::from_mode(0o755)).unwrap();
            let modules = Modules {
                proc_modules: dir.join("modules"),
                sys_module: dir.join("sys/module"),
                builtin: dir.join("modules.builtin"),
                modprobe,
            };
            Fake { dir, modules }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const PROC_MODULES: &str = "\
ip_vs_rr 12288 1 - Live 0x0000000000000000
ip_vs 200704 3 ip_vs_rr, Live 0x0000000000000000
nf_conntrack 188416 1 ip_vs, Live 0x0000000000000000
";

    #[test]
    fn required_modules_follow_the_schedulers_in_use() {
        assert_eq!(
            required_modules([Scheduler::Sh, Scheduler::Rr, Scheduler::Sh]),
            ["ip_vs", "ip_vs_rr", "ip_vs_sh", "nf_conntrack"]
        );
        assert_eq!(required_modules([]), ["ip_vs", "nf_conntrack"]);
    }

    #[test]
    fn loaded_builtin_and_sys_module_count_as_present() {
        let fake = Fake::new(
            "state",
            PROC_MODULES,
            "kernel/net/netfilter/ipvs/ip_vs_lc.ko\nkernel/drivers/net/dummy.ko\n",
            &[],
        );
        let m = &fake.modules;
        assert_eq!(m.state("ip_vs"), Some(ModuleState::Loaded));
        assert_eq!(m.state("ip-vs-rr"), Some(ModuleState::Loaded));
        assert_eq!(m.state("ip_vs_lc"), Some(ModuleState::Builtin));
        assert_eq!(m.state("nf_nat"), Some(ModuleState::Builtin));
        assert_eq!(m.state("ip_vs_sh"), None);
        // "ip_vs" must not match "ip_vs_rr"'s line by prefix.
        assert_eq!(m.state("ip_v"), None);
    }

    #[test]
    fn missing_modules_are_loaded_or_named() {
        let fake = Fake::new("ensure", PROC_MODULES, "", &["ip_vs_sed"]);
        let wanted = required_modules([Scheduler::Rr, Scheduler::Sed]);
        let found = fake.modules.ensure_all(&wanted).unwrap();
        assert_eq!(
            found,
            [
                ("ip_vs".to_string(), ModuleState::Loaded),
                ("ip_vs_rr".to_string(), ModuleState::Loaded),
                ("ip_vs_sed".to_string(), ModuleState::LoadedNow),
                ("nf_conntrack".to_string(), ModuleState::Loaded),
            ]
        );

        let wanted = required_modules([Scheduler::Nq, Scheduler::Dh]);
        let err = fake.modules.ensure_all(&wanted).unwrap_err().to_string();
        assert!(
            err.contains("ip_vs_dh (modprobe: FATAL: Module ip_vs_dh not found"),
            "{err}"
        );
        assert!(err.contains("ip_vs_nq ("), "{err}");
        assert!(!err.contains("ip_vs ("), "{err}");
    }

    #[test]
    fn no_modprobe_is_a_clear_reason() {
        let mut fake = Fake::new("nomodprobe", "", "", &[]);
        fake.modules.modprobe = fake.dir.join("no-such-modprobe");
        let err = fake.modules.ensure("ip_vs").unwrap_err();
        assert!(err.starts_with("cannot run "), "{err}");
    }
}
