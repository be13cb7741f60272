//! What `collect` counts: per stream (sender, session, direction) packets, bytes, lost copies and
//! reordering from the GRE sequence numbers; undecodable packets per reason; ignored senders.
use std::{collections::BTreeMap, net::IpAddr};

use vmsniff_ebpf::Direction;

use super::decode::{Kind, Undecodable};

/// How far back a late sequence number is still told apart from the ones seen: farther back,
/// the sender is taken to have started over (its device was re-created).
const WINDOW: u32 = 4096;

/// The loss accounting of one sequence of GRE sequence numbers (one device of the sender).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    /// The number expected next; `None` before the first.
    next: Option<u32>,
    /// Which of the last [`WINDOW`] numbers arrived, indexed by number % WINDOW.
    seen: Vec<bool>,
    /// Numbers skipped and not (yet) arrived late.
    pub lost: u64,
    /// Numbers that arrived after a higher one.
    pub reordered: u64,
    /// Numbers that arrived twice.
    pub duplicates: u64,
    /// Times the numbers jumped far back: the sender started over.
    pub restarts: u64,
}

impl Sequence {
    pub fn observe(&mut self, seq: u32) {
        if self.seen.is_empty() {
            self.seen = vec![false; WINDOW as usize];
        }
        let Some(next) = self.next else {
            self.start(seq);
            return;
        };
        let ahead = seq.wrapping_sub(next);
        if ahead < u32::MAX / 2 {
            // In order (ahead = 0) or after a gap: the skipped numbers count as lost until they
            // arrive late.
            self.lost += u64::from(ahead);
            for skipped in 0..ahead.min(WINDOW) {
                self.mark(next.wrapping_add(skipped), false);
            }
            self.mark(seq, true);
            self.next = Some(seq.wrapping_add(1));
            return;
        }
        let behind = next.wrapping_sub(seq);
        if behind > WINDOW {
            self.restarts += 1;
            self.start(seq);
        } else if self.is_seen(seq) {
            self.duplicates += 1;
        } else {
            self.reordered += 1;
            self.lost = self.lost.saturating_sub(1);
            self.mark(seq, true);
        }
    }

    fn start(&mut self, seq: u32) {
        self.seen.iter_mut().for_each(|s| *s = false);
        self.mark(seq, true);
        self.next = Some(seq.wrapping_add(1));
    }

    fn mark(&mut self, seq: u32, seen: bool) {
        self.seen[(seq % WINDOW) as usize] = seen;
    }

    fn is_seen(&self, seq: u32) -> bool {
        self.seen[(seq % WINDOW) as usize]
    }
}

/// One stream of copies: a sender's session in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub sender: IpAddr,
    pub kind: Kind,
    pub session: u32,
    pub direction: Option<Direction>,
}

impl StreamKey {
    /// The pcapng interface this stream's packets go to: both directions share it.
    pub fn interface(&self) -> InterfaceKey {
        InterfaceKey {
            sender: self.sender,
            erspan: self.kind.is_erspan(),
            plain: self.kind == Kind::PlainGre,
            vxlan: self.kind == Kind::Vxlan,
            session: self.session,
        }
    }
}

/// One pcapng interface: a sender's session (vmsniff GRE or VXLAN, ERSPAN or a plain GRE
/// mirror's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceKey {
    pub sender: IpAddr,
    pub erspan: bool,
    pub plain: bool,
    pub vxlan: bool,
    pub session: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub packets: u64,
    pub bytes: u64,
    pub sequence: Sequence,
    pub sequenced: bool,
}

/// Everything counted since the start.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub streams: BTreeMap<StreamKey, StreamStats>,
    pub undecodable: BTreeMap<Undecodable, u64>,
    /// Packets from senders outside `--from`.
    pub ignored: u64,
    /// Packets the kernel dropped because this process did not read fast enough: each socket's
    /// running count, by socket.
    pub socket_drops: BTreeMap<usize, u64>,
    /// Copies written to the capture.
    pub written: u64,
}

impl Stats {
    pub fn copy(&mut self, key: StreamKey, frame_len: usize, sequence: Option<u32>) {
        let stream = self.streams.entry(key).or_default();
        stream.packets += 1;
        stream.bytes += frame_len as u64;
        if let Some(seq) = sequence {
            stream.sequenced = true;
            stream.sequence.observe(seq);
        }
    }

    pub fn undecodable(&mut self, why: Undecodable) {
        *self.undecodable.entry(why).or_default() += 1;
    }

    pub fn undecodable_total(&self) -> u64 {
        self.undecodable.values().sum()
    }
}

