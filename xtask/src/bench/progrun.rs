//! The tap program's own cost per run, by path, timed by the kernel's BPF_PROG_TEST_RUN loop
//! (a repeat count: one syscall, the program run back to back, the mean in ns per run).
//!
//! The program is vmsniff's own, attached by `vmsniff attach` to the privileged tests' tap; the
//! test run hands it a frame whose `ifindex` is the tap's (or another interface's, for "no
//! session here"), so it finds the same maps a real frame does. Copies go `--to-dev` a veth:
//! the copied path includes bpf_clone_redirect and the veth's transmit.
//!
//! Runs on any kernel the VM harness boots (`cargo xtask bench --prog-run` inside it), since
//! it needs only a tap, a veth and tc.
use std::{
    fmt::Write as _,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::programs::loaded_programs;
use nix::sched::{CloneFlags, CpuSet, sched_setaffinity, setns};
use serde::{Deserialize, Serialize};
use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC},
    topology::{Hypervisor, MIRROR_DEV, TAP},
};

use crate::demo::vmsniff_in;

/// Runs per BPF_PROG_TEST_RUN call for the paths that copy nothing.
pub const REPEAT: u32 = 100_000;
/// Runs per call for paths that clone (each sends a copy out of a veth).
pub const REPEAT_COPY: u32 = 10_000;
/// Calls per figure: a round's figure is the least of them. On a shared machine a call that
/// other work interrupts (its caches cooled, its CPU taken) only ever reads high, so the least
/// is the program's own cost and the spread across rounds shows what is left of the noise.
pub const CALLS: usize = 10;

/// Where the frame goes through the program.
#[derive(Clone, Copy)]
enum Path4 {
    /// The tap has no session (the test run's ifindex is another interface's).
    NoSession,
    /// The tap's one session mirrors the other direction only.
    OtherDirection,
    /// The session's 1-term filter drops the frame.
    FilteredOut,
    /// The frame is copied (filter matched, clone to the veth).
    Copied,
    /// Over a tiny `--rate-limit`: the shared token bucket is read (a refusal writes nothing),
    /// nothing copied.
    RateLimited,
}

impl Path4 {
    const ALL: [Path4; 5] =
        [Path4::NoSession, Path4::OtherDirection, Path4::FilteredOut, Path4::Copied, Path4::RateLimited];

    fn name(self) -> &'static str {
        match self {
            Path4::NoSession => "no session on this tap",
            Path4::OtherDirection => "session for the other direction only",
            Path4::FilteredOut => "1-term filter, frame filtered out",
            Path4::Copied => "1-term filter, frame copied",
            Path4::RateLimited => "no filter, over the rate limit (bucket read)",
        }
    }

    fn attach_args(self) -> Vec<&'static str> {
        let mut args = vec!["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", "netlink"];
        match self {
            Path4::OtherDirection => args.extend(["--direction", "in"]),
            Path4::RateLimited => args.extend(["--direction", "out", "--rate-limit", "1pps"]),
            _ => args.extend(["--direction", "out", "--filter", "udp port 9"]),
        }
        args
    }

    fn repeat(self) -> u32 {
        if matches!(self, Path4::Copied) { REPEAT_COPY } else { REPEAT }
    }
}

/// The measured numbers: per path, one CPU's ns per run by round, then per CPU with two CPUs
/// running the same path at once.
#[derive(Serialize, Deserialize)]
pub struct Samples {
    one: Vec<Vec<f64>>,
    two: Vec<Vec<f64>>,
    /// An empty program's time: what the test run itself costs per run on this machine.
    floor: Vec<f64>,
    cpus: usize,
    /// `Linux <release>` of the kernel measured.
    kernel: String,
}

