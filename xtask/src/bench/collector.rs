//! The collector's cost: `vmsniff collect -w` against `tcpdump -w` and `tshark -w` on the same
//! flood of GRE copies (60-byte frames, one session per sender) that trafgen sends into a
//! collector namespace as fast as one CPU can. Per tool and number of senders: copies offered
//! per second, the share kept (written), and the tool's CPU time per copy (its process and
//! children: tshark's dumpcap). trafgen runs on CPU 0 and the tool on CPU 1, so that the two
//! never share a CPU; the kernel's receive work happens on the sender's CPU for every tool
//! alike (a veth delivers in the sender's softirq).
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use vmsniff_tests::netns::Netns;

/// Copies per run.
pub const COPIES: u64 = 1_000_000;
/// Senders per run: one hypervisor, and several at once.
const SENDERS: [usize; 2] = [1, 4];
const COLLECTOR: &str = "10.250.0.2";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Vmsniff,
    /// Two reading threads (a fanout group split by sender), on the same one CPU.
    VmsniffThreads,
    Tcpdump,
    Tshark,
}

impl Tool {
    const ALL: [Tool; 4] = [Tool::Vmsniff, Tool::VmsniffThreads, Tool::Tcpdump, Tool::Tshark];

    fn name(self) -> &'static str {
        match self {
            Tool::Vmsniff => "vmsniff collect -w",
            Tool::VmsniffThreads => "vmsniff collect -w --threads 2",
            Tool::Tcpdump => "tcpdump -w (-B 8192)",
            Tool::Tshark => "tshark -w",
        }
    }

    /// The command line, capturing into `file`.
    fn command(self, vmsniff: &Path, file: &Path) -> Vec<String> {
        let file = file.display().to_string();
        let args: Vec<&str> = match self {
            Tool::Vmsniff => vec!["collect", "-w", &file],
            Tool::VmsniffThreads => vec!["collect", "-w", &file, "--threads", "2"],
            Tool::Tcpdump => vec!["tcpdump", "-n", "-i", "col0", "-B", "8192", "-w", &file, "proto", "47"],
            Tool::Tshark => vec!["tshark", "-n", "-q", "-i", "col0", "-w", &file, "-f", "proto 47"],
        };
        let mut line = vec![];
        if matches!(self, Tool::Vmsniff | Tool::VmsniffThreads) {
            line.push(vmsniff.display().to_string());
        }
        line.extend(args.into_iter().map(str::to_owned));
        line
    }

    /// What the tool prints on stderr once it is capturing.
    fn ready(self) -> &'static str {
        match self {
            Tool::Vmsniff | Tool::VmsniffThreads => "collecting",
            Tool::Tcpdump => "listening on",
            Tool::Tshark => "Capturing on",
        }
    }
}

pub struct Sample {
    tool: Tool,
    senders: usize,
    offered_per_s: f64,
    kept: f64,
    ns_per_copy: f64,
}

/// Copies the drain part queues in the rings while the collector is stopped.
const DRAIN_COPIES: u64 = 1_000_000;
/// Senders in the drain part: enough for the fanout to give every thread some.
const DRAIN_SENDERS: usize = 8;
/// Reading threads the drain part compares.
const DRAIN_THREADS: [usize; 2] = [1, 2];

/// How fast `vmsniff collect --threads N` empties rings full of copies, on every CPU.
pub struct Drain {
    threads: usize,
    per_s: f64,
    ns_per_copy: f64,
    /// The share written: what the rings dropped while it was stopped is not.
    kept: f64,
}

/// Both parts' samples.
pub struct Samples {
    flood: Vec<Sample>,
    drain: Vec<Drain>,
}

pub fn run(rounds: usize, copies: u64, vmsniff: &Path) -> anyhow::Result<Samples> {
    let flood = flood(rounds, copies, vmsniff)?;
    let mut drain = Vec::new();
    for round in 0..rounds {
        for threads in DRAIN_THREADS {
            super::check_interrupted()?;
            let sample = drained(threads, copies.min(DRAIN_COPIES), vmsniff)
                .with_context(|| format!("draining with --threads {threads}"))?;
            eprintln!(
                "bench: collector drain round {}: --threads {threads}: {:.0} copies/s, {:.0} ns/copy, {:.3} % kept",
                round + 1,
                sample.per_s,
                sample.ns_per_copy,
                sample.kept * 100.0
            );
            drain.push(sample);
        }
    }
    Ok(Samples { flood, drain })
}

