//! The fast path for GRE, ERSPAN and VXLAN: an AF_PACKET socket with a TPACKET_V3 ring.
//!
//! The kernel copies each matching packet into a memory-mapped block in its receive softirq and
//! wakes the collector once per block (or after [`BLOCK_TIMEOUT_MS`]), so reading a copy costs
//! no syscall, no skb queued on a socket and no copy out of the kernel: the way tcpdump reads.
//! A classic BPF filter keeps only packets addressed to this host's link address (`PACKET_HOST`)
//! that are GRE (IPv4, IPv6) or UDP to the VXLAN port. IPv4 fragments are made whole in
//! reassembly.rs. IPv6 copies are never fragmented by Linux senders; an IPv6 fragment is
//! counted.
//!
//! An AF_PACKET socket sees packets before the IP stack, so the destination address is checked
//! here ([`LocalAddresses`]): a host that routes GRE for others does not record it.
use std::{
    cell::Cell,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::{
    decode::Undecodable,
    sockets::{attach_program, setsockopt_raw, socket},
};

/// Each block holds many copies: the kernel wakes the reader once per block.
const BLOCK_SIZE: usize = 1 << 20;
/// A block that is not full is handed over after this long, so a quiet session's copies are
/// written within about a flush interval too.
const BLOCK_TIMEOUT_MS: u32 = 10;
/// How long after the last copy its block is surely handed over: the kernel's timer retires a
/// block on its second expiry without new blocks, so within two timeouts.
pub const LAST_BLOCK_WAIT: Duration = Duration::from_millis(3 * BLOCK_TIMEOUT_MS as u64);
/// The ring's size when `--buffer-size` is not given, in MiB (tcpdump's default is 2 MiB; a
/// collector takes bursts from many hypervisors).
pub const DEFAULT_RING_MIB: usize = 64;
/// `tp_frame_size` means nothing to TPACKET_V3 (packets are packed by their length) but must
/// divide the block.
const FRAME_SIZE: usize = 2048;

const ETH_P_ALL: u16 = 0x0003;
pub(super) const ETH_P_IP: u32 = 0x0800;
pub(super) const ETH_P_IPV6: u32 = 0x86dd;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_FRAGMENT: u8 = 44;

/// One classic BPF instruction.
pub(super) const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

// Classic BPF opcodes, as linux/filter.h composes them.
pub(super) const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
pub(super) const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
pub(super) const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
pub(super) const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
pub(super) const AD_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;
const AD_PKTTYPE: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;

/// The ring's filter: packets for this host's link address that are GRE over IPv4 or IPv6, an
/// IPv6 fragment of GRE or UDP (counted, not reassembled), or UDP to `vxlan_port`. It sees the
/// network header at offset 0 (a SOCK_DGRAM packet socket).
pub fn receive_filter(vxlan_port: Option<u16>) -> Vec<libc::sock_filter> {
    // Without a VXLAN port no UDP is wanted: a loaded byte never equals 256.
    let udp = vxlan_port.map_or(0x100, |_| u32::from(IPPROTO_UDP));
    let port = u32::from(vxlan_port.unwrap_or(0));
    // Jump offsets count from the next instruction: targets 18 (port), 19 (drop), 20 (accept).
    vec![
        /* 0 */ insn(LD_W_ABS, 0, 0, AD_PKTTYPE),
        /* 1 */ insn(JEQ_K, 0, 17, u32::from(libc::PACKET_HOST)),
        /* 2 */ insn(LD_W_ABS, 0, 0, AD_PROTOCOL),
        /* 3 */ insn(JEQ_K, 0, 8, ETH_P_IP), // else 12
        /* 4 */ insn(LD_B_ABS, 0, 0, 9),
        /* 5 */ insn(JEQ_K, 14, 0, u32::from(IPPROTO_GRE)),
        /* 6 */ insn(JEQ_K, 0, 12, udp),
        // A UDP fragment after the first has no port: kept, for reassembly to decide.
        /* 7 */
        insn(LD_H_ABS, 0, 0, 6),
        /* 8 */ insn(JSET_K, 11, 0, 0x1fff),
        /* 9 */ insn(LDX_B_MSH, 0, 0, 0),
        /* 10 */ insn(LD_H_IND, 0, 0, 2),
        /* 11 */ insn(JA, 0, 0, 6),
        /* 12 */ insn(JEQ_K, 0, 6, ETH_P_IPV6),
        /* 13 */ insn(LD_B_ABS, 0, 0, 6),
        /* 14 */ insn(JEQ_K, 5, 0, u32::from(IPPROTO_GRE)),
        /* 15 */ insn(JEQ_K, 4, 0, u32::from(IPPROTO_FRAGMENT)),
        /* 16 */ insn(JEQ_K, 0, 2, udp),
        /* 17 */ insn(LD_H_ABS, 0, 0, 40 + 2),
        /* 18 */ insn(JEQ_K, 1, 0, port),
        /* 19 */ insn(RET_K, 0, 0, 0),
        /* 20 */ insn(RET_K, 0, 0, u32::MAX),
    ]
}

/// A filter that takes nothing: on the raw GRE and VXLAN sockets kept open beside the ring, so
/// that this host does not answer the copies with ICMP "protocol (port) unreachable" while the
/// ring reads them.
pub fn drop_all_filter() -> Vec<libc::sock_filter> {
    vec![insn(RET_K, 0, 0, 0)]
}

/// Why the ring could not be set up; each names the step.
#[derive(Debug, thiserror::Error)]
#[error("{op}")]
pub struct RingError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

pub(super) fn step(op: &'static str) -> impl FnOnce(io::Error) -> RingError {
    move |source| RingError { op, source }
}

/// One packet read from the ring: the network header onward, and the kernel's receive time.
pub struct RingPacket<'a> {
    pub data: &'a [u8],
    pub timestamp: Duration,
}

