//! What `collect` counts: per stream (sender, session, direction) packets, bytes, lost copies and
//! reordering from the GRE sequence numbers; undecodable packets per reason; ignored senders.
//! The stream table is bounded: senders and keys come from the network, and anyone who can
//! send GRE to the collector could otherwise grow it (and the metrics' series) without end.
use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
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

/// Everything counted since the start by one reading thread (a shard of [`ShardedStats`]); their
/// sum is a [`Snapshot`].
#[derive(Debug)]
pub struct Stats {
    /// Streams counted at most (`--max-streams`), by all shards together.
    pub max_streams: usize,
    /// Looked up once per copy; [`Stats::streams_sorted`] orders it for reading.
    pub streams: Streams,
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
    shared: Arc<Shared>,
    /// `--count`: copies this shard may still admit, taken from the shared count.
    budget: u64,
    /// Copies admitted since the shard last settled with the shared count.
    unsettled: u64,
}

/// What a collector's shards share: what spans senders, and so reading threads.
#[derive(Debug)]
struct Shared {
    max_streams: usize,
    /// Streams counted in all shards.
    streams: AtomicUsize,
    /// Fleet mirrors (`--fleet`): the sender of each one's last copy, and how often its copies
    /// moved to another sender (which may be another thread's).
    moves: Mutex<HashMap<InterfaceKey, Moves, foldhash::fast::RandomState>>,
    /// `--count`: copies the shards took for their budgets (never more than the count) and
    /// copies they admitted and settled.
    reserved: AtomicU64,
    settled: AtomicU64,
}

/// Copies a shard takes from the shared count at once: one atomic operation per this many
/// copies, not per copy.
const BUDGET_CHUNK: u64 = 1024;

/// How long a shard sleeps while another holds the rest of `--count` (see [`Stats::take_one`]).
const COUNT_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

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

/// The collector's counts: a shard per reading thread, each taken by its thread once per block
/// and by nobody else but a reader of the counts, and one for the main thread's sockets. A
/// sender's copies all reach one thread, so each stream is counted in one shard; what spans
/// senders (the bound on streams, `--count`, fleet moves) is shared.
#[derive(Debug)]
pub struct ShardedStats {
    shards: Box<[Mutex<Stats>]>,
}

/// The counts, read by the metrics endpoint and the summary.
pub type SharedStats = Arc<ShardedStats>;

impl ShardedStats {
    /// `readers` reading threads' shards and the main thread's; at most `max_streams` streams
    /// in all.
    pub fn new(max_streams: usize, readers: usize) -> ShardedStats {
        let shared = Arc::new(Shared::new(max_streams));
        ShardedStats { shards: (0..=readers).map(|_| Mutex::new(Stats::sharing(&shared))).collect() }
    }

    /// Reading thread `i`'s shard.
    pub fn reader(&self, i: usize) -> MutexGuard<'_, Stats> {
        lock(&self.shards[i % (self.shards.len() - 1).max(1)])
    }

    /// The main thread's shard.
    pub fn main(&self) -> MutexGuard<'_, Stats> {
        lock(&self.shards[self.shards.len() - 1])
    }

    /// Every shard's counts together, as plain numbers (a stream is counted in one shard).
    /// Each shard is locked in turn, for the copy only.
    pub fn snapshot(&self) -> Snapshot {
        let mut all = lock(&self.shards[0]).snapshot();
        for shard in &self.shards[1..] {
            let shard = lock(shard).snapshot();
            all.streams.extend(shard.streams);
            for (why, n) in shard.undecodable {
                *all.undecodable.entry(why).or_default() += n;
            }
            all.ignored += shard.ignored;
            all.refused_streams += shard.refused_streams;
            all.refused_plain += shard.refused_plain;
            all.socket_drops += shard.socket_drops;
            all.written += shard.written;
        }
        all.streams.sort_unstable_by_key(|(key, _)| *key);
        all
    }
}

/// A shard, also when a thread panicked holding it (they are plain numbers: still right).
fn lock(shard: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(max_streams: usize) -> Shared {
        Shared {
            max_streams,
            streams: AtomicUsize::new(0),
            moves: Mutex::default(),
            reserved: AtomicU64::new(0),
            settled: AtomicU64::new(0),
        }
    }

    /// Room for one more stream, taken; false when `max_streams` are counted.
    fn take_stream(&self) -> bool {
        self.streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_streams).then_some(n + 1))
            .is_ok()
    }
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
    /// Fleet mirrors' moves, by interface.
    pub moves: Vec<(InterfaceKey, Moves)>,
}

impl Snapshot {
    pub fn undecodable_total(&self) -> u64 {
        self.undecodable.values().sum()
    }
}

