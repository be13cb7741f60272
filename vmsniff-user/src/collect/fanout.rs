//! `--threads N`: N rings in one `PACKET_FANOUT` group, which hands each packet to the ring its
//! sender's address hashes to (a classic BPF program, `PACKET_FANOUT_CBPF`). A sender's copies
//! therefore all reach one ring, in the order they arrived: its sequence numbers are counted in
//! order, and its IPv4 fragments meet in one reassembly.
use super::{
    ring::{
        AD_PROTOCOL, ETH_P_IP, ETH_P_IPV6, JA, JEQ_K, LD_W_ABS, RET_K, Ring, RingError, drop_all_filter,
        insn, receive_filter, step,
    },
    sockets::{attach_program, setsockopt_raw},
};
use std::{io, os::fd::AsRawFd as _};

/// Reading threads at most: each holds a ring of `--buffer-size`.
pub const MAX_THREADS: usize = 64;

// The classic BPF instructions the hash needs besides ring.rs's.
const TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;

/// The group's program: a hash of the packet's source address (IPv4, or the four words of an
/// IPv6 one), which the kernel takes modulo the number of rings. It sees the network header at
/// offset 0, as the rings' filter does, for every packet received; anything else (and a packet
/// too short to load from) goes to the first ring, whose filter judges it as usual.
pub fn by_sender_program() -> Vec<libc::sock_filter> {
    vec![
        /* 0 */ insn(LD_W_ABS, 0, 0, AD_PROTOCOL),
        /* 1 */ insn(JEQ_K, 0, 2, ETH_P_IP), // else 4
        /* 2 */ insn(LD_W_ABS, 0, 0, 12),
        /* 3 */ insn(JA, 0, 0, 11), // to 15
        /* 4 */ insn(JEQ_K, 0, 15, ETH_P_IPV6), // else 20
        /* 5 */ insn(LD_W_ABS, 0, 0, 8),
        /* 6 */ insn(TAX, 0, 0, 0),
        /* 7 */ insn(LD_W_ABS, 0, 0, 12),
        /* 8 */ insn(XOR_X, 0, 0, 0),
        /* 9 */ insn(TAX, 0, 0, 0),
        /* 10 */ insn(LD_W_ABS, 0, 0, 16),
        /* 11 */ insn(XOR_X, 0, 0, 0),
        /* 12 */ insn(TAX, 0, 0, 0),
        /* 13 */ insn(LD_W_ABS, 0, 0, 20),
        /* 14 */ insn(XOR_X, 0, 0, 0),
        // Multiplying spreads the address's low bits upward; folding the high half back down
        // makes the modulo of a few rings depend on every byte, not only on the last one's parity.
        /* 15 */
        insn(MUL_K, 0, 0, 0x9e37_79b1),
        /* 16 */ insn(TAX, 0, 0, 0),
        /* 17 */ insn(RSH_K, 0, 0, 16),
        /* 18 */ insn(XOR_X, 0, 0, 0),
        /* 19 */ insn(RET_A, 0, 0, 0),
        /* 20 */ insn(RET_K, 0, 0, 0),
    ]
}

/// The rings `--threads` asks for: one ring alone, or `threads` rings in a fanout group.
pub fn open_rings(vxlan_port: Option<u16>, mib: usize, threads: usize) -> Result<Vec<Ring>, RingError> {
    if threads <= 1 {
        return Ok(vec![Ring::open(&receive_filter(vxlan_port), mib)?]);
    }
    // Each ring takes nothing until all are in the group: a ring bound on its own would
    // receive every packet, and a copy could be written twice.
    let rings = (0..threads).map(|_| Ring::open(&drop_all_filter(), mib)).collect::<Result<Vec<_>, _>>()?;
    join(&rings)?;
    attach_program(&rings[0], libc::SOL_PACKET, libc::PACKET_FANOUT_DATA, &by_sender_program())
        .map_err(step("cannot give the reading threads' fanout group its program"))?;
    for ring in &rings {
        attach_program(ring, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &receive_filter(vxlan_port))
            .map_err(step("cannot attach the collector's packet filter"))?;
    }
    Ok(rings)
}

