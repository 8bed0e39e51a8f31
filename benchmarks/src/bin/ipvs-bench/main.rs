//! IPVS mode against `ipvsadm --restore`, in a kernel that has IPVS:
//!
//! ```text
//! ipvs-bench [SERVICES] [ENDPOINTS] [--rounds N] [--ipvsadm-rounds N] [--changes N]
//!            [--after-flush] [--cpus N] [--memory-mib N] [--timeout SECS] [--kproxy PATH]
//!            [--here]
//! ```
//!
//! Defaults: 10,000 services × 10 endpoints, 3 rounds of each kproxy
//! measurement, 1 of `ipvsadm --restore` (40 s under TCG), 5 endpoint
//! changes; a VM of 2 vCPUs and 2 GiB. The host has no IPVS, so the bench
//! writes its input here, then boots a virtme-ng VM (tests/vm-runner, one VM
//! at a time on the machine) that runs this same binary with `--guest DIR`.
//! `--here` skips the VM, on a kernel that has IPVS.
//!
//! On the host, before the boot: the cluster file (`gen-cluster`'s), and the
//! `ipvsadm -R` input cut from the real binary's `--dry-run --mode ipvs`.
//! In the guest ([`guest`]), each in a network namespace of its own:
//! 1. `ipvsadm --restore` of that input, timed;
//! 2. `kproxy --mode ipvs --from-file` (one-shot apply), timed end to end,
//!    with its phases from its log;
//! 3. the same sync in process: `plan::desired`, `plan::plan` and
//!    `IpvsClient::apply`, each timed;
//! 4. after each, `ipvsadm -Sn` sorted must equal the input sorted;
//! 5. with the set programmed: a restart (dump the kernel, plan: no
//!    operation), then endpoint changes (plan + send);
//! 6. with `--after-flush`: `ipvsadm -C`, then the set again in the same
//!    namespace, by kproxy then by `ipvsadm --restore`.

mod guest;
mod input;
mod kproxy_log;
mod report;
mod sh;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kproxy_benchmarks::ClusterShape;
use kproxy_vm_runner::{VmOptions, find_tools, run_in_vm_with};

use crate::guest::Plan;
use crate::input::Input;

enum Mode {
    /// Prepare the input, then boot the VM.
    Vm,
    /// Prepare the input, then measure on this kernel.
    Here,
    /// Measure, with the input in this directory (inside the VM).
    Guest(PathBuf),
}

struct Args {
    plan: Plan,
    mode: Mode,
    kproxy: PathBuf,
    vm: VmOptions,
}

const USAGE: &str = "usage: ipvs-bench [SERVICES] [ENDPOINTS] [--rounds N] [--ipvsadm-rounds N] \
                     [--changes N] [--after-flush] [--cpus N] [--memory-mib N] [--timeout SECS] \
                     [--kproxy PATH] [--here]";

fn args() -> Result<Args> {
    let mut numbers = Vec::new();
    let mut rounds = 3;
    let mut ipvsadm_rounds = 1;
    let mut changes = 5;
    let mut after_flush = false;
    let mut mode = Mode::Vm;
    let mut kproxy = None;
    let mut vm = VmOptions {
        timeout: Duration::from_secs(3600),
        cpus: 2,
        memory_mib: 2048,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let number = |v: String| -> Result<u32> {
            v.parse()
                .with_context(|| format!("bad number {v:?}\n{USAGE}"))
        };
        match arg.as_str() {
            "--rounds" => rounds = number(value(&arg)?)? as usize,
            "--ipvsadm-rounds" => ipvsadm_rounds = number(value(&arg)?)? as usize,
            "--changes" => changes = number(value(&arg)?)? as usize,
            "--cpus" => vm.cpus = number(value(&arg)?)?,
            "--memory-mib" => vm.memory_mib = number(value(&arg)?)?,
            "--timeout" => vm.timeout = Duration::from_secs(number(value(&arg)?)?.into()),
            "--kproxy" => kproxy = Some(PathBuf::from(value(&arg)?)),
            "--after-flush" => after_flush = true,
            "--here" => mode = Mode::Here,
            "--guest" => mode = Mode::Guest(PathBuf::from(value(&arg)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            n => numbers.push(number(n.to_string())?),
        }
    }
    let shape = ClusterShape {
        services: numbers.first().copied().unwrap_or(10_000),
        endpoints_per_service: numbers.get(1).copied().unwrap_or(10),
        nodes: 50,
    };
    if shape.services < 10 || shape.endpoints_per_service < 2 {
        bail!("need at least 10 services of 2 endpoints\n{USAGE}");
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1: the endpoint changes start from an in-process sync");
    }
    let kproxy = match kproxy {
        Some(path) => path,
        None => exe_dir()?.join("kproxy"),
    };
    Ok(Args {
        plan: Plan {
            shape,
            rounds,
            ipvsadm_rounds,
            changes,
            after_flush,
        },
        mode,
        kproxy,
        vm,
    })
}

fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("this binary's path")?;
    Ok(exe
        .parent()
        .context("this binary's directory")?
        .to_path_buf())
}

fn main() -> Result<()> {
    let args = args()?;
    match &args.mode {
        Mode::Guest(dir) => guest::run(&Input::at(dir, &args.kproxy), &args.plan),
        Mode::Here => {
            let input = prepare(&args)?;
            guest::run(&input, &args.plan)
        }
        Mode::Vm => {
            let input = prepare(&args)?;
            boot(&args, &input)
        }
    }
}

/// Writes the input next to this binary, where the VM reads it (the guest
/// sees the host's filesystem, read-only).
fn prepare(args: &Args) -> Result<Input> {
    if !args.kproxy.is_file() {
        bail!(
            "{} is missing: cargo build --release -p kproxy --bin kproxy",
            args.kproxy.display()
        );
    }
    let shape = args.plan.shape;
    let dir = exe_dir()?.join(format!(
        "ipvs-bench-{}x{}",
        shape.services, shape.endpoints_per_service
    ));
    let input = Input::at(&dir, &args.kproxy);
    input.write(&shape)?;
    Ok(input)
}

fn boot(args: &Args, input: &Input) -> Result<()> {
    let tools = find_tools().map_err(|why| anyhow::anyhow!("no VM on this host: {why}"))?;
    let exe = std::env::current_exe().context("this binary's path")?;
    let plan = &args.plan;
    let script = format!(
        "exec {} --guest {} --kproxy {} {} {} --rounds {} --ipvsadm-rounds {} --changes {}{}\n",
        quote(&exe),
        quote(input.dir()),
        quote(&args.kproxy),
        plan.shape.services,
        plan.shape.endpoints_per_service,
        plan.rounds,
        plan.ipvsadm_rounds,
        plan.changes,
        if plan.after_flush {
            " --after-flush"
        } else {
            ""
        }
    );
    println!(
        "booting {} ({} vCPU, {} MiB, TCG) with vng; the guest's output is in \
         /tmp/kproxy-vm-{}-0/stdout while it runs",
        tools.kernel.display(),
        args.vm.cpus,
        args.vm.memory_mib,
        std::process::id()
    );
    println!("host: {}, load {}", stats::cpu_model(), stats::load());
    let out = run_in_vm_with(&tools, &script, &args.vm);
    print!("{}", out.stdout);
    if !out.success() {
        bail!("the guest run failed\n{}", out.describe());
    }
    eprint!("{}", out.stderr);
    println!(
        "VM boot + run: {:.0} s; host load {} at the end",
        out.elapsed.as_secs_f64(),
        stats::load()
    );
    Ok(())
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