fn flood(rounds: usize, copies: u64, vmsniff: &Path) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        for senders in SENDERS {
            for tool in Tool::ALL {
                super::check_interrupted()?;
                let sample = one(tool, senders, copies, vmsniff)
                    .with_context(|| format!("{} with {senders} sender(s)", tool.name()))?;
                eprintln!(
                    "bench: collector round {}: {} from {senders} sender(s): {:.0} copies/s offered, {:.1} % kept, {:.0} ns/copy",
                    round + 1,
                    tool.name(),
                    sample.offered_per_s,
                    sample.kept * 100.0,
                    sample.ns_per_copy
                );
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

/// trafgen's packets: one GRE copy per sender (vmsniff's GRE: key and sequence number),
/// sent in turn; the sequence number's low byte counts up.
fn trafgen_config(senders: usize, collector_mac: &str, sender_mac: &str) -> String {
    (0..senders)
        .map(|i| {
            format!(
                "{{\n  eth(da={collector_mac}, sa={sender_mac}, type=0x0800),\n  \
                 ipv4(saddr=10.250.0.{}, daddr={COLLECTOR}, proto=47, ttl=64),\n  \
                 0x30, 0x00, 0x65, 0x58,\n  0x00, 0x00, 0x00, 0x08,\n  0x00, 0x00, 0x00, dinc(0, 255, 1),\n  \
                 0x52, 0x54, 0x00, 0x00, 0x00, 0x01, 0x52, 0x54, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00,\n  \
                 fill(0x00, 46)\n}}\n",
                10 + i
            )
        })
        .collect()
}

fn mac(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let json = ns.sh(&format!("ip -j link show {dev}"));
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -j link")?;
    v[0]["address"].as_str().map(str::to_owned).context("no link address")
}

/// A sender namespace with `senders` addresses on a veth to a collector namespace, trafgen's
/// configuration for them, and where the tool writes.
struct Flood {
    snd: Netns,
    col: Netns,
    dir: PathBuf,
    config: PathBuf,
    file: PathBuf,
    stderr: PathBuf,
}

impl Flood {
    fn set_up(prefix: &str, senders: usize) -> anyhow::Result<Flood> {
        let snd = Netns::new(&format!("{prefix}snd"));
        let col = Netns::new(&format!("{prefix}col"));
        snd.sh(&format!("ip link add snd0 type veth peer name col0 netns {}", col.name));
        for i in 0..senders {
            snd.sh(&format!("ip addr add 10.250.0.{}/24 dev snd0", 10 + i));
        }
        snd.sh("ip link set snd0 up; ip link set lo up");
        col.sh(&format!("ip addr add {COLLECTOR}/24 dev col0; ip link set col0 up; ip link set lo up"));
        let dir = tempdir()?;
        let config = dir.join("gre.cfg");
        std::fs::write(&config, trafgen_config(senders, &mac(&col, "col0")?, &mac(&snd, "snd0")?))?;
        Ok(Flood { file: dir.join("capture"), stderr: dir.join("stderr"), snd, col, dir, config })
    }
}

/// Waits until the tool says `ready` on stderr, then a moment more.
fn started(child: &mut Child, stderr: &Path, ready: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(stderr)?.contains(ready) {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            bail!("the tool did not start capturing: {}", std::fs::read_to_string(stderr)?);
        }
        super::sleep(Duration::from_millis(100))?;
    }
    super::sleep(Duration::from_millis(500))
}

/// trafgen sends `copies` from CPU 0, as one process: it forks one per CPU otherwise, and two
/// would send the same copies, which collect rightly takes for repeats when they arrive in the
/// same nanosecond.
fn trafgen(snd: &Netns, config: &Path, copies: u64) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args([
            "netns", "exec", &snd.name, "taskset", "-c", "0", "trafgen", "--cpus", "1", "-o", "snd0", "-q",
            "-c",
        ])
        .arg(config)
        .args(["-n", &copies.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running trafgen")?;
    if !status.success() {
        bail!("trafgen failed: {status}");
    }
    Ok(())
}

fn one(tool: Tool, senders: usize, copies: u64, vmsniff: &Path) -> anyhow::Result<Sample> {
    let Flood { snd, col, dir, config, file, stderr } = Flood::set_up("cb", senders)?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &col.name, "taskset", "-c", "1"])
        .args(tool.command(vmsniff, &file))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .context("starting the tool")?;
    let result = measure(tool, &snd, &config, &stderr, copies, &mut child);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT);
    let waited = wait(&mut child, Duration::from_secs(20));
    let (offered_per_s, cpu) = result?;
    waited?;
    let text = std::fs::read_to_string(&stderr)?;
    let kept = kept(tool, &text).with_context(|| format!("no count in the tool's output:\n{text}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        tool,
        senders,
        offered_per_s,
        kept: kept as f64 / copies as f64,
        ns_per_copy: cpu.as_nanos() as f64 / copies as f64,
    })
}

