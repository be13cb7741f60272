//! A tc program vmsniff did not create, standing for another tool's (Cilium's, a firewall's):
//! it counts the test's marked frames and lets every frame go on. Assembled here and loaded with
//! the bpf(2) syscall, so nothing about it comes from vmsniff's own object or loader.
//!
//! It attaches either as a classic clsact filter (`tc filter ... bpf da object-pinned`) or, on
//! Linux >= 6.6, as a TCX link; either way the test can check that it keeps seeing every frame
//! while vmsniff is attached and after it detaches.
use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

use crate::{frames::ETHERTYPE_TEST, netns::Netns, run};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SKB_LOAD_BYTES: i32 = 26;

/// Mounts bpffs at /sys/fs/bpf unless it is there, as `tc` does before pinning: on a freshly
/// booted host nothing may have mounted it yet (vmsniff mounts it too, but the other tool comes
/// first here).
fn mount_bpffs() {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    let bpffs = std::path::Path::new("/sys/fs/bpf");
    if statfs(bpffs).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC) {
        return;
    }
    nix::mount::mount(Some("bpf"), bpffs, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
        .expect("mounting bpffs at /sys/fs/bpf for the foreign program's pin");
}

/// One eBPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

/// The program: if the frame's ethertype is the tests' 0x88b5, add one to map[0]; return
/// TC_ACT_UNSPEC (TCX_NEXT), so whatever comes after it runs.
fn program(map_fd: i32) -> Vec<Insn> {
    // Read little-endian from the stack, the big-endian ethertype 0x88b5 is 0xb588.
    let ethertype = i32::from(ETHERTYPE_TEST.swap_bytes());
    vec![
        insn(0xbf, 6, 1, 0, 0),                       // r6 = ctx
        insn(0xbf, 1, 6, 0, 0),                       // r1 = ctx
        insn(0xb7, 2, 0, 0, 12),                      // r2 = 12 (ethertype offset)
        insn(0xbf, 3, 10, 0, 0),                      // r3 = fp
        insn(0x07, 3, 0, 0, -8),                      // r3 -= 8
        insn(0xb7, 4, 0, 0, 2),                       // r4 = 2 bytes
        insn(0x85, 0, 0, 0, BPF_FUNC_SKB_LOAD_BYTES), // call bpf_skb_load_bytes
        insn(0x55, 0, 0, 11, 0),                      // if r0 != 0 goto out
        insn(0x69, 1, 10, -8, 0),                     // r1 = *(u16 *)(fp - 8)
        insn(0x55, 1, 0, 9, ethertype),               // if r1 != 0x88b5 goto out
        insn(0x62, 10, 0, -4, 0),                     // *(u32 *)(fp - 4) = 0 (the key)
        insn(0xbf, 2, 10, 0, 0),                      // r2 = fp
        insn(0x07, 2, 0, 0, -4),                      // r2 -= 4
        insn(0x18, 1, 1, 0, map_fd),                  // r1 = map (ld_imm64, pseudo map fd)
        insn(0x00, 0, 0, 0, 0),
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 2, 0),                        // if r0 == 0 goto out
        insn(0xb7, 1, 0, 0, 1),                        // r1 = 1
        insn(0xdb, 0, 1, 0, 0),                        // lock *(u64 *)(r0 + 0) += r1
        insn(0xb7, 0, 0, 0, -1),                       // out: r0 = TC_ACT_UNSPEC
        insn(0x95, 0, 0, 0, 0),                        // exit
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<i32> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size for this command.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret as i32) }
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Where the program is attached.
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn tc_name(&self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// A loaded counter program and its map.
pub struct ForeignCounter {
    map: OwnedFd,
    program: OwnedFd,
    /// A TCX link, held open: closing it detaches the program.
    link: Option<OwnedFd>,
    pin: Option<PathBuf>,
}

impl ForeignCounter {
    pub fn load() -> ForeignCounter {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_ARRAY);
        put_u32(&mut attr, 4, 4);
        put_u32(&mut attr, 8, 8);
        put_u32(&mut attr, 12, 1);
        let map = owned(bpf(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE for the foreign counter"));

        let insns = program(map.as_raw_fd());
        let license = CString::new("GPL").unwrap();
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
        put_u32(&mut attr, 4, insns.len() as u32);
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        put_u32(&mut attr, 24, 1);
        put_u32(&mut attr, 28, log.len() as u32);
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
        attr[48..48 + 7].copy_from_slice(b"foreign");
        let program = match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => owned(fd),
            Err(e) => panic!(
                "loading the foreign counter program: {e}\n{}",
                String::from_utf8_lossy(&log).trim_end_matches('\0')
            ),
        };
        ForeignCounter { map, program, link: None, pin: None }
    }

    /// Attaches as a clsact filter at `priority`, as `tc` would (creating clsact if needed).
    pub fn attach_clsact(&mut self, ns: &Netns, dev: &str, hook: Hook, priority: u16) {
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/vmsniff-test-foreign-{}-{}",
            std::process::id(),
            self.program.as_raw_fd()
        ));
        mount_bpffs();
        let path = CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
        let mut attr = [0u8; 128];
        put_u64(&mut attr, 0, path.as_ptr() as u64);
        put_u32(&mut attr, 8, self.program.as_raw_fd() as u32);
        bpf(BPF_OBJ_PIN, &mut attr).expect("pinning the foreign counter for tc");
        self.pin = Some(pin.clone());
        // tc runs on a thread inside the namespace, not through `ip netns exec`, which remounts
        // /sys and with it hides the pin.
        let (dev, hook) = (dev.to_owned(), hook.tc_name());
        ns.enter(move || {
            let qdisc = std::process::Command::new("tc").args(["qdisc", "show", "dev", &dev]).output();
            if !String::from_utf8_lossy(&qdisc.expect("tc qdisc show").stdout).contains("clsact") {
                run("tc", &["qdisc", "add", "dev", &dev, "clsact"]);
            }
            let (priority, pin) = (priority.to_string(), pin.display().to_string());
            run(
                "tc",
                &["filter", "add", "dev", &dev, hook, "prio", &priority, "handle", "0x77", "bpf", "da"]
                    .into_iter()
                    .chain(["object-pinned", &pin])
                    .collect::<Vec<_>>(),
            );
        });
    }

    /// Attaches as a TCX link (Linux >= 6.6), after the programs already there. The syscall runs
    /// inside the namespace: the kernel reads the ifindex in the caller's.
    pub fn attach_tcx(&mut self, ns: &Netns, dev: &str, hook: Hook) {
        let ifindex = ns.ifindex(dev);
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, self.program.as_raw_fd() as u32);
        put_u32(&mut attr, 4, ifindex);
        put_u32(
            &mut attr,
            8,
            match hook {
                Hook::Ingress => BPF_TCX_INGRESS,
                Hook::Egress => BPF_TCX_EGRESS,
            },
        );
        let link = ns.enter(move || bpf(BPF_LINK_CREATE, &mut attr).expect("creating the foreign TCX link"));
        self.link = Some(owned(link));
    }

    /// The marked frames the program has seen.
    pub fn count(&self) -> u64 {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, self.map.as_raw_fd() as u32);
        put_u64(&mut attr, 8, (&raw const key) as u64);
        put_u64(&mut attr, 16, (&raw mut value) as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).expect("reading the foreign counter");
        value
    }
}

impl Drop for ForeignCounter {
    fn drop(&mut self) {
        if let Some(pin) = &self.pin {
            let _ = std::fs::remove_file(pin);
        }
    }
}
