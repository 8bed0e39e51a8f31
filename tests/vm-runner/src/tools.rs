//! Finding what a VM boot needs on the host: virtme-ng, QEMU, a static busybox
//! for the guest's init, and a kernel image whose modules include IPVS.

use std::path::{Path, PathBuf};

/// Overrides the kernel image the VM boots.
pub const KERNEL_ENV: &str = "KPROXY_VM_KERNEL";

/// What a VM boot needs, found on this host.
#[derive(Clone, Debug)]
pub struct VmTools {
    pub vng: PathBuf,
    pub kernel: PathBuf,
    /// The kernel's release (`uname -r` in the guest): its modules live in
    /// `/lib/modules/<release>` on the shared filesystem.
    pub kernel_release: String,
}

/// Finds the tools, or says everything that is missing and how to install it.
pub fn find_tools() -> Result<VmTools, String> {
    let mut missing = Vec::new();
    let vng = find_in_path("vng");
    if vng.is_none() {
        missing.push("`vng` is not in PATH (pip install virtme-ng)".to_string());
    }
    if find_in_path("qemu-system-x86_64").is_none() {
        missing
            .push("`qemu-system-x86_64` is not in PATH (apt-get install qemu-system-x86)".into());
    }
    // virtme-ng's guest init needs a statically linked busybox.
    if find_in_path("busybox").is_none() {
        missing.push("`busybox` is not in PATH (apt-get install busybox-static)".into());
    }
    let kernel = match std::env::var_os(KERNEL_ENV) {
        Some(path) => kernel_from_override(Path::new(&path)),
        None => find_ipvs_kernel(Path::new("/boot"), Path::new("/lib/modules")),
    };
    let kernel = kernel.map_err(|why| missing.push(why)).ok();
    match (vng, kernel) {
        (Some(vng), Some((kernel, kernel_release))) if missing.is_empty() => Ok(VmTools {
            vng,
            kernel,
            kernel_release,
        }),
        _ => Err(missing.join("; ")),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn kernel_from_override(path: &Path) -> Result<(PathBuf, String), String> {
    let release = release_of(path).ok_or_else(|| {
        format!(
            "{KERNEL_ENV}={} is not a vmlinuz-<release> file",
            path.display()
        )
    })?;
    if !path.is_file() {
        return Err(format!("{KERNEL_ENV}={} does not exist", path.display()));
    }
    Ok((path.to_path_buf(), release))
}

/// The newest `vmlinuz-<release>` in `boot` whose modules tree has IPVS.
///
/// The host's own kernel usually has neither IPVS nor a modules tree here; the
/// distribution kernel package (linux-image-amd64) has both.
pub fn find_ipvs_kernel(boot: &Path, modules: &Path) -> Result<(PathBuf, String), String> {
    let entries = std::fs::read_dir(boot).map_err(|e| {
        format!(
            "cannot list {}: {e} (apt-get install linux-image-amd64)",
            boot.display()
        )
    })?;
    let mut found: Vec<(PathBuf, String)> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter_map(|path| release_of(&path).map(|release| (path, release)))
        .filter(|(_, release)| has_ipvs(&modules.join(release)))
        .collect();
    found.sort_by_key(|(_, release)| version_key(release));
    found.pop().ok_or_else(|| {
        format!(
            "no {}/vmlinuz-* has IPVS modules under {} (apt-get install linux-image-amd64)",
            boot.display(),
            modules.display()
        )
    })
}

fn release_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let release = name.strip_prefix("vmlinuz-")?;
    (!release.is_empty()).then(|| release.to_string())
}

/// Whether a modules tree has ip_vs, as a module (any compression) or built in.
fn has_ipvs(tree: &Path) -> bool {
    let as_module = std::fs::read_dir(tree.join("kernel/net/netfilter/ipvs")).is_ok_and(|dir| {
        dir.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("ip_vs.ko"))
    });
    as_module
        || std::fs::read_to_string(tree.join("modules.builtin"))
            .is_ok_and(|list| list.lines().any(|l| l.ends_with("/ip_vs.ko")))
}

/// Orders releases numerically: 6.1.0-9 before 6.1.0-56.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(u64::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("kpt-vm-tools-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn picks_the_newest_kernel_that_has_ipvs() {
        let scratch = Scratch::new("pick");
        let (boot, modules) = (scratch.0.join("boot"), scratch.0.join("modules"));
        // The host's kernel: no modules tree.
        touch(&boot.join("vmlinuz-6.18.44-host"));
        touch(&boot.join("vmlinuz-6.1.0-9-amd64"));
        touch(&modules.join("6.1.0-9-amd64/kernel/net/netfilter/ipvs/ip_vs.ko.xz"));
        touch(&boot.join("vmlinuz-6.1.0-56-amd64"));
        touch(&modules.join("6.1.0-56-amd64/kernel/net/netfilter/ipvs/ip_vs.ko"));
        // Newest, but its modules lack IPVS.
        touch(&boot.join("vmlinuz-6.2.0-1-amd64"));
        touch(&modules.join("6.2.0-1-amd64/kernel/net/core/pktgen.ko"));
        touch(&boot.join("config-6.1.0-56-amd64"));

        let (path, release) = find_ipvs_kernel(&boot, &modules).unwrap();
        assert_eq!(release, "6.1.0-56-amd64");
        assert_eq!(path, boot.join("vmlinuz-6.1.0-56-amd64"));
    }

    #[test]
    fn builtin_ipvs_counts() {
        let scratch = Scratch::new("builtin");
        let (boot, modules) = (scratch.0.join("boot"), scratch.0.join("modules"));
        touch(&boot.join("vmlinuz-6.6.0"));
        std::fs::create_dir_all(modules.join("6.6.0")).unwrap();
        std::fs::write(
            modules.join("6.6.0/modules.builtin"),
            "kernel/net/netfilter/ipvs/ip_vs.ko\n",
        )
        .unwrap();
        assert_eq!(find_ipvs_kernel(&boot, &modules).unwrap().1, "6.6.0");
    }

    #[test]
    fn no_ipvs_kernel_is_an_error_naming_the_package() {
        let scratch = Scratch::new("none");
        touch(&scratch.0.join("boot/vmlinuz-6.18.44-host"));
        let err =
            find_ipvs_kernel(&scratch.0.join("boot"), &scratch.0.join("modules")).unwrap_err();
        assert!(err.contains("linux-image-amd64"), "{err}");
    }

    #[test]
    fn releases_order_numerically() {
        assert!(version_key("6.1.0-9-amd64") < version_key("6.1.0-56-amd64"));
        assert!(version_key("5.10.0-30-amd64") < version_key("6.1.0-1-amd64"));
    }
}
