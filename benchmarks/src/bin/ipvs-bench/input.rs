//! The bench's input: the cluster file and the same virtual servers as
//! `ipvsadm -R` input, both from the real binary's point of view.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use kproxy_benchmarks::ClusterShape;

/// The node `gen-cluster` writes, which kproxy is told it runs as.
pub const NODE: &str = "node-0";
/// The pod range of `gen-cluster`'s endpoints, as `desired_state` has it.
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";

pub struct Input {
    dir: PathBuf,
    kproxy: PathBuf,
}

impl Input {
    pub fn at(dir: &Path, kproxy: &Path) -> Self {
        Input {
            dir: dir.to_path_buf(),
            kproxy: kproxy.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kproxy(&self) -> &Path {
        &self.kproxy
    }

    /// `gen-cluster`'s output.
    pub fn cluster(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    /// The virtual servers in `ipvsadm -Sn` form, `ipvsadm -R` input.
    pub fn restore(&self) -> PathBuf {
        self.dir.join("restore.ipvsadm")
    }

    /// Writes both files: the cluster, and the virtual-server section of
    /// `kproxy --dry-run --mode ipvs` on it without its `#` lines.
    pub fn write(&self, shape: &ClusterShape) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let mut out = BufWriter::new(File::create(self.cluster())?);
        shape.write_yaml(&mut out)?;
        out.flush()?;
        drop(out);

        let dry = Command::new(&self.kproxy)
            .args(["--mode", "ipvs", "--dry-run", "--hostname-override", NODE])
            .args(["--cluster-cidr", CLUSTER_CIDR, "--from-file"])
            .arg(self.cluster())
            .output()
            .with_context(|| format!("run {}", self.kproxy.display()))?;
        ensure!(
            dry.status.success(),
            "kproxy --dry-run failed: {}",
            String::from_utf8_lossy(&dry.stderr)
        );
        let restore = restore_section(&String::from_utf8_lossy(&dry.stdout))?;
        let servers = restore.lines().filter(|l| l.starts_with("-A ")).count();
        let dests = restore.lines().filter(|l| l.starts_with("-a ")).count();
        let want = (shape.services as usize) * (shape.endpoints_per_service as usize);
        ensure!(
            servers == shape.services as usize && dests == want,
            "the dry run has {servers} virtual servers and {dests} destinations, not {} and {want}",
            shape.services
        );
        std::fs::write(self.restore(), restore)?;
        println!(
            "input: {} ({servers} virtual servers, {dests} destinations) in {}",
            self.restore().display(),
            self.dir.display()
        );
        Ok(())
    }
}

/// The IPv4 virtual servers of a `--dry-run --mode ipvs` output, `#` lines
/// dropped: what `ipvsadm -R` reads.
pub fn restore_section(dry_run: &str) -> Result<String> {
    let mut lines = dry_run.lines();
    if !lines
        .by_ref()
        .any(|l| l.starts_with("# IPv4 virtual servers"))
    {
        bail!("no IPv4 virtual-server section in the dry run");
    }
    let mut out = String::new();
    for line in lines {
        if line.starts_with("# IPv4 kube-ipvs0 addresses") {
            return Ok(out);
        }
        if !line.starts_with('#') && !line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    bail!("the dry run's virtual-server section does not end")
}

/// The lines of an `ipvsadm -Sn` listing, sorted, for an order-free compare.
pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    lines.sort_unstable();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRY: &str = "# kproxy --dry-run --mode ipvs: IPv4
# IPv4 virtual servers (ipvsadm -Sn; drop the # lines for ipvsadm -R)
# ns-0/svc-0:http cluster IP: scheduler rr (default, --ipvs-scheduler)
-A -t 10.96.0.10:80 -s rr
-a -t 10.96.0.10:80 -r 10.128.0.2:8080 -m -w 1
# ns-1/svc-1:http cluster IP: scheduler rr (default, --ipvs-scheduler)
-A -t 10.96.0.11:80 -s rr
-a -t 10.96.0.11:80 -r 10.128.0.4:8080 -m -w 1
# IPv4 kube-ipvs0 addresses
10.96.0.10/32
# IPv4 ipsets (ipset restore)
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536
";

    #[test]
    fn the_restore_input_is_the_server_section_without_comments() {
        assert_eq!(
            restore_section(DRY).unwrap(),
            "-A -t 10.96.0.10:80 -s rr\n-a -t 10.96.0.10:80 -r 10.128.0.2:8080 -m -w 1\n\
             -A -t 10.96.0.11:80 -s rr\n-a -t 10.96.0.11:80 -r 10.128.0.4:8080 -m -w 1\n"
        );
    }

    #[test]
    fn a_dry_run_without_the_sections_is_refused() {
        assert!(restore_section("# IPv4 kube-ipvs0 addresses\n").is_err());
        let cut = DRY.split("# IPv4 kube-ipvs0").next().unwrap();
        assert!(restore_section(cut).is_err());
    }

    #[test]
    fn listings_compare_in_any_order() {
        assert_eq!(
            sorted_lines("-a -t b\n-A -t a  \n\n"),
            sorted_lines("-A -t a\n-a -t b\n")
        );
        assert_ne!(sorted_lines("-A -t a\n"), sorted_lines("-A -t b\n"));
    }
}
