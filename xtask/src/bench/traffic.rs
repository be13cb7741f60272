//! The VM's traffic, from Debian's generators, and what each run measures: frames the VM sent,
//! frames that crossed the hypervisor, copies the collector received, and the CPU it all took.
use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC},
    netns::Netns,
};

use super::scene::{PEER_IP, Scene};

/// Small frames: 60 bytes before the FCS, the Ethernet minimum, UDP to port 9 of an address
/// nobody holds behind the peer's MAC (the peer drops them at its route lookup, answering
/// nothing, so that only the VM's frames are on the wire).
const SMALL_FRAME: usize = 60;

/// One trafgen run.
pub struct FrameRun {
    pub secs: f64,
    pub sent: u64,
    pub delivered: u64,
    pub copies: u64,
    /// System, IRQ and softirq CPU time of the whole machine (plus the relay's user time, added
    /// by the caller) during the run.
    pub cpu_ns: u64,
}

impl FrameRun {
    pub fn delivery_ratio(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { self.copies as f64 / self.sent as f64 }
    }
}

/// trafgen's packet configuration, in a file that lives as long as this value.
pub struct Trafgen {
    config: PathBuf,
}

impl Trafgen {
    /// Written to the temporary directory: in the VM harness's guests that is the guest's own
    /// tmpfs (the shared host root is read-only there).
    pub fn new() -> anyhow::Result<Trafgen> {
        let frame =
            frames::ipv4(VM_MAC, PEER_MAC, [10, 0, 0, 2], [10, 0, 0, 3], L4::Udp(4000, 9), 0, SMALL_FRAME);
        let bytes: Vec<String> = frame.iter().map(|b| format!("{b:#04x}")).collect();
        let config = std::env::temp_dir().join(format!("vmsniff-bench-{}.trafgen", std::process::id()));
        fs::write(&config, format!("{{ {} }}\n", bytes.join(", ")))
            .with_context(|| format!("writing {}", config.display()))?;
        Ok(Trafgen { config })
    }

    /// The VM sends small frames for `secs` seconds, at `pps` or as fast as one CPU can.
    pub fn run(&self, scene: &Scene, pps: Option<u64>, secs: f64) -> anyhow::Result<FrameRun> {
        let before = Counters::read(scene)?;
        let cpu_before = system_cpu_ticks()?;
        let started = Instant::now();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &scene.vm.name, "trafgen", "--dev", "eth0", "--conf"])
            .arg(&self.config)
            // One process: the VM's vCPU. Leave the other CPU to the hypervisor's work.
            .args(["--cpus", "1", "--no-cpu-stats", "--notouch-irq"]);
        if let Some(pps) = pps {
            cmd.args(["--rate", &format!("{pps}pps")]);
        }
        // trafgen writes a temporary file into its working directory, which must be writable
        // (the guests' shared root is not).
        cmd.current_dir(std::env::temp_dir());
        // trafgen forks its sender: a process group of its own is signalled as one, as Ctrl-C
        // in a terminal would.
        let child = cmd
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting trafgen (package netsniff-ng: `cargo xtask setup` installs it)")?;
        let mut child = KillOnDrop(child);
        super::sleep(Duration::from_secs_f64(secs))?;
        // SIGINT: trafgen stops sending and exits cleanly.
        kill(Pid::from_raw(-(child.0.id() as i32)), Signal::SIGINT).context("stopping trafgen")?;
        let out = child.wait_output()?;
        let secs = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Stopped while the device pushed back (EAGAIN), trafgen fails to flush the frames left
        // in its ring: those were never sent, and the counters below do not count them.
        if !out.status.success() && !stderr.contains("Flushing TX_RING failed") {
            bail!("trafgen failed ({}): {stderr}", out.status);
        }
        // Copies still in flight (a relay's socket buffer, a backlog) count as delivered.
        std::thread::sleep(Duration::from_millis(300));
        let cpu_ns = (system_cpu_ticks()? - cpu_before) * 1_000_000_000 / clock_ticks();
        let after = Counters::read(scene)?;
        Ok(FrameRun {
            secs,
            sent: after.sent - before.sent,
            delivered: after.delivered - before.delivered,
            copies: after.copies - before.copies,
            cpu_ns,
        })
    }
}

impl Drop for Trafgen {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.config);
    }
}

struct Counters {
    sent: u64,
    delivered: u64,
    copies: u64,
}

impl Counters {
    fn read(scene: &Scene) -> anyhow::Result<Counters> {
        Ok(Counters {
            sent: scene.vm_sent()?,
            delivered: scene.peer_received()?,
            copies: scene.copies_received()?,
        })
    }
}

/// iperf3's server on the VM's peer, for the whole benchmark.
pub struct IperfServer {
    /// Held only to be killed when the benchmark ends.
    _child: KillOnDrop,
}

impl IperfServer {
    pub fn start(net: &Netns) -> anyhow::Result<IperfServer> {
        let child = Command::new("ip")
            .args(["netns", "exec", &net.name, "iperf3", "--server", "--bind", PEER_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (`cargo xtask setup` installs it)")?;
        // It listens within milliseconds natively, within a second or two under TCG.
        std::thread::sleep(Duration::from_secs(2));
        Ok(IperfServer { _child: KillOnDrop(child) })
    }
}

/// TCP bulk from the VM to its peer for `secs` seconds: the receiver's Gbit/s.
pub fn tcp_bulk(scene: &Scene, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &scene.vm.name, "iperf3", "--client", PEER_IP, "--json", "--time"])
        .arg(secs.to_string())
        .output()
        .context("running iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3's JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if !out.status.success() {
        bail!("iperf3 failed ({}): {}", out.status, json["error"]);
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("no end.sum_received.bits_per_second in iperf3's JSON: {json}"))
}

/// System, IRQ and softirq time of all CPUs, in clock ticks (/proc/stat). User time is left out:
/// it is the generators' and, on a shared machine, other people's compilers.
fn system_cpu_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| l.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect())
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq ...
    Ok(fields.get(2).copied().unwrap_or(0)
        + fields.get(5).copied().unwrap_or(0)
        + fields.get(6).copied().unwrap_or(0))
}

/// The kernel's clock tick for /proc times (USER_HZ).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

/// A generator that is killed, with its process group, if the benchmark stops early.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn wait_output(&mut self) -> anyhow::Result<std::process::Output> {
        let status = self.0.wait().context("waiting for a generator")?;
        let mut stderr = Vec::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            std::io::Read::read_to_end(&mut pipe, &mut stderr).context("reading a generator's stderr")?;
        }
        Ok(std::process::Output { status, stdout: Vec::new(), stderr })
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // ESRCH: a generator in our own process group (iperf3's server) has no group of its
            // own; the kill below reaches it.
            let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
