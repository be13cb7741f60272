//! `cargo xtask bench`: what mirroring a VM costs its datapath with vmsniff and with what an
//! operator would use instead (no mirror, tc mirred, an OVS mirror, an AF_PACKET relay), on the
//! same traffic, alternated round by round; and what vmsniff's filters cost per frame. Writes
//! BENCHMARKS.md and BENCHMARKS.png. A command, not a test: nothing here asserts a time.
//!
//! Two parts: this kernel (a Linux bridge; VXLAN as the tunnel, since it has no ip_gre; no OVS,
//! since it has no openvswitch module), and Debian's 6.1 under QEMU (Open vSwitch's kernel
//! datapath and GRE), where the command runs itself with `--guest` and prints its results as
//! one JSON line on the console.
mod chart;
mod configs;
mod filters;
mod measure;
mod relay;
mod report;
mod scene;
mod traffic;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use measure::{Part, Plan};
use scene::{Switch, Tunnel};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds per configuration; the tables show median, min and max (default 5, --quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// This kernel only: skip the Debian 6.1 guest (GRE, Open vSwitch) under QEMU.
    #[arg(long)]
    host_only: bool,
    /// A short run to try the command: one round of 1-second runs, one load step, fewer
    /// filter frames. Its BENCHMARKS.md says so.
    #[arg(long)]
    quick: bool,
    /// Run the guest part and print its results (the command passes this to itself in QEMU).
    #[arg(long, hide = true)]
    guest: bool,
}

/// Printed before the guest part's JSON on the console.
const RESULT_PREFIX: &str = "vmsniff-bench-result: ";
const GUEST_KERNEL: &str = "6.1";

impl BenchArgs {
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 5 })
    }

    fn plan(&self, guest: bool) -> Plan {
        match (self.quick, guest) {
            (true, _) => Plan { rounds: self.rounds(), secs: 1, loads: &[0.5] },
            (false, false) => Plan { rounds: self.rounds(), secs: 2, loads: &[0.25, 0.5, 0.75] },
            // The emulated CPU makes every step slow: one load fewer keeps the guest's part
            // within minutes.
            (false, true) => Plan { rounds: self.rounds(), secs: 2, loads: &[0.25, 0.5] },
        }
    }

    /// The arguments for the guest's own run.
    fn guest_args(&self) -> Vec<String> {
        let mut args =
            vec!["bench".to_owned(), "--guest".to_owned(), "--rounds".to_owned(), self.rounds().to_string()];
        if self.quick {
            args.push("--quick".into());
        }
        args
    }
}