/// The PACKET_FANOUT option's value: group id, mode and flags.
fn fanout(id: u16, flags: u32) -> libc::c_int {
    (u32::from(id) | ((libc::PACKET_FANOUT_CBPF | flags) << 16)) as libc::c_int
}

/// Puts `rings` in one new fanout group. The kernel picks the group's id
/// (PACKET_FANOUT_FLAG_UNIQUEID): an id of our choosing could be another collector's group in
/// this namespace, which the rings would join and share its packets with.
fn join(rings: &[Ring]) -> Result<(), RingError> {
    let first = &rings[0];
    let unique = libc::PACKET_FANOUT_FLAG_UNIQUEID;
    // A group of its own does not inherit the sockets' PACKET_IGNORE_OUTGOING; kernels without
    // the group flag refuse it, and the rings' filter drops outgoing packets there instead.
    let mut flags = libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
    if let Err(e) = setsockopt_raw(first, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout(0, unique | flags)) {
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(RingError { op: "cannot make a fanout group for the reading threads", source: e });
        }
        flags = 0;
        setsockopt_raw(first, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout(0, unique)).map_err(step(
            "this kernel cannot make a fanout group with an id of its own (PACKET_FANOUT_FLAG_UNIQUEID): \
             collect with --threads 1",
        ))?;
    }
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and describe the int PACKET_FANOUT returns.
    let rc = unsafe {
        libc::getsockopt(
            first.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(RingError {
            op: "cannot read the fanout group's id",
            source: io::Error::last_os_error(),
        });
    }
    let id = (value as u32 & 0xffff) as u16;
    for ring in &rings[1..] {
        setsockopt_raw(ring, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout(id, flags))
            .map_err(step("cannot add a reading thread's ring to the fanout group"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{
        decode::tests::{gre, ipv4, ipv4_frame},
        ring::tests::run,
    };

    fn with_source(source: [u8; 4]) -> Vec<u8> {
        let mut packet =
            ipv4(47, &gre(false, Some(3), Some(1), crate::model::wire::PROTO_TEB, &ipv4_frame(60, 46)));
        packet[12..16].copy_from_slice(&source);
        packet
    }

    #[test]
    fn a_senders_copies_all_hash_alike_and_senders_spread_over_the_threads() {
        let program = by_sender_program();
        let host = libc::PACKET_HOST;
        let hash = |packet: &[u8], protocol| run(&program, packet, host, protocol);
        let a = with_source([10, 0, 0, 1]);
        let mut a_later = a.clone();
        a_later[20 + 11] = 9;
        a_later[4] = 0x77;
        assert_eq!(hash(&a, ETH_P_IP), hash(&a_later, ETH_P_IP), "only the source address counts");
        for threads in [2u32, 3, 4] {
            let mut used = vec![0; threads as usize];
            for last in 1..=64u8 {
                used[(hash(&with_source([10, 0, 0, last]), ETH_P_IP) % threads) as usize] += 1;
            }
            assert!(used.iter().all(|&n| n >= 64 / threads as usize / 2), "{threads} threads: {used:?}");
        }
        // Neighbours that differ only in an even step still split.
        let evens: std::collections::BTreeSet<u32> =
            (0..8u8).map(|i| hash(&with_source([10, 0, 0, 2 * i]), ETH_P_IP) % 2).collect();
        assert_eq!(evens.len(), 2);
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 47, 64];
        v6.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::ff".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0; 8]);
        let mut v6_other = v6.clone();
        v6_other[23] = 2;
        assert_ne!(hash(&v6, ETH_P_IPV6), hash(&v6_other, ETH_P_IPV6));
        v6_other[23] = 1;
        v6_other[39] = 7;
        assert_eq!(hash(&v6, ETH_P_IPV6), hash(&v6_other, ETH_P_IPV6), "the destination does not count");
        assert_eq!(hash(&[0x45, 0], ETH_P_IP), 0, "too short: the first ring");
        assert_eq!(hash(&a, 0x0806), 0, "not IP: the first ring");
    }
}
