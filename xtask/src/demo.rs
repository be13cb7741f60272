//! `cargo xtask demo`: vmsniff's main job on a machine with nothing prepared.
//!
//! A hypervisor namespace holds a tap; a VM stand-in (this process, through the tap's file
//! descriptor) answers ARP and pings its gateway, the tap's address. vmsniff mirrors the tap to
//! a collector namespace over GRE, where tcpdump prints what arrives, as an operator would see
//! it with `tcpdump -n -i eth0 proto 47`. Then `vmsniff status`, detach, and everything is
//! removed. Where the kernel has no ip_gre (this project's build machines), the demo boots
//! Debian's 6.1 kernel under QEMU and runs there.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

const HV: &str = "vmsniff-demo-hv";
const COL: &str = "vmsniff-demo-collector";
const TAP: &str = "tapdemo0";
const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const VM_IP: [u8; 4] = [10, 0, 0, 2];
const GATEWAY_IP: [u8; 4] = [10, 0, 0, 1];
const COLLECTOR_IP: &str = "192.0.2.2";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Run the demo on this kernel, without QEMU (it needs ip_gre).
    #[arg(long)]
    here: bool,
}

pub fn run(args: DemoArgs, workspace: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let vmsniff = workspace.join("target/debug/vmsniff");
    if !args.here {
        crate::setup::run()?;
        crate::test::cargo(workspace, &["build", "-p", "vmsniff-user"])?;
        if !kernel_has_gre() {
            eprintln!("demo: this kernel has no ip_gre: running the demo in Debian 6.1 under QEMU");
            let xtask = std::env::current_exe()?;
            let status = Command::new(&xtask)
                .args(["vm-run", "--kernel", "6.1", "--"])
                .arg(&xtask)
                .args(["demo", "--here"])
                .status()
                .context("starting the VM harness")?;
            if !status.success() {
                bail!("the demo failed inside the guest ({status})");
            }
            return Ok(());
        }
    }
    let _cleanup = Cleanup;
    demo(&vmsniff)
}

fn kernel_has_gre() -> bool {
    let ns = "vmsniff-demo-probe";
    let _ = sh(&format!("ip netns add {ns}"));
    let ok = sh(&format!("ip -n {ns} link add g0 type gretap remote 192.0.2.9")).is_ok();
    let _ = sh(&format!("ip netns del {ns}"));
    ok
}

