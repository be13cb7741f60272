//! IPv4 reassembly for the ring: copies larger than the uplink's MTU arrive as fragments (the
//! hypervisor sends them with DF clear, see apply/gre.rs), and a packet socket sees fragments.
//!
//! The kernel's own per-socket reassembly (`PACKET_FANOUT_FLAG_DEFRAG`) is not used: it shares
//! one fragment queue per network namespace between every reader that asks for it, so two
//! collectors (or a collector and an IDS reading the same way) would each take fragments the
//! other needs. Fragments come from the network: the table is bounded in datagrams and bytes,
//! overlapping fragments drop their datagram (as Linux does), and what never completes is
//! counted when it is evicted.
use std::{collections::HashMap, time::Duration};

use super::decode::Undecodable;

/// Datagrams being reassembled at most; a new one beyond evicts the oldest.
pub const MAX_DATAGRAMS: usize = 256;
/// A datagram whose fragments have not all come in this long is given up (Linux's
/// `ipfrag_time` default).
const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest IPv4 datagram.
const MAX_LEN: usize = 65535;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    source: [u8; 4],
    destination: [u8; 4],
    id: u16,
    protocol: u8,
}

struct Partial {
    /// The first fragment's IPv4 header, once it came.
    header: Option<Vec<u8>>,
    /// The payload, at its offsets.
    data: Vec<u8>,
    /// Byte ranges received, sorted and disjoint.
    ranges: Vec<(usize, usize)>,
    /// The payload's length, once the last fragment came.
    total: Option<usize>,
    /// When its first fragment came (the kernel's receive time).
    started: Duration,
}

/// What became of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Its datagram is whole: the IPv4 packet, header first, fragment fields cleared.
    Complete(Vec<u8>),
    /// Kept, waiting for the rest.
    Pending,
    /// Not usable: the reason is counted.
    Refused(Undecodable),
}

#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<Key, Partial>,
    /// Datagrams given up (evicted or timed out), not yet counted by the caller.
    given_up: u64,
}

/// Whether an IPv4 packet (its header checked by the caller) is a fragment.
pub fn is_fragment(packet: &[u8]) -> bool {
    u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0
}

impl Reassembly {
    /// Takes one fragment: `packet` is a whole IPv4 fragment (header checked, padding cut) that
    /// came at `now`.
    pub fn offer(&mut self, packet: &[u8], now: Duration) -> Offered {
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        let field = u16::from_be_bytes([packet[6], packet[7]]);
        let (more, offset) = (field & 0x2000 != 0, usize::from(field & 0x1fff) * 8);
        let payload = &packet[header_len..];
        let end = offset + payload.len();
        let key = Key {
            source: [packet[12], packet[13], packet[14], packet[15]],
            destination: [packet[16], packet[17], packet[18], packet[19]],
            id: u16::from_be_bytes([packet[4], packet[5]]),
            protocol: packet[9],
        };
        // Every fragment but the last carries a multiple of 8 bytes; none reaches past 64 KiB.
        if end > MAX_LEN - header_len
            || (more && !payload.len().is_multiple_of(8))
            || (more && payload.is_empty())
        {
            self.partial.remove(&key);
            return Offered::Refused(Undecodable::BadFragment);
        }
        if !self.partial.contains_key(&key) {
            self.make_room(now);
        }
        let partial = self.partial.entry(key).or_insert_with(|| Partial {
            header: None,
            data: Vec::new(),
            ranges: Vec::new(),
            total: None,
            started: now,
        });
        // A duplicate is ignored; an overlap, or a second different end, drops the datagram.
        if partial.ranges.contains(&(offset, end)) {
            return Offered::Pending;
        }
        let overlaps = partial.ranges.iter().any(|&(s, e)| offset < e && s < end);
        let bad_end = !more && partial.total.is_some_and(|t| t != end)
            || partial.total.is_some_and(|t| end > t)
            || (!more && partial.ranges.iter().any(|&(_, e)| e > end));
        if overlaps || bad_end {
            self.partial.remove(&key);
            return Offered::Refused(Undecodable::BadFragment);
        }
        if !more {
            partial.total = Some(end);
        }
        if offset == 0 {
            partial.header = Some(packet[..header_len].to_vec());
        }
        if partial.data.len() < end {
            partial.data.resize(end, 0);
        }
        partial.data[offset..end].copy_from_slice(payload);
        let at = partial.ranges.partition_point(|&(s, _)| s < offset);
        partial.ranges.insert(at, (offset, end));
        let Some(total) = partial.total else { return Offered::Pending };
        let contiguous = partial.ranges.first().is_some_and(|&(s, _)| s == 0)
            && partial.ranges.windows(2).all(|w| w[0].1 == w[1].0)
            && partial.ranges.last().is_some_and(|&(_, e)| e == total);
        if !contiguous || partial.header.is_none() {
            return Offered::Pending;
        }
        let Some(Partial { header: Some(mut whole), data, .. }) = self.partial.remove(&key) else {
            return Offered::Pending;
        };
        let length = u16::try_from(whole.len() + total).unwrap_or(u16::MAX);
        whole[2..4].copy_from_slice(&length.to_be_bytes());
        whole[6..8].copy_from_slice(&[0, 0]);
        whole.extend_from_slice(&data[..total]);
        Offered::Complete(whole)
    }