impl Stats {
    /// Nothing counted yet; at most `max_streams` streams will be (one shard alone).
    pub fn with_limit(max_streams: usize) -> Self {
        Stats::sharing(&Arc::new(Shared::new(max_streams)))
    }

    fn sharing(shared: &Arc<Shared>) -> Stats {
        Stats {
            max_streams: shared.max_streams,
            streams: Streams::default(),
            undecodable: BTreeMap::new(),
            ignored: 0,
            socket_drops: BTreeMap::new(),
            written: 0,
            refused_streams: 0,
            refused_plain: 0,
            shared: Arc::clone(shared),
            budget: 0,
            unsettled: 0,
        }
    }

    /// Counts a copy of stream `key`; None when it is refused (a new stream, the table full).
    pub fn copy(&mut self, key: StreamKey, frame_len: usize, sequence: Option<u32>) -> Option<StreamIndex> {
        let (index, stream) = self.streams.get_or_make(key, &self.shared, &mut self.refused_streams)?;
        stream.count(frame_len, sequence);
        Some(index)
    }

    /// Takes one of `--count`'s `count` copies for this shard; false once `count` copies are
    /// admitted in all. When every copy left is taken but not all are admitted yet, another shard
    /// holds them for the block it is reading: this shard settles its own and waits until that
    /// one settles, then takes what it gave back. Dropping the copy instead would leave the
    /// count short for good once the senders stop, and `collect` would never end.
    ///
    /// No two shards wait on each other: a waiting shard holds no copies, and shards that all
    /// hold none have admitted every taken copy, so the count is reached.
    pub fn take_one(&mut self, count: u64) -> bool {
        loop {
            if self.budget > 0 {
                self.budget -= 1;
                self.unsettled += 1;
                return true;
            }
            let taken = self.shared.reserved.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < count).then(|| r + BUDGET_CHUNK.min(count - r))
            });
            match taken {
                Ok(before) => self.budget = BUDGET_CHUNK.min(count - before),
                Err(_) if self.settle(count) => return false,
                // Another shard settles at the end of its block: a few milliseconds at most.
                Err(_) => std::thread::sleep(COUNT_WAIT),
            }
        }
    }

    /// Gives back the copy [`Stats::take_one`] took last (it was refused after all).
    pub fn give_back_one(&mut self) {
        self.budget += 1;
        self.unsettled -= 1;
    }

    /// Gives back the copies taken but not admitted, and adds those admitted to the shared
    /// count; true once `count` copies are admitted in all (each shard settles after each
    /// block, so nobody holds copies another shard is waiting for).
    pub fn settle(&mut self, count: u64) -> bool {
        if self.budget > 0 {
            self.shared.reserved.fetch_sub(self.budget, Ordering::Relaxed);
            self.budget = 0;
        }
        let settled = self.shared.settled.fetch_add(self.unsettled, Ordering::Relaxed) + self.unsettled;
        self.unsettled = 0;
        settled >= count
    }

    /// Fleet mirrors' moves, by interface.
    pub fn moves(&self) -> Vec<(InterfaceKey, Moves)> {
        let mut moves: Vec<_> = self
            .shared
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, m)| (*k, *m))
            .collect();
        moves.sort_unstable_by_key(|(interface, _)| *interface);
        moves
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
            moves: self.moves(),
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
    ) -> Option<StreamIndex> {
        let (index, stream) = self.streams.get_or_make(key, &self.shared, &mut self.refused_streams)?;
        let starts_over = match sequence {
            Some(seq) => stream.sequence.starts_over_at(seq),
            None => stream.packets == 0,
        };
        let mut moves = self.shared.moves.lock().unwrap_or_else(PoisonError::into_inner);
        let moves = moves.entry(interface).or_insert(Moves { last: key.sender, moves: 0 });
        let moved = moves.last != key.sender && starts_over;
        moves.last = key.sender;
        if moved {
            moves.moves += 1;
            if let Some(seq) = sequence {
                stream.sequence.begin(seq);
                stream.sequenced = true;
                stream.packets += 1;
                stream.bytes += frame_len as u64;
                return Some(index);
            }
        }
        stream.count(frame_len, sequence);
        Some(index)
    }

    pub fn undecodable(&mut self, why: Undecodable) {
        *self.undecodable.entry(why).or_default() += 1;
    }
}

/// A stream's place in its shard's table: the same for the stream as long as the shard
/// lives, and below the number of streams the shard counts (a dense index for tables of the
/// shard's thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamIndex(pub usize);

/// Each stream's counts. Hashed, not ordered (a B-tree search of the key was a sixth of a
/// copy's cost), and the stream of the last copy is tried first: a ring block holds runs of one
/// sender's copies of one session, and a key compare is cheaper than a hash lookup.
#[derive(Debug, Default)]
pub struct Streams {
    counts: Vec<(StreamKey, StreamStats)>,
    /// Index in `counts` by stream.
    index: HashMap<StreamKey, usize, foldhash::fast::RandomState>,
    /// The index of the stream looked up last.
    last: usize,
}