/// A TPACKET_V3 receive ring, mapped into this process.
pub struct Ring {
    fd: OwnedFd,
    base: *mut u8,
    blocks: usize,
    /// The next block to read: the kernel fills them in order. A Cell: blocks are read
    /// through a shared borrow of the ring.
    next: Cell<usize>,
}

// SAFETY: the mapping belongs to this value alone (no other handle to it is given out beyond a
// borrow of `self`), so it can move to another thread with it.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring of `mib` MiB on every interface of this network namespace, taking what `filter`
    /// keeps. Needs CAP_NET_RAW.
    pub fn open(filter: &[libc::sock_filter], mib: usize) -> Result<Ring, RingError> {
        let fd =
            socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0).map_err(step("cannot open an AF_PACKET socket"))?;
        // Only the host's input: copies this host sends (a hypervisor collecting its own) are
        // read once, as they come back in. Linux 4.20 and later; earlier, the filter does it.
        let _ = setsockopt_raw(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1 as &libc::c_int);
        // Timestamps taken when a packet first enters the host, kept as it climbs from a bridge
        // port, bond slave or VLAN's parent to the device with the address: the ring sees it
        // at each, and [`Repeats`] tells the repeats by their equal timestamps.
        setsockopt_raw(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &1 as &libc::c_int)
            .map_err(step("cannot ask for receive timestamps"))?;
        attach_program(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, filter)
            .map_err(step("cannot attach the collector's packet filter"))?;
        let version = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt_raw(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)
            .map_err(step("this kernel has no TPACKET_V3 (Linux 3.2 and later)"))?;
        let blocks = (mib << 20) / BLOCK_SIZE;
        let request = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: (blocks * (BLOCK_SIZE / FRAME_SIZE)) as u32,
            tp_retire_blk_tov: BLOCK_TIMEOUT_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt_raw(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &request)
            .map_err(step("cannot set up the receive ring (memory: try a smaller --buffer-size)"))?;
        let size = blocks * BLOCK_SIZE;
        // SAFETY: maps the ring the kernel just allocated for this socket, shared, at its size.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(RingError { op: "cannot map the receive ring", source: io::Error::last_os_error() });
        }
        let ring = Ring { fd, base: base.cast(), blocks, next: Cell::new(0) };
        // SAFETY: all-zero bytes are a valid sockaddr_ll; the fields that matter are set.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = ETH_P_ALL.to_be();
        address.sll_ifindex = 0;
        // SAFETY: `address` is a live sockaddr_ll and its size is given.
        let rc = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(RingError {
                op: "cannot bind the AF_PACKET socket",
                source: io::Error::last_os_error(),
            });
        }
        Ok(ring)
    }

    fn block(&self, index: usize) -> *mut libc::tpacket_block_desc {
        // SAFETY: `index` < `self.blocks`: the block lies inside the mapping.
        unsafe { self.base.add(index * BLOCK_SIZE) }.cast()
    }

    fn status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: block_status is an aligned u32 in the mapped block, written by the kernel and
        // by `release`: atomics are how both sides see each other's writes.
        unsafe { &*(&raw mut (*self.block(index)).hdr.bh1.block_status).cast::<AtomicU32>() }
    }

    /// Whether the next block is the reader's.
    pub fn ready(&self) -> bool {
        self.status(self.next.get()).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Hands the packets of the next block to `read`, then the block back to the kernel; None
    /// when the next block is still the kernel's. The packets borrow the block: they are read
    /// before it is handed back.
    pub fn read_block<R>(&self, read: impl FnOnce(BlockPackets<'_>) -> R) -> Option<R> {
        if !self.ready() {
            return None;
        }
        let index = self.next.get();
        let block = self.block(index);
        // SAFETY: the block is the reader's (TP_STATUS_USER, acquired above) until released.
        let header = unsafe { (*block).hdr.bh1 };
        // SAFETY: a block of BLOCK_SIZE bytes inside the mapping.
        let bytes = unsafe { std::slice::from_raw_parts(block.cast::<u8>().cast_const(), BLOCK_SIZE) };
        let result = read(BlockPackets {
            bytes,
            offset: Some(header.offset_to_first_pkt as usize),
            left: header.num_pkts,
        });
        self.status(index).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.next.set((index + 1) % self.blocks);
        Some(result)
    }

    /// What the kernel dropped since the last call because the ring was full.
    pub fn take_drops(&self) -> io::Result<u64> {
        // SAFETY: all-zero bytes are valid tpacket_stats_v3.
        let mut stats: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are live and describe the struct PACKET_STATISTICS fills.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &raw mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::from(stats.tp_drops))
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.blocks * BLOCK_SIZE) };
    }
}