    /// Drops datagrams past [`TIMEOUT`], and the oldest when the table is full.
    fn make_room(&mut self, now: Duration) {
        let before = self.partial.len();
        self.partial.retain(|_, p| now.saturating_sub(p.started) < TIMEOUT);
        if self.partial.len() >= MAX_DATAGRAMS {
            let oldest = self.partial.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| *k);
            if let Some(key) = oldest {
                self.partial.remove(&key);
            }
        }
        self.given_up += (before - self.partial.len()) as u64;
    }

    /// Datagrams given up since the last call.
    pub fn take_given_up(&mut self) -> u64 {
        std::mem::take(&mut self.given_up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fragments of a datagram of `payload` (protocol 47, id `id`), `size` payload bytes
    /// each (a multiple of 8).
    fn fragments(id: u16, payload: &[u8], size: usize) -> Vec<Vec<u8>> {
        payload
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| {
                let more = (i + 1) * size < payload.len();
                let field = u16::try_from(i * size / 8).unwrap() | if more { 0x2000 } else { 0 };
                let total = u16::try_from(20 + chunk.len()).unwrap();
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 47, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
                p[2..4].copy_from_slice(&total.to_be_bytes());
                p[4..6].copy_from_slice(&id.to_be_bytes());
                p[6..8].copy_from_slice(&field.to_be_bytes());
                p.extend_from_slice(chunk);
                p
            })
            .collect()
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7) as u8).collect()
    }

    #[test]
    fn fragments_in_any_order_make_the_datagram_whole() {
        let data = payload(3000);
        let parts = fragments(1, &data, 1480);
        assert_eq!(parts.len(), 3);
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut r = Reassembly::default();
            let mut results: Vec<Offered> =
                order.iter().map(|&i| r.offer(&parts[i], Duration::ZERO)).collect();
            let Some(Offered::Complete(whole)) = results.pop() else { panic!("{order:?}") };
            assert!(results.iter().all(|o| *o == Offered::Pending), "{order:?}");
            assert_eq!(&whole[20..], &data[..]);
            assert_eq!(usize::from(u16::from_be_bytes([whole[2], whole[3]])), 3020);
            assert!(!is_fragment(&whole));
            assert!(r.partial.is_empty());
        }
    }

    #[test]
    fn duplicates_are_ignored_and_overlaps_drop_the_datagram() {
        let data = payload(3000);
        let parts = fragments(2, &data, 1480);
        let mut r = Reassembly::default();
        assert_eq!(r.offer(&parts[0], Duration::ZERO), Offered::Pending);
        assert_eq!(r.offer(&parts[0], Duration::ZERO), Offered::Pending, "a duplicate");
        assert_eq!(r.offer(&parts[1], Duration::ZERO), Offered::Pending);
        assert!(matches!(r.offer(&parts[2], Duration::ZERO), Offered::Complete(_)));
        // A fragment overlapping another (teardrop): the datagram is dropped, not patched.
        let overlapping = fragments(3, &data, 1480);
        let shifted = fragments(3, &data[8..], 1480);
        let mut shifted_first = shifted[0].clone();
        shifted_first[6..8].copy_from_slice(&(0x2000u16 | 1).to_be_bytes());
        assert_eq!(r.offer(&overlapping[0], Duration::ZERO), Offered::Pending);
        assert_eq!(r.offer(&shifted_first, Duration::ZERO), Offered::Refused(Undecodable::BadFragment));
        assert_eq!(r.offer(&overlapping[1], Duration::ZERO), Offered::Pending, "starts again, alone");
        // Past 64 KiB, or a middle fragment not a multiple of 8 bytes.
        let mut far = parts[2].clone();
        far[6..8].copy_from_slice(&0x1fffu16.to_be_bytes());
        assert_eq!(r.offer(&far, Duration::ZERO), Offered::Refused(Undecodable::BadFragment));
        let mut odd = parts[0].clone();
        odd.pop();
        assert_eq!(r.offer(&odd, Duration::ZERO), Offered::Refused(Undecodable::BadFragment));
    }

    #[test]
    fn a_flood_of_fragments_that_never_complete_stays_bounded() {
        let data = payload(3000);
        let mut r = Reassembly::default();
        for id in 0..5000u16 {
            let parts = fragments(id, &data, 1480);
            assert_eq!(r.offer(&parts[0], Duration::from_millis(u64::from(id))), Offered::Pending);
        }
        assert_eq!(r.partial.len(), MAX_DATAGRAMS);
        assert_eq!(r.take_given_up(), 5000 - MAX_DATAGRAMS as u64);
        // The newest are kept: a late fragment of one of them completes it.
        let parts = fragments(4999, &data, 1480);
        assert_eq!(r.offer(&parts[1], Duration::from_secs(5)), Offered::Pending);
        assert!(matches!(r.offer(&parts[2], Duration::from_secs(5)), Offered::Complete(_)));
        // After the timeout, a new datagram clears the stale ones.
        let parts = fragments(1, &payload(100), 48);
        assert_eq!(r.offer(&parts[0], Duration::from_secs(60)), Offered::Pending);
        assert_eq!(r.partial.len(), 1);
        assert_eq!(r.take_given_up(), MAX_DATAGRAMS as u64 - 1);
    }
}