impl Streams {
    pub fn iter(&self) -> impl Iterator<Item = (&StreamKey, &StreamStats)> {
        self.counts.iter().map(|(key, stats)| (key, stats))
    }

    /// The counts of stream `key`, made if `shared` has room for another stream (counted in
    /// `refused` if not).
    fn get_or_make(
        &mut self,
        key: StreamKey,
        shared: &Shared,
        refused: &mut u64,
    ) -> Option<(StreamIndex, &mut StreamStats)> {
        if self.counts.get(self.last).is_none_or(|(last, _)| *last != key) {
            self.last = match self.index.entry(key) {
                Entry::Occupied(stream) => *stream.get(),
                Entry::Vacant(_) if !shared.take_stream() => {
                    *refused += 1;
                    return None;
                }
                Entry::Vacant(stream) => {
                    stream.insert(self.counts.len());
                    self.counts.push((key, StreamStats::default()));
                    self.counts.len() - 1
                }
            };
        }
        Some((StreamIndex(self.last), &mut self.counts[self.last].1))
    }
}

/// The summary: one row per stream, then the packets that were no copies.
pub fn render_summary(stats: &Snapshot, label: impl Fn(&InterfaceKey) -> String) -> String {
    let streams = &stats.streams;
    let labels: Vec<String> = streams.iter().map(|(key, _)| label(&key.interface())).collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<15} {:<9} {:<8} {:<width$} {:<4} {:>10} {:>12} {:>6} {:>9}\n",
        "SENDER", "ENCAP", "SESSION", "NAME", "DIR", "PACKETS", "BYTES", "LOST", "REORDERED"
    );
    for ((key, s), name) in streams.iter().zip(&labels) {
        let (lost, reordered) = if s.sequenced {
            (s.lost.to_string(), s.reordered.to_string())
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
        if s.duplicates > 0 || s.restarts > 0 {
            out.push_str(&format!(
                "{:<15} duplicated sequence numbers {}, sequence restarts {}\n",
                "", s.duplicates, s.restarts
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
        stats.socket_drops,
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
    if stats.streams.iter().any(|(k, _)| k.kind == Kind::Vxlan) {
        out.push_str(
            "VXLAN carries no sequence numbers: its lost and reordered copies cannot be counted (-); \
             --encap gre counts them\n",
        );
    }
    // After the closing lines: the rows above keep their shape for readers of the summary.
    for (interface, m) in stats.moves.iter().filter(|(_, m)| m.moves > 0) {
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
pub fn render_live(stats: &Snapshot, label: impl Fn(&InterfaceKey) -> String) -> String {
    let mut sessions: BTreeMap<InterfaceKey, (u64, u64)> = BTreeMap::new();
    for (key, s) in &stats.streams {
        let entry = sessions.entry(key.interface()).or_default();
        entry.0 += s.packets;
        entry.1 += s.lost;
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
        assert_eq!(stats.moves(), [(interface, Moves { last: b, moves: 1 })]);
        // Back to a: its new session counts from 0 again.
        stats.fleet_copy(interface, key(a), 60, Some(0));
        stats.fleet_copy(interface, key(a), 60, Some(1));
        assert_eq!(stats.moves(), [(interface, Moves { last: a, moves: 2 })]);
        let lost: u64 = stats.streams.iter().map(|(_, s)| s.sequence.lost + s.sequence.duplicates).sum();
        assert_eq!(lost, 0, "a move is no loss: {:?}", stats.streams);
        assert!(render_summary(&stats.snapshot(), |_| "web".into()).contains("web: moved 2 time(s)"));
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
        let text = render_summary(&stats.snapshot(), |k| format!("s{}", k.session));
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["192.0.2.1", "gre", "3", "s3", "out", "3", "300", "1", "0"]);
        assert!(text.contains("undecodable 1 (unknown GRE protocol 1)"), "{text}");
        assert!(text.contains("(not --from) 5"), "{text}");
        assert_eq!(
            render_live(&stats.snapshot(), |k| format!("s{}", k.session)),
            "s3: 3 lost 1 | undecodable 1"
        );
    }

    fn stream(last: u8, session: u32) -> StreamKey {
        StreamKey {
            sender: Ipv4Addr::new(198, 51, 100, last).into(),
            kind: Kind::VmsniffGre,
            session,
            direction: Some(Direction::In),
        }
    }

    #[test]
    fn shards_share_the_count_and_give_back_what_they_did_not_use() {
        let stats = ShardedStats::new(DEFAULT_MAX_STREAMS, 2);
        let count = BUDGET_CHUNK + 476;
        let mut a = stats.reader(0);
        assert!((0..1000).all(|_| a.take_one(count)), "a takes a chunk: 1000 of it used");
        std::thread::scope(|scope| {
            let b = scope.spawn(|| {
                let mut b = stats.reader(1);
                assert!((0..476).all(|_| b.take_one(count)), "b takes the rest");
                // Every copy is taken now, 24 of them unused by a: b waits for a to settle and
                // takes what it gives back, then finds the count reached.
                let more = (0..100).take_while(|_| b.take_one(count)).count();
                (more, b.settle(count))
            });
            // b is waiting by now (it is not a condition of the test: b takes the same copies
            // if a settles first).
            std::thread::sleep(std::time::Duration::from_millis(50));
            a.give_back_one();
            assert!(!a.settle(count), "999 settled, with b's 476 at most");
            let (more, reached) = b.join().expect("b");
            assert_eq!(more, 25, "what a gave back: its unused budget and the refused copy");
            assert!(reached, "999 + 476 + 25: the count is reached exactly");
        });
        assert!(!a.take_one(count), "nothing more to take, and nothing to wait for");
    }

    #[test]
    fn the_stream_bound_spans_the_shards_and_their_counts_add_up() {
        let stats = ShardedStats::new(10, 2);
        {
            let (mut a, mut b) = (stats.reader(0), stats.reader(1));
            (0..6).for_each(|session| assert!(a.copy(stream(1, session), 60, Some(0)).is_some()));
            let counted: Vec<bool> =
                (0..6).map(|session| b.copy(stream(2, session), 60, Some(0)).is_some()).collect();
            assert_eq!(counted, [true, true, true, true, false, false], "10 streams in all");
            assert!(b.copy(stream(2, 0), 60, Some(1)).is_some(), "a stream counted goes on");
            a.undecodable(Undecodable::UnknownProtocol);
            b.undecodable(Undecodable::UnknownProtocol);
            b.socket_drops.insert(16, 3);
            (a.written, b.written) = (6, 5);
            // A full table refuses a fleet mirror's new streams as any other.
            let fleet = InterfaceKey {
                sender: Ipv4Addr::UNSPECIFIED.into(),
                erspan: false,
                plain: false,
                vxlan: false,
                session: 99,
            };
            for seq in 0..3 {
                a.fleet_copy(fleet, stream(1, 99), 60, Some(100 + seq));
            }
            b.fleet_copy(fleet, stream(2, 99), 60, Some(0));
        }
        stats.main().ignored = 4;
        let all = stats.snapshot();
        assert_eq!(all.streams.len(), 10, "the fleet mirror's streams were refused: the table is full");
        assert_eq!((all.refused_streams, all.written, all.ignored), (2 + 4, 11, 4));
        assert_eq!(all.undecodable_total(), 2);
        assert_eq!(all.socket_drops, 3);
        assert!(all.streams.is_sorted_by_key(|(key, _)| *key), "in key order, whichever shard counted them");
        let counts = |key| all.streams.iter().find(|(k, _)| *k == key).unwrap().1;
        assert_eq!(counts(stream(2, 0)).packets, 2);
    }

    #[test]
    fn fleet_moves_are_seen_across_shards() {
        let stats = ShardedStats::new(DEFAULT_MAX_STREAMS, 2);
        let fleet = InterfaceKey {
            sender: Ipv4Addr::UNSPECIFIED.into(),
            erspan: false,
            plain: false,
            vxlan: false,
            session: 9,
        };
        for seq in 0..3 {
            stats.reader(0).fleet_copy(fleet, stream(1, 9), 60, Some(100 + seq));
        }
        stats.reader(1).fleet_copy(fleet, stream(2, 9), 60, Some(0));
        stats.reader(1).fleet_copy(fleet, stream(2, 9), 60, Some(1));
        let all = stats.snapshot();
        assert_eq!(all.moves, [(fleet, Moves { last: Ipv4Addr::new(198, 51, 100, 2).into(), moves: 1 })]);
        let lost: u64 = all.streams.iter().map(|(_, s)| s.lost).sum();
        assert_eq!(lost, 0);
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
        assert_eq!((stats.streams.iter().count(), stats.refused_streams), (DEFAULT_MAX_STREAMS, 100));
        // Streams already counted go on.
        assert!(stats.copy(key(1), 60, Some(1)).is_some());
        assert!(stats.copy(key(DEFAULT_MAX_STREAMS as u32 + 5), 60, Some(1)).is_none());
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.streams.len(), DEFAULT_MAX_STREAMS);
        assert_eq!(snapshot.refused_streams, 101);
        assert!(
            render_summary(&stats.snapshot(), |_| String::new())
                .contains("; refused (over 4096 streams: --max-streams) 101")
        );
    }
}
