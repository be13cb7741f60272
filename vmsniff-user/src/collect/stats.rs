//! What `collect` counts: per stream (sender, session, direction) packets, bytes, lost copies and
//! reordering from the GRE sequence numbers; undecodable packets per reason; ignored senders.
//! The stream table is bounded: senders and keys come from the network, and anyone who can
//! send GRE to the collector could otherwise grow it (and the metrics' series) without end.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use vmsniff_ebpf::Direction;

use super::decode::{Kind, Undecodable};

/// Streams counted at most unless `--max-streams` says otherwise. A hypervisor has at most
/// 1023 sessions of two directions; 4096 is room for many hypervisors' real sessions, and bounds
/// the memory (each stream keeps a 512-byte window of sequence numbers: 2 MiB in all) and the
/// metrics' series. Copies of further streams are refused: counted, not written.
pub const DEFAULT_MAX_STREAMS: usize = 4096;

/// `--max-streams` at most: 128 MiB of sequence windows.
pub const MAX_STREAMS_LIMIT: usize = 1 << 18;

/// How far back a late sequence number is still told apart from the ones seen: farther back,
/// the sender is taken to have started over (its device was re-created).
const WINDOW: u32 = 4096;
/// The window's bits, in words.
const WINDOW_WORDS: usize = (WINDOW / 64) as usize;

/// The loss accounting of one sequence of GRE sequence numbers (one device of the sender).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    /// The number expected next; `None` before the first.
    next: Option<u32>,
    /// Which of the last [`WINDOW`] numbers arrived, a bit per number % WINDOW (allocated at
    /// the first number, so a stream costs its window only once it counts).
    seen: Vec<u64>,
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
            self.seen = vec![0; WINDOW_WORDS];
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

    /// Whether `seq` starts this sequence over: the first number, or one behind the next
    /// expected (a new session's devices count from 0 again).
    pub fn starts_over_at(&self, seq: u32) -> bool {
        self.next.is_none_or(|next| seq.wrapping_sub(next) >= u32::MAX / 2)
    }

    /// Starts the sequence at `seq` without counting anything: a fleet mirror that moved here.
    pub fn begin(&mut self, seq: u32) {
        if self.seen.is_empty() {
            self.seen = vec![0; WINDOW_WORDS];
        }
        self.start(seq);
    }

    fn start(&mut self, seq: u32) {
        self.seen.iter_mut().for_each(|s| *s = 0);
        self.mark(seq, true);
        self.next = Some(seq.wrapping_add(1));
    }

    fn mark(&mut self, seq: u32, seen: bool) {
        let (word, bit) = Self::slot(seq);
        if seen {
            self.seen[word] |= bit;
        } else {
            self.seen[word] &= !bit;
        }
    }

    fn is_seen(&self, seq: u32) -> bool {
        let (word, bit) = Self::slot(seq);
        self.seen[word] & bit != 0
    }

    fn slot(seq: u32) -> (usize, u64) {
        let index = seq % WINDOW;
        ((index / 64) as usize, 1 << (index % 64))
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

impl StreamStats {
    fn count(&mut self, frame_len: usize, sequence: Option<u32>) {
        self.packets += 1;
        self.bytes += frame_len as u64;
        if let Some(seq) = sequence {
            self.sequenced = true;
            self.sequence.observe(seq);
        }
    }
}

/// Everything counted since the start.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Streams counted at most (`--max-streams`).
    pub max_streams: usize,
    /// Hashed, not ordered: it is looked up once per copy, under the lock every reading thread
    /// takes (a B-tree search of the key was a sixth of a copy's cost). [`Stats::streams_sorted`]
    /// orders it for reading.
    pub streams: HashMap<StreamKey, StreamStats, foldhash::fast::RandomState>,
    pub undecodable: BTreeMap<Undecodable, u64>,
    /// Packets from senders outside `--from`.
    pub ignored: u64,
    /// Packets the kernel dropped because this process did not read fast enough: each socket's
    /// running count, by socket.
    pub socket_drops: BTreeMap<usize, u64>,
    /// Copies written to the capture.
    pub written: u64,
    /// Copies of a new stream refused because `max_streams` streams are counted already.
    pub refused_streams: u64,
    /// Plain GRE (no vmsniff sequence numbers, no name for its key) left out without
    /// `--plain-gre`: a node's GRE tenant networks are no mirror.
    pub refused_plain: u64,
    /// Fleet mirrors (`--fleet`): the sender of each one's last copy, and how often its copies
    /// moved to another sender.
    pub moves: HashMap<InterfaceKey, Moves, foldhash::fast::RandomState>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_STREAMS)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moves {
    pub last: IpAddr,
    pub moves: u64,
}

/// The receive loop's counts, read by the metrics endpoint between batches.
pub type SharedStats = Arc<Mutex<Stats>>;