/// The packets of one ring block, in the order the kernel wrote them.
pub struct BlockPackets<'a> {
    bytes: &'a [u8],
    /// Where the next packet's header is; None once the kernel's offsets end or do not fit.
    offset: Option<usize>,
    left: u32,
}

impl<'a> Iterator for BlockPackets<'a> {
    type Item = RingPacket<'a>;

    fn next(&mut self) -> Option<RingPacket<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let Some((packet, next)) = packet_at(self.bytes, self.offset?) else {
            self.offset = None;
            return None;
        };
        self.offset = if next == 0 { None } else { self.offset.and_then(|o| o.checked_add(next)) };
        Some(packet)
    }
}

/// The packet whose tpacket3_hdr is at `offset` of `block`, and the offset to the next one;
/// None when the kernel's offsets do not fit the block.
fn packet_at(block: &[u8], offset: usize) -> Option<(RingPacket<'_>, usize)> {
    let header_len = std::mem::size_of::<libc::tpacket3_hdr>();
    let header = block.get(offset..offset.checked_add(header_len)?)?;
    // SAFETY: `header` holds a whole tpacket3_hdr, read unaligned.
    let h: libc::tpacket3_hdr = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
    let start = offset.checked_add(usize::from(h.tp_net))?;
    let data = block.get(start..start.checked_add(h.tp_snaplen as usize)?)?;
    let timestamp = Duration::new(u64::from(h.tp_sec), h.tp_nsec);
    Some((RingPacket { data, timestamp }, h.tp_next_offset as usize))
}