pub fn run(args: BenchArgs, workspace: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    if args.rounds() == 0 {
        bail!("--rounds must be at least 1");
    }
    catch_interrupts()?;
    let vmsniff = crate::demo::vmsniff_binary(workspace);
    if args.guest {
        let part = measure::run(&args.plan(true), Switch::Ovs, Tunnel::Gre, &vmsniff)?;
        println!("{RESULT_PREFIX}{}", serde_json::to_string(&part)?);
        return Ok(());
    }
    crate::setup::run()?;
    crate::test::cargo(workspace, &["build", "-p", "vmsniff-user"])?;
    let started = Instant::now();
    let load_before = loadavg();

    eprintln!("\n==> this kernel: Linux bridge, VXLAN");
    let host = measure::run(&args.plan(false), Switch::Bridge, Tunnel::Vxlan, &vmsniff)?;
    eprintln!("\n==> this kernel: vmsniff's filters");
    let filter_frames = if args.quick { 2_000 } else { filters::FRAMES };
    let filter_samples = filters::run(args.rounds(), filter_frames, &vmsniff)?;
    let guest = if args.host_only {
        None
    } else {
        eprintln!("\n==> Debian {GUEST_KERNEL} under QEMU: Open vSwitch, GRE");
        Some(guest_part(&args)?)
    };
    let load_after = loadavg();

    let mut out = String::new();
    let command = format!(
        "cargo xtask bench{}{}",
        if args.quick { " --quick" } else { "" },
        if args.host_only { " --host-only" } else { "" }
    );
    let load = format!(
        "The machine was shared while this ran (load average {load_before} before, {load_after} after; \
         the whole run took {:.0} min).{}",
        started.elapsed().as_secs_f64() / 60.0,
        if args.quick { " **A --quick run: one round of short runs, not for comparison.**" } else { "" }
    );
    report::header(&mut out, &command, &load, args.rounds())?;
    out.push_str(
        "![VM throughput relative to no mirror; delivery ratio by offered load](BENCHMARKS.png)\n\n",
    );
    report::part(&mut out, "This kernel", &host, true)?;
    match &guest {
        Some(guest) => report::part(
            &mut out,
            &format!("Debian {GUEST_KERNEL} under QEMU (emulated CPU: ratios only)"),
            guest,
            false,
        )?,
        None => out.push_str("The guest part (GRE, Open vSwitch) was skipped (`--host-only`).\n\n"),
    }
    filters::section(&mut out, args.rounds(), filter_frames, &filter_samples)?;
    out.push_str(LIMITS);
    std::fs::write(workspace.join("BENCHMARKS.md"), &out).context("writing BENCHMARKS.md")?;
    let mut parts = vec![("this kernel", &host)];
    if let Some(guest) = &guest {
        parts.push(("6.1 guest", guest));
    }
    chart::draw(&workspace.join("BENCHMARKS.png"), &parts)?;
    print!("{out}");
    eprintln!("bench: BENCHMARKS.md and BENCHMARKS.png written in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What the numbers can and cannot say, below the tables.
const LIMITS: &str = "## What this machine can and cannot show\n\n\
- It is a VM itself (nested virtualisation) with 2 CPUs, shared with other work: absolute numbers \
  are noisy and far below a compute node's; compare rows within a table, and read min–max.\n\
- The VM is a veth standing in for a tap: a real VM's frames come through vhost-net or QEMU, \
  whose costs are the same for every configuration and not measured here. A real VM with \
  virtio-net TSO hands the tap 64 KiB frames, with which per-frame costs weigh less per byte.\n\
- This kernel has no ip_gre and no openvswitch module: its part tunnels over VXLAN, and vmsniff \
  copies `--to-dev` into the VXLAN device, as tc mirred and the relay do; (b') is vmsniff with \
  its own VXLAN devices (`--encap vxlan`, one per direction), the row beside the guest's GRE \
  (b). OVS, and GRE for every \
  configuration, run in Debian's 6.1 kernel under QEMU with TCG: an emulated CPU, tens of times \
  slower than the host and unevenly so, hence ratios to (a) only. Code runs slowly the first \
  time TCG translates it, and the other engineers' QEMU guests share the host's CPUs: single \
  rounds there can be far off (see min–max); the medians are what to read.\n\
- The relay is a Rust AF_PACKET loop (2 MiB receive buffer, tcpdump's default), one `recv` and \
  one `send` per frame: the least a tcpdump-based relay does, so its cost here is a lower bound.\n\
- CPU per frame counts all CPUs' system, IRQ and softirq time: other people's work on a shared \
  machine adds to every row alike in expectation, but not per round. The collector is on the same \
  machine, so a mirror's row also pays for receiving and decapsulating its copies there.\n";

/// Boots the guest kernel, runs the guest part there and reads its result from the console.
fn guest_part(args: &BenchArgs) -> anyhow::Result<Part> {
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let mut child = Command::new(&xtask)
        .args(["vm-run", "--kernel", GUEST_KERNEL, "--timeout", "2400", "--"])
        .arg(&xtask)
        .args(args.guest_args())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the VM harness")?;
    let console = child.stdout.take().context("the VM harness's stdout")?;
    let mut part = None;
    for line in BufReader::new(console).lines() {
        let line = line.context("reading the guest's console")?;
        let line = line.trim_end_matches('\r');
        match line.strip_prefix(RESULT_PREFIX) {
            Some(json) => part = Some(serde_json::from_str(json).context("the guest part's results")?),
            None => eprintln!("{line}"),
        }
    }
    let status = child.wait().context("waiting for the VM harness")?;
    if !status.success() {
        bail!("the guest part failed ({status}): see its output above");
    }
    part.context("the guest part printed no results")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP only set a flag that every wait checks: the benchmark then fails
/// its current step and unwinds, removing its namespaces, mirrors and generators on the way.
fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

/// Fails once the benchmark was interrupted.
fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early to fail when the benchmark is interrupted.
fn sleep(duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}