/// The counts, also when a thread panicked holding them (they are plain numbers: still right).
pub fn lock(stats: &SharedStats) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One stream's counts, without its sequence window: what a scrape copies out under the lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub packets: u64,
    pub bytes: u64,
    /// Whether the stream carries sequence numbers (else the four below mean nothing).
    pub sequenced: bool,
    pub lost: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub restarts: u64,
}

/// Everything counted, as plain numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub streams: Vec<(StreamKey, StreamCounts)>,
    pub undecodable: BTreeMap<Undecodable, u64>,
    pub ignored: u64,
    pub max_streams: usize,
    pub refused_streams: u64,
    pub refused_plain: u64,
    pub socket_drops: u64,
    pub written: u64,
}

impl Stats {
    /// Nothing counted yet; at most `max_streams` streams will be.
    pub fn with_limit(max_streams: usize) -> Self {
        Stats {
            max_streams,
            streams: HashMap::default(),
            undecodable: BTreeMap::new(),
            ignored: 0,
            socket_drops: BTreeMap::new(),
            written: 0,
            refused_streams: 0,
            refused_plain: 0,
            moves: HashMap::default(),
        }
    }

    /// Counts a copy of stream `key`; false when it is refused (a new stream, the table full).
    pub fn copy(&mut self, key: StreamKey, frame_len: usize, sequence: Option<u32>) -> bool {
        if self.streams.len() >= self.max_streams && !self.streams.contains_key(&key) {
            self.refused_streams += 1;
            return false;
        }
        self.streams.entry(key).or_default().count(frame_len, sequence);
        true
    }

    /// The streams in key order (sender, encapsulation, session, direction): how the summary
    /// and the metrics list them.
    pub fn streams_sorted(&self) -> Vec<(&StreamKey, &StreamStats)> {
        let mut streams: Vec<_> = self.streams.iter().collect();
        streams.sort_unstable_by_key(|(key, _)| **key);
        streams
    }

    pub fn snapshot(&self) -> Snapshot {
        let streams = self
            .streams_sorted()
            .into_iter()
            .map(|(key, s)| {
                let counts = StreamCounts {
                    packets: s.packets,
                    bytes: s.bytes,
                    sequenced: s.sequenced,
                    lost: s.sequence.lost,
                    reordered: s.sequence.reordered,
                    duplicates: s.sequence.duplicates,
                    restarts: s.sequence.restarts,
                };
                (*key, counts)
            })
            .collect();
        Snapshot {
            streams,
            undecodable: self.undecodable.clone(),
            ignored: self.ignored,
            max_streams: self.max_streams,
            refused_streams: self.refused_streams,
            refused_plain: self.refused_plain,
            socket_drops: self.socket_drops.values().sum(),
            written: self.written,
        }
    }

    /// A copy of a fleet mirror (`interface`). A move is a copy from another sender than the
    /// last whose sequence starts over (a node that now runs the mirror): counted apart, and
    /// never as lost copies. While both nodes send during a handover, their sequences go on and
    /// no move is counted twice.
    pub fn fleet_copy(
        &mut self,
        interface: InterfaceKey,
        key: StreamKey,
        frame_len: usize,
        sequence: Option<u32>,
    ) -> bool {
        if self.streams.len() >= self.max_streams && !self.streams.contains_key(&key) {
            self.refused_streams += 1;
            return false;
        }
        let stream = self.streams.entry(key).or_default();
        let starts_over = match sequence {
            Some(seq) => stream.sequence.starts_over_at(seq),
            None => stream.packets == 0,
        };
        let moves = self.moves.entry(interface).or_insert(Moves { last: key.sender, moves: 0 });
        let moved = moves.last != key.sender && starts_over;
        moves.last = key.sender;
        if moved {
            moves.moves += 1;
            if let Some(seq) = sequence {
                stream.sequence.begin(seq);
                stream.sequenced = true;
                stream.packets += 1;
                stream.bytes += frame_len as u64;
                return true;
            }
        }
        stream.count(frame_len, sequence);
        true
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
    let streams = stats.streams_sorted();
    let labels: Vec<String> = streams.iter().map(|(key, _)| label(&key.interface())).collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<15} {:<9} {:<8} {:<width$} {:<4} {:>10} {:>12} {:>6} {:>9}\n",
        "SENDER", "ENCAP", "SESSION", "NAME", "DIR", "PACKETS", "BYTES", "LOST", "REORDERED"
    );
    for ((key, s), name) in streams.iter().zip(&labels) {
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
        "undecodable {}{}; from other senders (not --from) {}; dropped by this host's socket buffer {}{}{}\n",
        stats.undecodable_total(),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
        stats.ignored,
        stats.socket_drops.values().sum::<u64>(),
        if stats.refused_streams > 0 {
            format!("; refused (over {} streams: --max-streams) {}", stats.max_streams, stats.refused_streams)
        } else {
            String::new()
        },
        if stats.refused_plain > 0 {
            format!(
                "; plain GRE left out (no vmsniff sequence, key not named: --plain-gre records it) {}",
                stats.refused_plain
            )
        } else {
            String::new()
        }
    ));
    if stats.streams.keys().any(|k| k.kind == Kind::Vxlan) {
        out.push_str(
            "VXLAN carries no sequence numbers: its lost and reordered copies cannot be counted (-); \
             --encap gre counts them\n",
        );
    }
    // After the closing lines: the rows above keep their shape for readers of the summary.
    let mut moved: Vec<_> = stats.moves.iter().filter(|(_, m)| m.moves > 0).collect();
    moved.sort_unstable_by_key(|(interface, _)| **interface);
    for (interface, m) in moved {
        out.push_str(&format!(
            "{}: moved {} time(s) to another sender, last {} (not counted as lost)\n",
            label(interface),
            m.moves,
            m.last
        ));
    }
    out
}