/// The summary: one row per stream, then the packets that were no copies.
pub fn render_summary(stats: &Stats, label: impl Fn(&InterfaceKey) -> String) -> String {
    let labels: Vec<String> = stats.streams.keys().map(|key| label(&key.interface())).collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<15} {:<9} {:<8} {:<width$} {:<4} {:>10} {:>12} {:>6} {:>9}\n",
        "SENDER", "ENCAP", "SESSION", "NAME", "DIR", "PACKETS", "BYTES", "LOST", "REORDERED"
    );
    for ((key, s), name) in stats.streams.iter().zip(&labels) {
        let (lost, reordered) = if s.sequenced {
            (s.sequence.lost.to_string(), s.sequence.reordered.to_string())
        } else {
            ("-".into(), "-".into())
        };
        out.push_str(&format!(
            "{:<15} {:<9} {:<8} {:<width$} {:<4} {:>10} {:>12} {:>6} {:>9}\n",
            key.sender.to_string(),
            key.kind.as_str(),
            key.session,
            name,
            key.direction.map_or("-", Direction::as_str),
            s.packets,
            s.bytes,
            lost,
            reordered
        ));
        if s.sequence.duplicates > 0 || s.sequence.restarts > 0 {
            out.push_str(&format!(
                "{:<15} duplicated sequence numbers {}, sequence restarts {}\n",
                "", s.sequence.duplicates, s.sequence.restarts
            ));
        }
    }
    if stats.streams.is_empty() {
        out.push_str("(no mirrored copies received)\n");
    }
    let reasons: Vec<String> = stats.undecodable.iter().map(|(why, n)| format!("{why} {n}")).collect();
    out.push_str(&format!(
        "undecodable {}{}; from other senders (not --from) {}; dropped by this host's socket buffer {}\n",
        stats.undecodable_total(),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
        stats.ignored,
        stats.socket_drops.values().sum::<u64>()
    ));
    if stats.streams.keys().any(|k| k.kind == Kind::Vxlan) {
        out.push_str(
            "VXLAN carries no sequence numbers: its lost and reordered copies cannot be counted (-); \
             --encap gre counts them\n",
        );
    }
    out
}

/// The live line: per session packets and lost copies, then the totals.
pub fn render_live(stats: &Stats, label: impl Fn(&InterfaceKey) -> String) -> String {
    let mut sessions: BTreeMap<InterfaceKey, (u64, u64)> = BTreeMap::new();
    for (key, s) in &stats.streams {
        let entry = sessions.entry(key.interface()).or_default();
        entry.0 += s.packets;
        entry.1 += s.sequence.lost;
    }
    let mut parts: Vec<String> = sessions
        .iter()
        .map(|(key, (packets, lost))| format!("{}: {packets} lost {lost}", label(key)))
        .collect();
    if parts.is_empty() {
        parts.push("no copies yet".into());
    }
    parts.push(format!("undecodable {}", stats.undecodable_total()));
    parts.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u32]) -> Sequence {
        let mut s = Sequence::default();
        seqs.iter().for_each(|&n| s.observe(n));
        s
    }

    #[test]
    fn in_order_numbers_lose_nothing_wherever_they_start() {
        let s = run(&[5, 6, 7, 8]);
        assert_eq!((s.lost, s.reordered, s.duplicates, s.restarts), (0, 0, 0, 0));
        let s = run(&[u32::MAX - 1, u32::MAX, 0, 1]);
        assert_eq!(s.lost, 0, "the numbers wrap");
    }

    #[test]
    fn gaps_are_lost_copies_and_late_ones_are_reordering() {
        assert_eq!(run(&[1, 2, 5, 6]).lost, 2);
        let s = run(&[1, 2, 4, 3, 5]);
        assert_eq!((s.lost, s.reordered), (0, 1), "3 came late: reordered, not lost");
        let s = run(&[1, 4, 2, 6]);
        assert_eq!((s.lost, s.reordered), (2, 1), "3 and 5 never came");
    }

    #[test]
    fn duplicates_and_restarts_are_told_apart() {
        let s = run(&[1, 2, 3, 2]);
        assert_eq!((s.duplicates, s.reordered, s.lost), (1, 0, 0));
        let s = run(&[100_000, 100_001, 1, 2, 3]);
        assert_eq!((s.restarts, s.lost, s.reordered), (1, 0, 0), "a re-created device starts over");
    }

    #[test]
    fn the_summary_names_streams_and_reasons() {
        let mut stats = Stats::default();
        let key = StreamKey {
            sender: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
            kind: Kind::VmsniffGre,
            session: 3,
            direction: Some(Direction::Out),
        };
        for seq in [1, 2, 4] {
            stats.copy(key, 100, Some(seq));
        }
        stats.undecodable(Undecodable::UnknownProtocol);
        stats.ignored = 5;
        let text = render_summary(&stats, |k| format!("s{}", k.session));
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["192.0.2.1", "gre", "3", "s3", "out", "3", "300", "1", "0"]);
        assert!(text.contains("undecodable 1 (unknown GRE protocol 1)"), "{text}");
        assert!(text.contains("(not --from) 5"), "{text}");
        assert_eq!(render_live(&stats, |k| format!("s{}", k.session)), "s3: 3 lost 1 | undecodable 1");
    }
}
