//! A tap whose file descriptor is the VM's NIC.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::netns::Netns;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 218, unsigned int)` of linux/if_tun.h, which the libc crate lacks.
const TUNSETIFINDEX: libc::c_ulong = 0x4004_54da;

/// The VM side of a tap.
pub struct Vm {
    file: File,
    pub tap: String,
    /// When the tap came into existence (TUNSETIFF), before it was set up.
    pub created: Instant,
}

impl Vm {
    /// Creates tap `name` in `ns` and brings it up; the tap lives while this value does.
    pub fn create(ns: &Netns, name: &str) -> Vm {
        Self::create_at(ns, name, None)
    }

    /// The same with the ifindex the kernel is to give the tap (as CRIU restores one).
    pub fn create_at(ns: &Netns, name: &str, ifindex: Option<u32>) -> Vm {
        let owned = name.to_owned();
        let file = ns.enter(move || {
            let file =
                OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
            if let Some(ifindex) = ifindex {
                // SAFETY: TUNSETIFINDEX reads an unsigned int, before TUNSETIFF creates the tap.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFINDEX, &ifindex) };
                assert_eq!(rc, 0, "TUNSETIFINDEX: {}", std::io::Error::last_os_error());
            }
            let mut req = IfReq {
                name: [0; 16],
                flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
                _pad: [0; 22],
            };
            req.name[..owned.len()].copy_from_slice(owned.as_bytes());
            // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            (file, Instant::now())
        });
        let (file, created) = file;
        ns.sh(&format!("ip link set {name} up"));
        Vm { file, tap: name.to_owned(), created }
    }

    /// Deletes the tap and creates it again under the same name, as a VM's hard reboot or a
    /// migration back does: the new tap has a new ifindex and is down until set up.
    pub fn recreate(&mut self, ns: &Netns) {
        // Closing the last descriptor of a non-persistent tap deletes it.
        self.file = File::open("/dev/null").expect("open /dev/null");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.link_names().contains(&self.tap) {
            assert!(Instant::now() < deadline, "tap {} was not deleted", self.tap);
            std::thread::sleep(Duration::from_millis(10));
        }
        *self = Vm::create(ns, &self.tap);
    }

    /// Deletes the tap, as libvirt does when the VM leaves the node; [`Vm::recreate`] makes it
    /// again.
    pub fn unplug(&mut self, ns: &Netns) {
        // Closing the last descriptor of a non-persistent tap deletes it.
        self.file = File::open("/dev/null").expect("open /dev/null");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.link_names().contains(&self.tap) {
            assert!(Instant::now() < deadline, "tap {} was not deleted", self.tap);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VM sends a frame.
    pub fn send(&mut self, frame: &[u8]) {
        let n = self.file.write(frame).expect("write to tap");
        assert_eq!(n, frame.len());
    }

    /// The next frame the VM receives, within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&self.file), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, ms).expect("poll tap") == 0 {
                continue;
            }
            let mut buf = vec![0u8; 65536];
            let n = self.file.read(&mut buf).expect("read tap");
            buf.truncate(n);
            return Some(buf);
        }
    }

    /// Frames the VM receives that carry the test marker, until `count` or `timeout`.
    pub fn recv_marked(&mut self, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(frame) if crate::frames::is_marked(&frame) => frames.push(frame),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }
}