fn demo(vmsniff: &Path) -> anyhow::Result<()> {
    step("building the scene: a hypervisor namespace with the VM's tap, a collector behind an uplink");
    sh(&format!("ip netns add {HV}; ip netns add {COL}"))?;
    for ns in [HV, COL] {
        sh(&format!("ip -n {ns} link set lo up; ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"))?;
    }
    let tap = in_netns(HV, open_tap)??;
    sh(&format!(
        "ip -n {HV} addr add 10.0.0.1/24 dev {TAP}
         ip -n {HV} link set {TAP} up
         ip -n {HV} link add uplink0 type veth peer name eth0 netns {COL}
         ip -n {HV} addr add 192.0.2.1/24 dev uplink0
         ip -n {HV} link set uplink0 up
         ip -n {COL} addr add {COLLECTOR_IP}/24 dev eth0
         ip -n {COL} link set eth0 up"
    ))?;

    step(&format!("collector: tcpdump -n -i eth0 proto 47 (in {COL})"));
    let tcpdump = Command::new("ip")
        .args(["netns", "exec", COL, "tcpdump", "-n", "-l", "-i", "eth0", "-c", "8", "proto", "47"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump (`cargo xtask setup` installs it)")?;
    let _tcpdump = KillOnDrop(tcpdump);
    std::thread::sleep(Duration::from_secs(1));

    step(&format!("hypervisor: vmsniff attach --tap {TAP} --to {COLLECTOR_IP}"));
    let id = vmsniff_in(vmsniff, &["attach", "--tap", TAP, "--to", COLLECTOR_IP])?;
    let id = id.trim().to_owned();
    eprintln!("demo: session {id}");

    step("the VM pings its gateway 10.0.0.1 three times");
    let mut vm = VmStandIn { tap };
    vm.ping(3)?;
    let mut tcpdump = _tcpdump;
    wait_child(&mut tcpdump.0, Duration::from_secs(10));

    step("vmsniff status");
    print!("{}", vmsniff_in(vmsniff, &["status"])?);
    step(&format!("vmsniff detach {id}"));
    vmsniff_in(vmsniff, &["detach", &id])?;
    step("removing the scene");
    Ok(())
}

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

fn sh(script: &str) -> anyhow::Result<()> {
    let out = Command::new("sh").args(["-ec", script]).output().context("running sh")?;
    if !out.status.success() {
        bail!("`{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// vmsniff in the hypervisor namespace, in this mount namespace (it shares the host's bpffs).
fn vmsniff_in(vmsniff: &Path, args: &[&str]) -> anyhow::Result<String> {
    let vmsniff = vmsniff.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = in_netns(HV, move || Command::new(&vmsniff).args(&args).stderr(Stdio::inherit()).output())??;
    if !out.status.success() {
        bail!("vmsniff failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let file = File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("opening netns {ns}"))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

fn open_tap() -> anyhow::Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..TAP.len()].copy_from_slice(TAP.as_bytes());
    // SAFETY: TUNSETIFF takes an ifreq, which IfReq is laid out as.
    if unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(file)
}

/// The VM: answers ARP for its address, and pings the gateway.
struct VmStandIn {
    tap: File,
}

impl VmStandIn {
    fn ping(&mut self, count: u16) -> anyhow::Result<()> {
        let gateway_mac = self.resolve_gateway()?;
        for seq in 1..=count {
            self.tap.write_all(&echo_request(gateway_mac, seq))?;
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let frame = self.read_frame(deadline)?.with_context(|| format!("no echo reply for seq {seq}"))?;
                self.answer_arp(&frame)?;
                if frame.len() > 34 + 8 && frame[12..14] == [8, 0] && frame[23] == 1 && frame[34] == 0 {
                    eprintln!("vm: 64 bytes from 10.0.0.1: icmp_seq={seq}");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    fn resolve_gateway(&mut self) -> anyhow::Result<[u8; 6]> {
        self.tap.write_all(&arp(1, VM_MAC, VM_IP, [0xff; 6], [0; 6], GATEWAY_IP))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let frame = self.read_frame(deadline)?.context("the gateway never answered ARP")?;
            if frame.len() >= 42 && frame[12..14] == [8, 6] && frame[21] == 2 && frame[28..32] == GATEWAY_IP {
                return Ok(frame[22..28].try_into()?);
            }
        }
    }

    fn answer_arp(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        if frame.len() >= 42 && frame[12..14] == [8, 6] && frame[21] == 1 && frame[38..42] == VM_IP {
            let (mac, ip): ([u8; 6], [u8; 4]) = (frame[22..28].try_into()?, frame[28..32].try_into()?);
            self.tap.write_all(&arp(2, VM_MAC, VM_IP, mac, mac, ip))?;
        }
        Ok(())
    }

    fn read_frame(&mut self, deadline: Instant) -> anyhow::Result<Option<Vec<u8>>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&self.tap), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::try_from(left.as_millis() as i32).unwrap_or(PollTimeout::ZERO))? == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; 2048];
        let n = self.tap.read(&mut buf)?;
        buf.truncate(n);
        Ok(Some(buf))
    }
}

fn arp(op: u8, sha: [u8; 6], spa: [u8; 4], dst: [u8; 6], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, op]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn echo_request(gateway_mac: [u8; 6], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"vmsniff demo ping 0123456789abcdefghijklmnopqrst");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, seq as u8, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&VM_IP);
    ip.extend_from_slice(&GATEWAY_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&gateway_mac);
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&[8, 0]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn wait_child(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the demo's namespaces (and vmsniff's state with them), also when the demo fails.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in [HV, COL] {
            if let Ok(meta) = std::fs::metadata(Path::new("/run/netns").join(ns)) {
                use std::os::unix::fs::MetadataExt as _;
                let pins = PathBuf::from("/sys/fs/bpf/vmsniff").join(meta.ino().to_string());
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
                let _ = std::fs::remove_dir_all(pins);
            }
        }
    }
}
