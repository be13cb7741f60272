//! Test frames: Ethernet with the local experimental ethertype 0x88b5 and a marker, so that
//! captures can ignore whatever else the kernel sends.
pub const ETHERTYPE_TEST: u16 = 0x88b5;
const MARKER: &[u8; 8] = b"vmsniffT";

pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0x00, 0x01];
pub const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbb, 0x00, 0x02];

/// A frame of exactly `len` bytes (at least 60) from `src` to `dst`, numbered `seq`.
pub fn frame(src: [u8; 6], dst: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 60);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(MARKER);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2654435761);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f
}

pub fn is_marked(frame: &[u8]) -> bool {
    frame.len() >= 26 && frame[12..14] == ETHERTYPE_TEST.to_be_bytes() && &frame[14..22] == MARKER
}

/// Frame sizes that cover the minimum, odd sizes and a full 1514-byte frame.
pub fn sizes(count: usize) -> impl Iterator<Item = usize> {
    const SIZES: [usize; 8] = [60, 64, 100, 333, 512, 1000, 1500, 1514];
    (0..count).map(|i| SIZES[i % SIZES.len()])
}

/// `count` frames the VM sends and `count` it receives.
pub fn both_ways(count: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let out = sizes(count).enumerate().map(|(i, len)| frame(VM_MAC, PEER_MAC, i as u32, len)).collect();
    let into =
        sizes(count).enumerate().map(|(i, len)| frame(PEER_MAC, VM_MAC, 1000 + i as u32, len)).collect();
    (out, into)
}