/// Packets read lately, to tell a packet the ring sees again: a packet socket on every
/// interface receives a packet on each device it crosses on its way up (a bridge port and the
/// bridge, a bond slave and the bond, an Open vSwitch port and `br-ex`, a VLAN's parent and the
/// VLAN), where a raw socket saw it once. Such a repeat is the same packet with the same receive
/// timestamp (to the nanosecond, taken once on entry), length and bytes; it comes right after
/// the first, give or take packets from other CPUs.
pub struct Repeats {
    /// Receive timestamps (ns) of the recent packets, and the fingerprints of those read in
    /// earlier blocks (see [`BlockRepeats`] for this block's).
    timestamps: [u64; REPEAT_WINDOW],
    fingerprints: [u64; REPEAT_WINDOW],
    /// Entries filled so far (up to the window), so that a zeroed entry never matches.
    filled: usize,
    next: usize,
}

const REPEAT_WINDOW: usize = 8;
/// The bytes that tell packets apart when their timestamps are equal: headers, with the IPv4
/// id and GRE sequence number.
const FINGERPRINT_BYTES: usize = 96;

impl Repeats {
    pub fn new() -> Repeats {
        Repeats { timestamps: [0; REPEAT_WINDOW], fingerprints: [0; REPEAT_WINDOW], filled: 0, next: 0 }
    }

    /// The window while one block is read.
    pub fn block<'a>(&mut self) -> BlockRepeats<'_, 'a> {
        BlockRepeats { window: self, here: [None; REPEAT_WINDOW] }
    }
}

impl Default for Repeats {
    fn default() -> Self {
        Repeats::new()
    }
}

/// [`Repeats`] while a block is read. A packet of this block stays in the window as its bytes
/// in the ring, and is fingerprinted only when the block ends still holding it: a packet is
/// compared with another only when their timestamps are equal, which is rare outside repeats,
/// and fingerprinting every packet was a twelfth of a copy's cost.
pub struct BlockRepeats<'w, 'a> {
    window: &'w mut Repeats,
    /// For each window entry of this block, the packet's bytes.
    here: [Option<&'a [u8]>; REPEAT_WINDOW],
}

impl<'a> BlockRepeats<'_, 'a> {
    /// Whether `packet` was read just before; remembers it otherwise.
    pub fn repeat(&mut self, packet: &RingPacket<'a>) -> bool {
        let timestamp = packet.timestamp.as_nanos() as u64;
        let window = &mut *self.window;
        let mut fingerprinted = None;
        for i in 0..window.filled {
            if window.timestamps[i] != timestamp {
                continue;
            }
            let same = match self.here[i] {
                Some(earlier) => same_head(earlier, packet.data),
                None => {
                    window.fingerprints[i] == *fingerprinted.get_or_insert_with(|| fingerprint(packet.data))
                }
            };
            if same {
                return true;
            }
        }
        window.timestamps[window.next] = timestamp;
        self.here[window.next] = Some(packet.data);
        window.next = (window.next + 1) % REPEAT_WINDOW;
        window.filled = (window.filled + 1).min(REPEAT_WINDOW);
        false
    }
}

impl Drop for BlockRepeats<'_, '_> {
    /// The block is given back to the kernel after this: what stays in the window is kept as
    /// fingerprints.
    fn drop(&mut self) {
        for (i, data) in self.here.iter().enumerate() {
            if let Some(data) = data {
                self.window.fingerprints[i] = fingerprint(data);
            }
        }
    }
}

/// What a fingerprint stands for, compared in full: the length and the first bytes.
fn same_head(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a[..a.len().min(FINGERPRINT_BYTES)] == b[..b.len().min(FINGERPRINT_BYTES)]
}

