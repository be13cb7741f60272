//! `cargo xtask demo`: vmsniff's main job on a machine with nothing prepared.
//!
//! A hypervisor namespace holds a tap; a VM stand-in (this process, through the tap's file
//! descriptor) answers ARP and pings its gateway, the tap's address. vmsniff mirrors the tap to
//! a collector namespace over GRE, where tcpdump prints what arrives, as an operator would see
//! it with `tcpdump -n -i eth0 proto 47`. Then `vmsniff status`, detach, and everything is
//! removed. Where the kernel has no ip_gre (this project's build machines), the demo boots
//! Debian's 6.1 kernel under QEMU and runs there.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use vmsniff_tests::{netns::Netns, tap::Vm};

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

/// The vmsniff that `cargo build -p vmsniff-user` made: `VMSNIFF_BIN` when set (as the tests
/// take it), else the debug build in cargo's target directory (`CARGO_TARGET_DIR` or the
/// workspace's `target/`).
pub fn vmsniff_binary(workspace: &Path) -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("VMSNIFF_BIN") {
        return bin.into();
    }
    crate::target_dir(workspace).join("debug/vmsniff")
}

pub fn run(args: DemoArgs, workspace: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let vmsniff = vmsniff_binary(workspace);
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
    demo(&vmsniff)
}

fn kernel_has_gre() -> bool {
    Netns::new("greprobe").try_sh("ip link add g0 type gretap remote 192.0.2.9").0
}

/// The scene lives in two namespaces that are removed on the way out, with vmsniff's pins for
/// them, also when the demo fails.
fn demo(vmsniff: &Path) -> anyhow::Result<()> {
    step("building the scene: a hypervisor namespace with the VM's tap, a collector behind an uplink");
    let hv = Netns::new("demo-hv");
    let collector = Netns::new("demo-col");
    let tap = Vm::create(&hv, TAP);
    hv.sh(&format!(
        "ip addr add 10.0.0.1/24 dev {TAP}
         ip link add uplink0 type veth peer name eth0 netns {col}
         ip addr add 192.0.2.1/24 dev uplink0
         ip link set uplink0 up",
        col = collector.name
    ));
    collector.sh(&format!("ip addr add {COLLECTOR_IP}/24 dev eth0; ip link set eth0 up"));

    step(&format!("collector: tcpdump -n -i eth0 proto 47 (in namespace {})", collector.name));
    let tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &collector.name,
            "tcpdump",
            "-n",
            "-l",
            "-i",
            "eth0",
            "-c",
            "8",
            "proto",
            "47",
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump (`cargo xtask setup` installs it)")?;
    let mut tcpdump = KillOnDrop(tcpdump);
    std::thread::sleep(Duration::from_secs(1));

    step(&format!("hypervisor: vmsniff attach --tap {TAP} --to {COLLECTOR_IP}"));
    let id = vmsniff_in(&hv, vmsniff, &["attach", "--tap", TAP, "--to", COLLECTOR_IP])?;
    let id = id.trim().to_owned();
    eprintln!("demo: session {id}");

    step("the VM pings its gateway 10.0.0.1 three times");
    // The VM stand-in holds the tap's fd, and the tap lives only as long: keep it to the end.
    let mut vm = VmStandIn { tap };
    vm.ping(3)?;
    wait_child(&mut tcpdump.0, Duration::from_secs(10));

    step("vmsniff status");
    print!("{}", vmsniff_in(&hv, vmsniff, &["status"])?);
    step(&format!("vmsniff detach {id}"));
    vmsniff_in(&hv, vmsniff, &["detach", &id])?;
    step("removing the scene");
    Ok(())
}

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

/// vmsniff in the hypervisor namespace, in this mount namespace (it shares the host's bpffs).
pub fn vmsniff_in(hv: &Netns, vmsniff: &Path, args: &[&str]) -> anyhow::Result<String> {
    let vmsniff = vmsniff.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = hv.enter(move || Command::new(&vmsniff).args(&args).stderr(Stdio::inherit()).output())?;
    if !out.status.success() {
        bail!("vmsniff failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The VM: answers ARP for its address, and pings the gateway.
struct VmStandIn {
    tap: Vm,
}

impl VmStandIn {
    fn ping(&mut self, count: u16) -> anyhow::Result<()> {
        let gateway_mac = self.resolve_gateway()?;
        for seq in 1..=count {
            self.tap.send(&echo_request(gateway_mac, seq));
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let frame =
                    self.read_frame(deadline)?.with_context(|| format!("no echo reply for seq {seq}"))?;
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
        self.tap.send(&arp(1, VM_MAC, VM_IP, [0xff; 6], [0; 6], GATEWAY_IP));
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
            self.tap.send(&arp(2, VM_MAC, VM_IP, mac, mac, ip));
        }
        Ok(())
    }

    fn read_frame(&mut self, deadline: Instant) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.tap.recv(deadline.saturating_duration_since(Instant::now())))
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
    let mut sum: u32 =
        data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
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