/// Measures every path `rounds` times; on two CPUs at once too when `two_cpus` (and the
/// machine has two).
pub fn run(rounds: usize, vmsniff: &Path, two_cpus: bool) -> anyhow::Result<Samples> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpus = if two_cpus { cpus } else { 1 };
    // Before the keeping session's maps: up to 5.10 a program's memory counts against the
    // user's RLIMIT_MEMLOCK, which vmsniff's pinned maps already fill.
    raise_memlock_limit();
    let empty = empty_program()?;
    let hv = Hypervisor::new();
    // Nothing reads the copies off the veth's far end: the stack there drops them, on the CPU
    // that sent each one. A capture socket there was one receive queue that both CPUs of the
    // two-CPU runs filled, and its lock made each copy a fifth dearer on two CPUs than on one:
    // the test's cost, not the program's.
    hv.mirror_device();
    // A session on another device for the whole run keeps vmsniff's programs pinned, so that
    // each path's attach reuses them instead of waiting for the verifier (seconds under TCG).
    hv.ns.sh(&format!("ip link add {KEEPER} type veth peer name {KEEPER}p\nip link set {KEEPER} up"));
    let keeper = vmsniff_in(
        &hv.ns,
        vmsniff,
        &["attach", "--tap", KEEPER, "--to-dev", MIRROR_DEV, "--direction", "in"],
    )?;
    let samples = measure(rounds, vmsniff, &hv, cpus, &empty);
    vmsniff_in(&hv.ns, vmsniff, &["detach", keeper.trim()])?;
    samples
}

/// The device the keeping session mirrors (see [`run`]).
const KEEPER: &str = "keep0";

/// Lifts RLIMIT_MEMLOCK where this process may (kernels before 5.11 charge BPF memory against
/// it). Without CAP_SYS_RESOURCE, as on this project's machine, it stays: kernels from 5.11 on
/// charge the memory cgroup instead.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit, read by the call only.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        eprintln!("bench: RLIMIT_MEMLOCK stays: {}", std::io::Error::last_os_error());
    }
}

fn measure(
    rounds: usize,
    vmsniff: &Path,
    hv: &Hypervisor,
    cpus: usize,
    empty: &std::os::fd::OwnedFd,
) -> anyhow::Result<Samples> {
    let tap = hv.ns.ifindex(TAP);
    let other = hv.ns.ifindex(MIRROR_DEV);
    let netns = hv.ns.path();
    let mut one = vec![Vec::new(); Path4::ALL.len()];
    let mut two = vec![Vec::new(); Path4::ALL.len()];
    let mut floor = Vec::new();
    let frame = frames::ipv4(VM_MAC, PEER_MAC, [10, 0, 0, 2], [10, 0, 0, 1], L4::Udp(4000, 9), 1, 128);
    // A warm-up: under TCG the test run's own code is translated on first use, slowly.
    in_parallel(&netns, empty.as_raw_fd(), &frame, tap, REPEAT / 10, &[0])?;
    for round in 0..rounds {
        floor.push(least(&netns, empty.as_raw_fd(), &frame, tap, REPEAT, &[0])?[0]);
        for (i, path) in Path4::ALL.into_iter().enumerate() {
            super::check_interrupted()?;
            let id = vmsniff_in(&hv.ns, vmsniff, &path.attach_args())?;
            let result = (|| {
                let program = tap_ingress_fd(&hv.ns)?;
                let ifindex = if matches!(path, Path4::NoSession) { other } else { tap };
                let l4 =
                    if matches!(path, Path4::FilteredOut) { L4::Tcp(4000, 80) } else { L4::Udp(4000, 9) };
                let frame = frames::ipv4(VM_MAC, PEER_MAC, [10, 0, 0, 2], [10, 0, 0, 1], l4, 1, 128);
                let fd = program.as_fd().as_raw_fd();
                let single = least(&netns, fd, &frame, ifindex, path.repeat(), &[0])?;
                let pair = if cpus >= 2 {
                    least(&netns, fd, &frame, ifindex, path.repeat(), &[0, 1])?
                } else {
                    Vec::new()
                };
                Ok::<_, anyhow::Error>((single[0], pair.iter().sum::<f64>() / pair.len().max(1) as f64))
            })();
            vmsniff_in(&hv.ns, vmsniff, &["detach", id.trim()])?;
            let (single, pair) = result.with_context(|| format!("round {}: {}", round + 1, path.name()))?;
            eprintln!(
                "bench: prog-run: round {} {:<48} {single:>7.1} ns/run, {pair:>7.1} per CPU on two",
                round + 1,
                path.name()
            );
            one[i].push(single);
            two[i].push(pair);
        }
    }
    Ok(Samples { one, two, floor, cpus, kernel: super::report::kernel() })
}