/// The collector, stopped (SIGSTOP) while trafgen queues `copies` copies from
/// [`DRAIN_SENDERS`] senders in its rings, then let go on every CPU: how fast its threads read,
/// decode and write them (to `--count`, where it exits). The sender is done by then, so a
/// second thread has a core of its own: this is the part `--threads` is for.
fn drained(threads: usize, copies: u64, vmsniff: &Path) -> anyhow::Result<Drain> {
    let Flood { snd, col, dir, config, file, stderr } = Flood::set_up("cd", DRAIN_SENDERS)?;
    // Room for every copy in one ring: a sender's copies all wait in its thread's.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &col.name])
        .arg(vmsniff)
        .args(["collect", "-w"])
        .arg(&file)
        .args(["-B", "512", "--threads", &threads.to_string(), "-c", &copies.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vmsniff collect")?;
    let reached = tee_stderr(&mut child, &stderr)?;
    let result = drain_once(&mut child, &snd, &config, &stderr, &reached, copies);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGCONT);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT);
    let waited = wait(&mut child, Duration::from_secs(20));
    let text = std::fs::read_to_string(&stderr)?;
    let links = || format!("{}{}", snd.sh("ip -s link show snd0"), col.sh("ip -s link show col0"));
    let (took, cpu) = result.with_context(|| format!("collect's output:\n{text}\n{}", links()))?;
    waited?;
    let kept =
        kept(Tool::Vmsniff, &text).with_context(|| format!("no count in collect's output:\n{text}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Drain {
        threads,
        per_s: kept as f64 / took.as_secs_f64(),
        ns_per_copy: cpu.as_nanos() as f64 / kept.max(1) as f64,
        kept: kept as f64 / copies as f64,
    })
}

/// Copies the collector's stderr into `path` as it comes, and tells when it says the count is
/// reached: a thread blocked on the pipe notices at once, where polling the file would take CPU
/// from the collector's own threads on this 2-core machine.
fn tee_stderr(child: &mut Child, path: &Path) -> anyhow::Result<Receiver<Instant>> {
    let pipe = child.stderr.take().context("collect's stderr")?;
    let mut log = std::fs::File::create(path)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if line.contains(COUNT_REACHED) {
                let _ = tx.send(Instant::now());
            }
            if writeln!(log, "{line}").is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Stops the collector, queues the copies, lets it go: the time until it has written them all
/// and its CPU time.
fn drain_once(
    child: &mut Child,
    snd: &Netns,
    config: &Path,
    stderr: &Path,
    reached: &Receiver<Instant>,
    copies: u64,
) -> anyhow::Result<(Duration, Duration)> {
    started(child, stderr, Tool::Vmsniff.ready())?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP)?;
    trafgen(snd, config, copies)?;
    // The last partly filled block is handed over after 10 ms.
    super::sleep(Duration::from_millis(200))?;
    let before = tree_cpu(child.id())?;
    let started = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT)?;
    let deadline = started + Duration::from_secs(60);
    let (mut cpu, mut progressed) = (before, started);
    // The clock stops when it says the count is reached (its file then complete): not at its
    // exit, which frees the rings (tens of ms for 512 MiB each), a cost of the teardown and
    // not of draining. A copy its rings dropped (counted) never comes: once it has read
    // nothing for a while, it is done.
    let took = loop {
        match reached.recv_timeout(Duration::from_millis(20)) {
            Ok(at) => {
                if let Ok(now) = tree_cpu(child.id()) {
                    cpu = cpu.max(now);
                }
                break at.duration_since(started);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break started.elapsed(),
        }
        if Instant::now() > deadline {
            bail!("collect still reading {copies} copies after 60 s");
        }
        // Gone (its stderr closes just after): the last reading counts.
        let Ok(now) = tree_cpu(child.id()) else { break started.elapsed() };
        if now > cpu + Duration::from_micros(100) {
            progressed = Instant::now();
        }
        cpu = cpu.max(now);
        if progressed.elapsed() > Duration::from_millis(300) {
            break progressed.duration_since(started);
        }
    };
    Ok((took, cpu.saturating_sub(before)))
}

/// What `vmsniff collect` logs once `--count` copies are written, before it frees its rings.
const COUNT_REACHED: &str = "reached: stopping";

/// Waits for the tool, floods, lets it drain: the offered rate and the tool's CPU time.
fn measure(
    tool: Tool,
    snd: &Netns,
    config: &Path,
    stderr: &Path,
    copies: u64,
    child: &mut Child,
) -> anyhow::Result<(f64, Duration)> {
    started(child, stderr, tool.ready())?;
    let pid = child.id();
    let before = tree_cpu(pid)?;
    let sending = Instant::now();
    trafgen(snd, config, copies)?;
    let sent_in = sending.elapsed();
    // What is queued is read within this long; the CPU it takes counts.
    super::sleep(Duration::from_millis(1500))?;
    let after = tree_cpu(pid)?;
    Ok((copies as f64 / sent_in.as_secs_f64(), after.saturating_sub(before)))
}