/// Sessions the live line shows by name, the busiest first: it is one terminal line, whatever
/// the senders make of the stream table.
const LIVE_SESSIONS: usize = 6;

/// The live line: per session packets and lost copies, then the totals.
pub fn render_live(stats: &Stats, label: impl Fn(&InterfaceKey) -> String) -> String {
    let mut sessions: BTreeMap<InterfaceKey, (u64, u64)> = BTreeMap::new();
    for (key, s) in &stats.streams {
        let entry = sessions.entry(key.interface()).or_default();
        entry.0 += s.packets;
        entry.1 += s.sequence.lost;
    }
    let mut busiest: Vec<_> = sessions.iter().collect();
    busiest.sort_by_key(|(key, (packets, _))| (std::cmp::Reverse(*packets), **key));
    let mut parts: Vec<String> = busiest
        .iter()
        .take(LIVE_SESSIONS)
        .map(|(key, (packets, lost))| format!("{}: {packets} lost {lost}", label(key)))
        .collect();
    if busiest.len() > LIVE_SESSIONS {
        parts.push(format!("{} more sessions", busiest.len() - LIVE_SESSIONS));
    }
    if parts.is_empty() {
        parts.push("no copies yet".into());
    }
    parts.push(format!("undecodable {}", stats.undecodable_total()));
    parts.join(" | ")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

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
    fn a_fleet_mirrors_move_is_counted_apart_from_losses() {
        let mut stats = Stats::default();
        let (a, b): (IpAddr, IpAddr) =
            (Ipv4Addr::new(192, 0, 2, 1).into(), Ipv4Addr::new(192, 0, 2, 2).into());
        let key = |sender| StreamKey { sender, kind: Kind::VmsniffGre, session: 7, direction: None };
        let interface = InterfaceKey {
            sender: Ipv4Addr::UNSPECIFIED.into(),
            erspan: false,
            plain: false,
            vxlan: false,
            session: 7,
        };
        for seq in 0..5 {
            stats.fleet_copy(interface, key(a), 60, Some(seq));
        }
        // The handover: both nodes send, each its own sequence.
        for seq in 0..3 {
            stats.fleet_copy(interface, key(b), 60, Some(seq));
            stats.fleet_copy(interface, key(a), 60, Some(5 + seq));
        }
        stats.fleet_copy(interface, key(b), 60, Some(3));
        assert_eq!(stats.moves[&interface].moves, 1);
        // Back to a: its new session counts from 0 again.
        stats.fleet_copy(interface, key(a), 60, Some(0));
        stats.fleet_copy(interface, key(a), 60, Some(1));
        assert_eq!(stats.moves[&interface], Moves { last: a, moves: 2 });
        let lost: u64 = stats.streams.values().map(|s| s.sequence.lost + s.sequence.duplicates).sum();
        assert_eq!(lost, 0, "a move is no loss: {:?}", stats.streams);
        assert!(render_summary(&stats, |_| "web".into()).contains("web: moved 2 time(s)"));
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

    #[test]
    fn the_stream_table_is_bounded_and_refusals_are_counted() {
        let mut stats = Stats::default();
        let key = |session| StreamKey {
            sender: Ipv4Addr::new(198, 51, 100, 7).into(),
            kind: Kind::VmsniffGre,
            session,
            direction: Some(Direction::In),
        };
        // A spray of keys: the first DEFAULT_MAX_STREAMS are counted, the rest refused.
        for session in 0..(DEFAULT_MAX_STREAMS as u32 + 100) {
            stats.copy(key(session), 60, Some(0));
        }
        assert_eq!((stats.streams.len(), stats.refused_streams), (DEFAULT_MAX_STREAMS, 100));
        // Streams already counted go on.
        assert!(stats.copy(key(1), 60, Some(1)));
        assert!(!stats.copy(key(DEFAULT_MAX_STREAMS as u32 + 5), 60, Some(1)));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.streams.len(), DEFAULT_MAX_STREAMS);
        assert_eq!(snapshot.refused_streams, 101);
        assert!(
            render_summary(&stats, |_| String::new())
                .contains("; refused (over 4096 streams: --max-streams) 101")
        );
    }
}