/// Each CPU's least ns per run over [`CALLS`] calls (see there why the least).
fn least(
    netns: &Path,
    fd: RawFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    cpus: &[usize],
) -> anyhow::Result<Vec<f64>> {
    let mut best = vec![f64::INFINITY; cpus.len()];
    for _ in 0..CALLS {
        for (best, ns) in best.iter_mut().zip(in_parallel(netns, fd, frame, ifindex, repeat, cpus)?) {
            *best = best.min(ns);
        }
    }
    Ok(best)
}

/// The program on the tap's ingress hook, opened by its id (tc names it).
fn tap_ingress_fd(ns: &vmsniff_tests::netns::Netns) -> anyhow::Result<aya::programs::ProgramFd> {
    let filters = ns.sh(&format!("tc filter show dev {TAP} ingress"));
    let words: Vec<&str> = filters.split_whitespace().collect();
    let id: u32 = words
        .windows(2)
        .find(|w| w[0] == "id")
        .and_then(|w| w[1].parse().ok())
        .with_context(|| format!("no program id in tc's listing of {TAP}'s ingress: {filters}"))?;
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.id() == id {
            return info.fd().with_context(|| format!("opening BPF program {id}"));
        }
    }
    bail!("BPF program {id} is not loaded")
}

/// Test-runs the program on each CPU of `cpus` at once (one thread each, pinned, in the
/// namespace): each CPU's ns per run.
fn in_parallel(
    netns: &Path,
    fd: RawFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    cpus: &[usize],
) -> anyhow::Result<Vec<f64>> {
    let barrier = std::sync::Barrier::new(cpus.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let barrier = &barrier;
                scope.spawn(move || -> anyhow::Result<f64> {
                    let file = File::open(netns).context("opening the namespace")?;
                    setns(&file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
                    let mut set = CpuSet::new();
                    set.set(cpu).context("CPU set")?;
                    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .with_context(|| format!("pinning to CPU {cpu}"))?;
                    barrier.wait();
                    test_run(fd, frame, ifindex, repeat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a test-run thread panicked"))?)
            .collect()
    })
}

/// BPF_PROG_LOAD's part of `union bpf_attr`, through the program's name.
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// A tc program that only returns TC_ACT_UNSPEC (`r0 = -1; exit`), to time the test run itself.
fn empty_program() -> anyhow::Result<std::os::fd::OwnedFd> {
    let insns: [u64; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1.
        u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        // BPF_JMP | BPF_EXIT.
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..LoadAttr::default()
    };
    attr.prog_name[..12].copy_from_slice(b"vmsniff_null");
    // SAFETY: the attribute points at `insns` and `license`, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &raw mut attr, size_of::<LoadAttr>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("loading an empty tc program (BPF_PROG_LOAD)");
    }
    // SAFETY: the kernel just returned this new descriptor, owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// BPF_PROG_TEST_RUN's part of `union bpf_attr` (through `batch_size`, 5.18; older kernels
/// accept the larger size since the fields they lack are zero).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `offsetof(struct __sk_buff, ifindex)`: the context passed in ends with it (the kernel takes
/// the device by that index, 5.10 and later; every earlier field stays 0, as it requires).
const SKB_IFINDEX_OFFSET: usize = 40;

/// One BPF_PROG_TEST_RUN of `repeat` runs on this CPU: the kernel's mean ns per run.
fn test_run(fd: RawFd, frame: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<f64> {
    let mut ctx = [0u8; SKB_IFINDEX_OFFSET + 4];
    ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
    // Mutable: the kernel writes `retval` and `duration` back into it.
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: the attribute points at `frame` and `ctx`, alive for the call; no output buffers.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, size_of::<TestRunAttr>()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    // The kernel reports the mean over the repeats, rounded down to whole ns; the total is
    // duration * repeat, so one more digit comes from nowhere: report it as it is.
    Ok(f64::from(attr.duration))
}

/// The report's section for this kernel (also what `--prog-run` prints).
pub fn section(out: &mut String, rounds: usize, samples: &Samples) -> anyhow::Result<()> {
    writeln!(out, "## Program time per frame, by path (BPF_PROG_TEST_RUN, kernel {})\n", samples.kernel)?;
    writeln!(
        out,
        "The kernel's own loop times `vmsniff_tap_ingress` as attached by vmsniff, on a 128-byte UDP \
         frame (TCP for the filtered one). A round's figure is the least of {CALLS} calls of {REPEAT} \
         runs ({REPEAT_COPY} for the copied path, which clones into a veth): a call that other work on \
         this shared machine interrupts only reads high. Median of {rounds} alternating rounds, \
         min–max. *Program time* is the median less the empty program's (the test run's own cost). \
         \"Two CPUs\" runs the same path on CPUs 0 and 1 at once, as a multi-queue tap fed by two \
         vhost threads is: the mean per CPU. The rate-limit row shares one token bucket between them, which a refused copy only reads.\n"
    )?;
    writeln!(
        out,
        "| Path | ns/run, one CPU | min–max | program time | ns/run per CPU, two CPUs | min–max |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    let floor = super::report::Stats::of(&samples.floor);
    writeln!(
        out,
        "| an empty program (the test run's own cost) | {:.0} | {:.0}–{:.0} | | | |",
        floor.median, floor.min, floor.max
    )?;
    for (i, path) in Path4::ALL.into_iter().enumerate() {
        let one = super::report::Stats::of(&samples.one[i]);
        let two = if samples.cpus >= 2 {
            let s = super::report::Stats::of(&samples.two[i]);
            (format!("{:.0}", s.median), format!("{:.0}–{:.0}", s.min, s.max))
        } else {
            ("(one CPU)".into(), String::new())
        };
        writeln!(
            out,
            "| {} | {:.0} | {:.0}–{:.0} | {:.0} | {} | {} |",
            path.name(),
            one.median,
            one.min,
            one.max,
            one.median - floor.median,
            two.0,
            two.1
        )?;
    }
    writeln!(
        out,
        "\nTargets (program time, this machine): under 30 ns with no session for the direction, \
         under 50 ns for a filtered-out frame; two CPUs cost each no more than one does.\n"
    )?;
    Ok(())
}

/// The section for Debian's kernels under QEMU: one column per kernel.
pub fn guests_section(out: &mut String, rounds: usize, guests: &[Samples]) -> anyhow::Result<()> {
    if guests.is_empty() {
        return Ok(());
    }
    writeln!(out, "## Program time per frame, by path, on Debian's kernels (QEMU TCG)\n")?;
    writeln!(
        out,
        "The same measurement on one CPU in each guest kernel the tests run on (median of {rounds} \
         rounds, each the least of {CALLS} calls), as ns per run and, in brackets, the program time \
         (less the empty program's). TCG emulates the CPU, tens of times slower than the host's \
         and unevenly so: compare the paths within a column, not with this machine's targets. \
         What it shows is that every kernel loads the same programs (5.10's verifier included) and \
         orders the paths alike.\n"
    )?;
    let header: Vec<&str> = guests.iter().map(|g| g.kernel.trim_start_matches("Linux ")).collect();
    writeln!(out, "| Path | {} |", header.join(" | "))?;
    writeln!(out, "|---|{}", "---:|".repeat(guests.len()))?;
    let floors: Vec<f64> = guests.iter().map(|g| super::report::Stats::of(&g.floor).median).collect();
    let cells: Vec<String> = floors.iter().map(|f| format!("{f:.0}")).collect();
    writeln!(out, "| an empty program (the test run's own cost) | {} |", cells.join(" | "))?;
    for (i, path) in Path4::ALL.into_iter().enumerate() {
        let cells: Vec<String> = guests
            .iter()
            .zip(&floors)
            .map(|(g, floor)| {
                let median = super::report::Stats::of(&g.one[i]).median;
                format!("{median:.0} ({:.0})", median - floor)
            })
            .collect();
        writeln!(out, "| {} | {} |", path.name(), cells.join(" | "))?;
    }
    writeln!(out)?;
    Ok(())
}
