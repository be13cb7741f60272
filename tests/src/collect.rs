//! `vmsniff collect` under test: a background collector in a namespace, its summary, the pcapng
//! it wrote, and a raw GRE sender for hand-made packets.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use pcap_file::pcapng::{
    Block, PcapNgReader,
    blocks::{enhanced_packet::EnhancedPacketOption, interface_description::InterfaceDescriptionOption},
};

use crate::{netns::Netns, vmsniff};

/// A running `vmsniff collect`; killed on drop if the test did not stop it.
pub struct Collector {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<()>>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// stderr lines [`Collector::wait_for_line`] read, for [`Stopped::stderr`].
    read: Vec<String>,
}

/// What a stopped collector left: its exit status, its stderr, and its stdout (for `-w -`).
pub struct Stopped {
    pub status: ExitStatus,
    pub stderr: String,
    pub stdout: Vec<u8>,
}

impl Collector {
    /// Starts `vmsniff collect ARGS` in `ns` and waits until it listens.
    pub fn start(ns: &Netns, args: &[&str]) -> Collector {
        let bin = vmsniff::binary();
        let args: Vec<String> =
            std::iter::once("collect").chain(args.iter().copied()).map(String::from).collect();
        let mut child = ns.enter(move || {
            std::process::Command::new(bin)
                .args(&args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start vmsniff collect")
        });
        let (send, lines) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = child.stdout.take().expect("stdout");
        let stdout = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes);
            bytes
        });
        let mut collector = Collector {
            child: Some(child),
            lines,
            stderr: Some(stderr),
            stdout: Some(stdout),
            read: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match collector.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains("collecting ") && line.contains(" copies") => return collector,
                Ok(line) => seen.push(line),
                Err(_) => {
                    if let Some(status) = collector.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        panic!("vmsniff collect exited ({status}) before listening:\n{}", seen.join("\n"));
                    }
                }
            }
        }
        panic!("vmsniff collect did not start listening within 20 s:\n{}", seen.join("\n"));
    }

    /// The collector's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGINT and waits for the exit.
    pub fn stop(mut self) -> Stopped {
        let child = self.child.as_ref().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
        self.wait(Duration::from_secs(30))
    }

    /// Sends a signal and returns the stderr lines that follow within `quiet`.
    pub fn signal(&self, signal: Signal, quiet: Duration) -> Vec<String> {
        let child = self.child.as_ref().expect("running");
        kill(Pid::from_raw(child.id() as i32), signal).expect("kill");
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            lines.push(line);
        }
        lines
    }

    /// Waits until collect prints a line containing `text` on stderr, at most `timeout`; panics
    /// with what it printed meanwhile otherwise.
    pub fn wait_for_line(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(line) = self.lines.recv_timeout(left) {
                let found = line.contains(text);
                self.read.push(line);
                if found {
                    return;
                }
            }
        }
        panic!("collect printed no {text:?} within {} s:\n{}", timeout.as_secs(), self.read.join("\n"));
    }

    /// Waits for the collector to exit by itself (`--count`), at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Stopped {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmsniff collect did not exit within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = self.stdout.take().expect("stdout").join().expect("stdout reader");
        self.stderr.take().expect("stderr").join().expect("stderr reader");
        let mut stderr = std::mem::take(&mut self.read);
        stderr.extend(self.lines.try_iter());
        Stopped { status, stderr: stderr.join("\n"), stdout }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One row of the summary: (sender, encap, session, direction) → (packets, bytes, lost,
/// reordered), the last two `None` where the stream has no sequence numbers.
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    pub sender: String,
    pub encap: String,
    pub session: u32,
    pub name: String,
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
    pub lost: Option<u64>,
    pub reordered: Option<u64>,
}

/// The rows of the last summary in `stderr`, and its closing line.
pub fn summary(stderr: &str) -> (Vec<Row>, String) {
    let last = stderr.rfind("SENDER ").unwrap_or_else(|| panic!("no summary in:\n{stderr}"));
    let mut rows = Vec::new();
    for line in stderr[last..].lines().skip(1) {
        if line.starts_with("undecodable ") {
            return (rows, line.to_owned());
        }
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.len() < 8 || line.starts_with(' ') || line.starts_with('(') {
            continue;
        }
        let n = cells.len();
        let number = |s: &str| s.parse::<u64>().ok();
        rows.push(Row {
            sender: cells[0].into(),
            encap: cells[1].into(),
            session: cells[2].parse().expect("session"),
            name: cells[3..n - 5].join(" "),
            direction: cells[n - 5].into(),
            packets: number(cells[n - 4]).expect("packets"),
            bytes: number(cells[n - 3]).expect("bytes"),
            lost: number(cells[n - 2]),
            reordered: number(cells[n - 1]),
        });
    }
    panic!("summary without its closing line:\n{stderr}");
}