/// A cheap mix of a packet's length and first bytes: it only has to tell apart packets whose
/// timestamps are equal to the nanosecond, so it need not resist anyone. Each word is rotated
/// by its place (the same bytes elsewhere differ) and folded in without a multiply per word,
/// which made this a seventh of a copy's cost. The length is spread over the whole word first:
/// left as it is, it would cancel against the low bits of the first word (a packet one byte
/// longer whose first byte differs by the same bit would match).
fn fingerprint(data: &[u8]) -> u64 {
    let head = &data[..data.len().min(FINGERPRINT_BYTES)];
    let mut mixed = (data.len() as u64).wrapping_mul(FINGERPRINT_MULTIPLIER);
    // Whole words without a copy each (a tenth of a copy's cost with one), the tail once.
    let words = head.chunks_exact(8);
    let tail = words.remainder();
    let places = words.len();
    for (place, word) in words.enumerate() {
        let word =
            u64::from_le_bytes([word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7]]);
        mixed ^= word.rotate_left(place as u32 * 5);
    }
    if !tail.is_empty() {
        let mut word = [0; 8];
        word[..tail.len()].copy_from_slice(tail);
        mixed ^= u64::from_le_bytes(word).rotate_left(places as u32 * 5);
    }
    (mixed ^ (mixed >> 29)).wrapping_mul(FINGERPRINT_MULTIPLIER)
}

/// 2^64 divided by the golden ratio: odd, and its bits spread whatever it multiplies.
const FINGERPRINT_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// What a packet from the ring is to the collector.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified<'a> {
    /// A whole IPv4 packet carrying GRE (what a raw IPv4 socket returns).
    GreV4(&'a [u8]),
    /// GRE over IPv6: the GRE header onward, and the sender.
    GreV6 { sender: IpAddr, gre: &'a [u8] },
    /// VXLAN: the VXLAN header onward, and the sender.
    Vxlan { sender: IpAddr, datagram: &'a [u8] },
}

/// Sorts a whole IPv4 packet already checked by [`ipv4_for_this_host`] (and reassembled).
pub fn classify_ipv4(packet: &[u8], vxlan_port: Option<u16>) -> Result<Classified<'_>, Undecodable> {
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    match packet[9] {
        IPPROTO_GRE => Ok(Classified::GreV4(packet)),
        IPPROTO_UDP => {
            let sender = IpAddr::V4(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]));
            vxlan(sender, &packet[header_len..], vxlan_port)
        }
        _ => Err(Undecodable::NotGre),
    }
}

/// Sorts an IPv6 packet the filter let through, and checks it is addressed to this host.
pub fn classify_ipv6<'a>(
    packet: &'a [u8],
    vxlan_port: Option<u16>,
    local: &mut LocalAddresses,
) -> Result<Classified<'a>, Undecodable> {
    if packet.first().map(|b| b >> 4) != Some(6) {
        return Err(Undecodable::NotIpv4);
    }
    if packet.len() < 40 {
        return Err(Undecodable::TruncatedIp);
    }
    let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    let Some(body) = packet.get(40..40 + payload) else {
        return Err(Undecodable::TruncatedIp);
    };
    let address = |at: usize| {
        let mut octets = [0; 16];
        octets.copy_from_slice(&packet[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    if !local.contains(IpAddr::V6(address(24))) {
        return Err(Undecodable::NotForThisHost);
    }
    let sender = IpAddr::V6(address(8));
    match packet[6] {
        IPPROTO_GRE => Ok(Classified::GreV6 { sender, gre: body }),
        IPPROTO_UDP => vxlan(sender, body, vxlan_port),
        IPPROTO_FRAGMENT => Err(Undecodable::Ipv6Fragment),
        _ => Err(Undecodable::NotGre),
    }
}

/// An IPv4 packet whose header holds, without link-layer padding, when it is addressed to
/// this host.
pub fn ipv4_for_this_host<'a>(packet: &'a [u8], local: &mut LocalAddresses) -> Result<&'a [u8], Undecodable> {
    if packet.len() < 20 {
        return Err(Undecodable::TruncatedIp);
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < 20 || total < header_len || packet.len() < total {
        return Err(Undecodable::TruncatedIp);
    }
    // Link-layer padding of short packets is not part of them.
    let packet = &packet[..total];
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if !local.contains(IpAddr::V4(destination)) {
        return Err(Undecodable::NotForThisHost);
    }
    Ok(packet)
}

/// A UDP datagram's payload when it is addressed to the VXLAN port.
fn vxlan(sender: IpAddr, udp: &[u8], port: Option<u16>) -> Result<Classified<'_>, Undecodable> {
    if udp.len() < 8 {
        return Err(Undecodable::TruncatedVxlan);
    }
    let length = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if port != Some(u16::from_be_bytes([udp[2], udp[3]])) || length < 8 || length > udp.len() {
        return Err(Undecodable::NotGre);
    }
    Ok(Classified::Vxlan { sender, datagram: &udp[8..length] })
}