/// CPU time of a process and its descendants, every thread, to the nanosecond (schedstat's
/// run time: the clock-tick counts of /proc/PID/stat are too coarse for 100 ns per copy).
fn tree_cpu(pid: u32) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
                total += stat.split_whitespace().next().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
            }
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                pending.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    Ok(Duration::from_nanos(total))
}

fn wait(child: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the tool did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Copies the tool says it wrote.
fn kept(tool: Tool, stderr: &str) -> Option<u64> {
    match tool {
        // The summary's rows: ... DIR PACKETS BYTES LOST REORDERED.
        Tool::Vmsniff | Tool::VmsniffThreads => Some(
            stderr
                .lines()
                .filter(|l| l.starts_with("10.250.0."))
                .filter_map(|l| l.split_whitespace().rev().nth(3)?.parse::<u64>().ok())
                .sum(),
        ),
        Tool::Tcpdump | Tool::Tshark => {
            stderr.lines().find_map(|l| l.trim().strip_suffix(" packets captured")?.trim().parse().ok())
        }
    }
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vmsniff-bench-collector-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // tcpdump drops to its own user before writing.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    Ok(dir)
}

pub fn section(out: &mut String, rounds: usize, copies: u64, samples: &Samples) -> anyhow::Result<()> {
    let Samples { flood: samples, drain } = samples;
    writeln!(out, "## The collector: vmsniff collect, tcpdump and tshark on the same flood (this kernel)\n")?;
    writeln!(
        out,
        "vmsniff built for release. trafgen sends {copies} GRE copies (vmsniff's GRE, 60-byte frames) as fast as one CPU can, from 1 \
         or 4 sender addresses in turn, over a veth into a collector namespace; each tool writes them to a \
         file. CPU per copy is the tool's own run time (every thread, its children included: tshark's \
         dumpcap; from schedstat, in ns) pinned to another CPU than trafgen; the kernel's copying into the sockets happens in the \
         sender's softirq for every tool alike. Median of {rounds} rounds, min–max; the tools alternate \
         within each round. `--threads 2` runs on the same one CPU as the others: this 2-core \
         machine has no core to spare beside trafgen's, so its row shows what splitting the \
         senders over two reading threads costs (two rings, a lock per block), not the speed-up a \
         free core would give.\n"
    )?;
    writeln!(out, "| Tool | Senders | Copies/s offered | Kept | CPU ns per copy | min–max |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for senders in SENDERS {
        for tool in Tool::ALL {
            let of = |f: fn(&Sample) -> f64| -> Vec<f64> {
                samples.iter().filter(|s| s.tool == tool && s.senders == senders).map(f).collect()
            };
            let offered = super::report::Stats::of(&of(|s| s.offered_per_s));
            let kept = super::report::Stats::of(&of(|s| s.kept));
            let ns = super::report::Stats::of(&of(|s| s.ns_per_copy));
            writeln!(
                out,
                "| {} | {senders} | {:.0} | {:.2} % (min {:.2} %) | {:.0} | {:.0}–{:.0} |",
                tool.name(),
                offered.median,
                kept.median * 100.0,
                kept.min * 100.0,
                ns.median,
                ns.min,
                ns.max
            )?;
        }
    }
    out.push('\n');
    writeln!(
        out,
        "**Draining, on both CPUs.** vmsniff collect is stopped (SIGSTOP) while trafgen queues {} copies \
         from {DRAIN_SENDERS} senders in its rings (`-B 512` each), then let go unpinned: the copies per \
         second it reads, decodes and writes until it has them all (`--count` ends it: the clock stops \
         when it logs that the count is reached, its file complete, before it frees its rings; a copy \
         the rings dropped while it was stopped, counted, never comes: Kept), and its CPU time per copy. The sender has finished, so a second reading thread has a core of its own. Median of {rounds} \
         rounds, min–max.\n",
        copies.min(DRAIN_COPIES)
    )?;
    writeln!(out, "| Reading threads | Copies/s drained | min–max | CPU ns per copy | Kept (min) |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|")?;
    for threads in DRAIN_THREADS {
        let of = |f: fn(&Drain) -> f64| -> Vec<f64> {
            drain.iter().filter(|d| d.threads == threads).map(f).collect()
        };
        let rate = super::report::Stats::of(&of(|d| d.per_s));
        let ns = super::report::Stats::of(&of(|d| d.ns_per_copy));
        let kept = super::report::Stats::of(&of(|d| d.kept));
        writeln!(
            out,
            "| {threads} | {:.0} | {:.0}–{:.0} | {:.0} | {:.3} % |",
            rate.median,
            rate.min,
            rate.max,
            ns.median,
            kept.min * 100.0
        )?;
    }
    out.push('\n');
    Ok(())
}