/// A number in the summary's closing line: `undecodable N`, `(not --from) N`.
pub fn closing_count(closing: &str, after: &str) -> u64 {
    let at = closing.find(after).unwrap_or_else(|| panic!("{after:?} not in {closing:?}")) + after.len();
    closing[at..].split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()).unwrap().parse().unwrap()
}

/// A packet of a pcapng capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPacket {
    pub interface: String,
    pub data: Vec<u8>,
    pub original_len: u32,
    /// The direction bits of `epb_flags`: 1 inbound, 2 outbound, 0 unknown.
    pub direction: u32,
}

/// Every packet of a pcapng stream, with its interface's name. Panics on any malformed or
/// partial block.
pub fn read_pcapng(bytes: &[u8]) -> Vec<CapturedPacket> {
    let mut reader = PcapNgReader::new(bytes).expect("a pcapng section header");
    let mut names = Vec::new();
    let mut packets = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.expect("a whole, valid pcapng block") {
            Block::InterfaceDescription(idb) => names.push(
                idb.options
                    .iter()
                    .find_map(|o| match o {
                        InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .expect("every interface is named"),
            ),
            Block::EnhancedPacket(epb) => packets.push(CapturedPacket {
                interface: names[epb.interface_id as usize].clone(),
                data: epb.data.to_vec(),
                original_len: epb.original_len,
                direction: epb
                    .options
                    .iter()
                    .find_map(|o| match o {
                        EnhancedPacketOption::Flags(f) => Some(f & 3),
                        _ => None,
                    })
                    .unwrap_or(0),
            }),
            Block::SectionHeader(_) => names.clear(),
            _ => {}
        }
    }
    packets
}

pub fn read_pcapng_file(path: &Path) -> Vec<CapturedPacket> {
    read_pcapng(&std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// How many packets tshark and tcpdump read from a capture (both must open it); `None` where
/// tshark is not installed.
pub fn tools_count(path: &Path) -> Option<(usize, usize)> {
    let tshark = std::process::Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args(["-T", "fields", "-e", "frame.number"])
        .output();
    let tshark = match tshark {
        Ok(out) => out,
        Err(e) => {
            eprintln!("!!! tshark is not installed ({e}): `cargo xtask setup` installs it");
            return None;
        }
    };
    assert!(tshark.status.success(), "tshark -r failed: {}", String::from_utf8_lossy(&tshark.stderr));
    let tcpdump =
        std::process::Command::new("tcpdump").arg("-n").arg("-r").arg(path).output().expect("tcpdump");
    assert!(tcpdump.status.success(), "tcpdump -r failed: {}", String::from_utf8_lossy(&tcpdump.stderr));
    Some((
        String::from_utf8_lossy(&tshark.stdout).lines().count(),
        String::from_utf8_lossy(&tcpdump.stdout).lines().filter(|l| !l.starts_with('\t')).count(),
    ))
}

/// A raw IPv4 socket sending GRE from one of the namespace's addresses.
pub struct GreSender {
    fd: OwnedFd,
}

impl GreSender {
    pub fn open(ns: &Netns, source: [u8; 4]) -> GreSender {
        let fd = ns.enter(move || {
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_GRE) };
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: `raw` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let addr = sockaddr(source);
            // SAFETY: addr is a valid sockaddr_in of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        });
        GreSender { fd }
    }

    /// Sends `gre` (GRE header and payload) to `to`.
    pub fn send(&self, to: [u8; 4], gre: &[u8]) {
        let addr = sockaddr(to);
        // SAFETY: buffer and address are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                gre.as_ptr().cast(),
                gre.len(),
                0,
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(n, gre.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
        sin_zero: [0; 8],
    }
}

/// A GRE header (optional key and sequence) and payload.
pub fn gre(key: Option<u32>, seq: Option<u32>, protocol: u16, payload: &[u8]) -> Vec<u8> {
    let flags: u16 = if key.is_some() { 0x2000 } else { 0 } | if seq.is_some() { 0x1000 } else { 0 };
    let mut g = flags.to_be_bytes().to_vec();
    g.extend_from_slice(&protocol.to_be_bytes());
    for word in [key, seq].into_iter().flatten() {
        g.extend_from_slice(&word.to_be_bytes());
    }
    g.extend_from_slice(payload);
    g
}

/// ERSPAN type III's header: span id, D bit, hardware id.
pub fn erspan3(span: u16, d: u8, hwid: u8) -> Vec<u8> {
    let mut h = vec![0x20, 0x00];
    h.extend_from_slice(&span.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    h.extend_from_slice(&((u16::from(hwid) << 4) | (u16::from(d) << 3)).to_be_bytes());
    h
}

/// ERSPAN type II's header: span id, port index.
pub fn erspan2(span: u16, index: u32) -> Vec<u8> {
    let mut h = vec![0x10, 0x00];
    h.extend_from_slice(&span.to_be_bytes());
    h.extend_from_slice(&index.to_be_bytes());
    h
}