/// This host's addresses, read again when a packet names one not known (at most once a
/// second: a flood to other hosts cannot make the collector read them on every packet).
pub struct LocalAddresses {
    addresses: Vec<IpAddr>,
    read_at: Option<Instant>,
}

const REREAD: Duration = Duration::from_secs(1);

impl LocalAddresses {
    pub fn new() -> LocalAddresses {
        LocalAddresses { addresses: Vec::new(), read_at: None }
    }

    #[cfg(test)]
    pub fn fixed(addresses: Vec<IpAddr>) -> LocalAddresses {
        LocalAddresses { addresses, read_at: Some(Instant::now() + Duration::from_secs(3600)) }
    }

    pub fn contains(&mut self, ip: IpAddr) -> bool {
        if self.addresses.contains(&ip) {
            return true;
        }
        if self.read_at.is_some_and(|at| at.elapsed() < REREAD) {
            return false;
        }
        self.read_at = Some(Instant::now());
        match nix::ifaddrs::getifaddrs() {
            Ok(interfaces) => {
                self.addresses = interfaces
                    .filter_map(|i| i.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect();
            }
            Err(e) => log::warn!("cannot read this host's addresses: {e}"),
        }
        self.addresses.contains(&ip)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collect::decode::tests::{gre, ipv4, ipv4_frame, vxlan};

    /// Runs a classic BPF program as the kernel would on a SOCK_DGRAM packet socket: the
    /// network header at offset 0, the packet type and EtherType as ancillary loads. Only the
    /// instructions these programs use; anything else fails the test.
    pub(crate) fn run(program: &[libc::sock_filter], packet: &[u8], pkttype: u8, protocol: u32) -> u32 {
        const TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
        const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
        const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
        const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
        const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |at: u32, size: usize| -> Option<u32> {
            match at {
                AD_PKTTYPE => Some(u32::from(pkttype)),
                AD_PROTOCOL => Some(protocol),
                _ => packet
                    .get(at as usize..at as usize + size)
                    .map(|b| b.iter().fold(0u32, |v, byte| v << 8 | u32::from(*byte))),
            }
        };
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS | LD_H_IND => {
                    let size = match i.code {
                        LD_W_ABS => 4,
                        LD_H_ABS | LD_H_IND => 2,
                        _ => 1,
                    };
                    let at = if i.code == LD_H_IND { x + i.k } else { i.k };
                    // An out-of-bounds load ends the program with 0, as in the kernel.
                    let Some(v) = load(at, size) else { return 0 };
                    a = v;
                }
                LDX_B_MSH => x = u32::from(packet[i.k as usize] & 0x0f) * 4,
                JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                JA => pc += i.k as usize,
                JSET_K => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                TAX => x = a,
                XOR_X => a ^= x,
                MUL_K => a = a.wrapping_mul(i.k),
                RSH_K => a >>= i.k,
                RET_K => return i.k,
                RET_A => return a,
                other => panic!("instruction {other:#x} not modelled"),
            }
        }
    }

    fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(payload);
        p
    }

    fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = 40000u16.to_be_bytes().to_vec();
        u.extend_from_slice(&port.to_be_bytes());
        u.extend_from_slice(&u16::try_from(payload.len() + 8).unwrap().to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    /// An IPv4 packet with a 24-byte header (an option), to check the UDP port is found by IHL.
    fn ipv4_with_option(protocol: u8, payload: &[u8]) -> Vec<u8> {
        let plain = ipv4(protocol, payload);
        let mut p = plain[..20].to_vec();
        p[0] = 0x46;
        p[2..4].copy_from_slice(&u16::try_from(plain.len() + 4).unwrap().to_be_bytes());
        p.extend_from_slice(&[1, 1, 1, 0]);
        p.extend_from_slice(&plain[20..]);
        p
    }

    #[test]
    fn the_filter_keeps_gre_and_the_vxlan_port_addressed_to_this_host() {
        let frame = ipv4_frame(60, 46);
        let gre4 = ipv4(47, &gre(false, Some(3), Some(1), crate::model::wire::PROTO_TEB, &frame));
        let vx = vxlan(7, &frame);
        let mut later_fragment = ipv4(17, &[0; 16]);
        later_fragment[6..8].copy_from_slice(&185u16.to_be_bytes());
        let cases: [(&str, Vec<u8>, u32, bool, bool); 10] = [
            ("a UDP fragment after the first", later_fragment, ETH_P_IP, true, false),
            ("GRE over IPv4", gre4.clone(), ETH_P_IP, true, true),
            ("GRE over IPv6", ipv6(47, &gre(false, Some(3), None, 0x6558, &frame)), ETH_P_IPV6, true, true),
            ("an IPv6 fragment", ipv6(44, &[47, 0, 0, 1, 0, 0, 0, 9]), ETH_P_IPV6, true, true),
            ("VXLAN over IPv4", ipv4(17, &udp(4789, &vx)), ETH_P_IP, true, false),
            ("VXLAN over IPv4 with options", ipv4_with_option(17, &udp(4789, &vx)), ETH_P_IP, true, false),
            ("VXLAN over IPv6", ipv6(17, &udp(4789, &vx)), ETH_P_IPV6, true, false),
            ("UDP to another port", ipv4(17, &udp(53, &vx)), ETH_P_IP, false, false),
            ("TCP", ipv4(6, &[0; 20]), ETH_P_IP, false, false),
            ("ARP", vec![0; 28], 0x0806, false, false),
        ];
        let with_port = receive_filter(Some(4789));
        let without = receive_filter(None);
        for (what, packet, protocol, kept_with_port, kept_without) in cases {
            let host = libc::PACKET_HOST;
            assert_eq!(run(&with_port, &packet, host, protocol) != 0, kept_with_port, "{what}, --vxlan-port");
            assert_eq!(run(&without, &packet, host, protocol) != 0, kept_without, "{what}");
            for other in [libc::PACKET_OTHERHOST, libc::PACKET_OUTGOING, libc::PACKET_BROADCAST] {
                assert_eq!(run(&with_port, &packet, other, protocol), 0, "{what} for another link address");
            }
        }
        assert_eq!(run(&with_port, &gre4, 0, ETH_P_IP), u32::MAX, "kept whole");
        // Truncated before the port: the kernel ends the program with 0.
        assert_eq!(run(&with_port, &ipv4(17, &[0, 1]), 0, ETH_P_IP), 0);
    }

    #[test]
    fn a_packet_seen_again_on_its_way_up_is_a_repeat_and_others_are_not() {
        let frame = ipv4_frame(60, 46);
        let a = ipv4(47, &gre(false, Some(3), Some(1), 0x6558, &frame));
        let b = ipv4(47, &gre(false, Some(3), Some(2), 0x6558, &frame));
        let at = |data: &'static [u8], ns: u64| RingPacket { data, timestamp: Duration::from_nanos(ns) };
        let (a, b): (&'static [u8], &'static [u8]) = (a.leak(), b.leak());
        // One byte longer, its first byte differing in the bit the length does.
        let mut longer = a.to_vec();
        longer.push(0);
        longer[0] ^= (a.len() ^ longer.len()) as u8;
        let longer: &'static [u8] = longer.leak();
        // Every step in one block (packets compared by their bytes), and each in a block of its
        // own (compared with the fingerprints of earlier blocks' packets): the same answers.
        for per_block in [usize::MAX, 1] {
            let steps: Vec<(RingPacket<'static>, bool, &str)> = vec![
                (at(a, 10), false, "a first packet"),
                (at(a, 10), true, "the bridge's delivery of the port's packet"),
                (at(b, 10), false, "another copy at the same nanosecond"),
                (at(a, 11), false, "the same bytes later: a copy sent twice, counted as such"),
                (at(longer, 11), false, "the length counts apart from the bytes"),
            ];
            let flush: Vec<_> = (100..108).map(|ns| (at(b, ns), false, "later packets")).collect();
            let after: Vec<(RingPacket<'static>, bool, &str)> = vec![
                (at(b, 107), true, "a repeat of the last"),
                (at(a, 10), false, "only a window of recent packets is kept"),
            ];
            let mut window = Repeats::new();
            for chunk in
                steps.iter().chain(&flush).chain(&after).collect::<Vec<_>>().chunks(per_block.min(64))
            {
                let mut repeats = window.block();
                for (packet, repeat, what) in chunk {
                    assert_eq!(repeats.repeat(packet), *repeat, "{what} (blocks of {per_block})");
                }
            }
        }
    }

    #[test]
    fn packets_are_sorted_and_checked_against_this_hosts_addresses() {
        let frame = ipv4_frame(60, 46);
        let here = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let mut local = LocalAddresses::fixed(vec![here, "2001:db8::2".parse().unwrap()]);
        let gre4 = ipv4(47, &gre(false, Some(3), Some(1), 0x6558, &frame));
        let mut padded = gre4.clone();
        padded.extend_from_slice(&[0; 6]);
        let ipv4 = |packet: &[u8], local: &mut LocalAddresses| -> Result<Vec<u8>, Undecodable> {
            let checked = ipv4_for_this_host(packet, local)?;
            assert_eq!(classify_ipv4(checked, None), Ok(Classified::GreV4(checked)));
            Ok(checked.to_vec())
        };
        assert_eq!(ipv4(&padded, &mut local), Ok(gre4.clone()), "padding cut");
        let mut elsewhere = gre4.clone();
        elsewhere[19] ^= 1;
        assert_eq!(ipv4(&elsewhere, &mut local), Err(Undecodable::NotForThisHost));
        assert_eq!(ipv4(&gre4[..30], &mut local), Err(Undecodable::TruncatedIp));
        let mut tcp = gre4.clone();
        tcp[9] = 6;
        assert_eq!(classify_ipv4(&tcp, None), Err(Undecodable::NotGre));
        assert_eq!(classify_ipv6(&gre4, None, &mut local), Err(Undecodable::NotIpv4));
        let vx = vxlan(7, &frame);
        let sender: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            classify_ipv6(&ipv6(17, &udp(4789, &vx)), Some(4789), &mut local),
            Ok(Classified::Vxlan { sender, datagram: &vx })
        );
        assert_eq!(
            classify_ipv6(&ipv6(17, &udp(4789, &vx)), Some(4790), &mut local),
            Err(Undecodable::NotGre)
        );
        assert_eq!(
            classify_ipv6(&ipv6(44, &[47, 0, 0, 1, 0, 0, 0, 9]), None, &mut local),
            Err(Undecodable::Ipv6Fragment)
        );
        let inner = gre(false, Some(3), None, 0x6558, &frame);
        assert_eq!(
            classify_ipv6(&ipv6(47, &inner), None, &mut local),
            Ok(Classified::GreV6 { sender, gre: &inner })
        );
        let mut short = ipv6(47, &inner);
        short.truncate(60);
        assert_eq!(classify_ipv6(&short, None, &mut local), Err(Undecodable::TruncatedIp));
    }
}
