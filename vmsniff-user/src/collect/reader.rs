//! The rings' reading threads: one per ring (`--threads`). A thread sorts, decodes and counts a
//! whole block on its own (its repeats, fragments, host addresses and streams are its own: a
//! sender's packets all reach one ring), encodes the block's copies into a batch of its own,
//! then takes the capture's lock once to add the batch, its copies in the order they arrived.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    copies::{self, Admission, Listener, Options, Skip},
    decode::Copy,
    pcapng::{self, Batch, Capture, FLUSH_INTERVAL, PcapngError},
    reassembly::{self, Offered, Reassembly},
    ring::{self, BlockPackets, Classified, LocalAddresses, Repeats, Ring},
    stats::{InterfaceKey, SharedStats},
};

/// The capture, written by every reading thread and flushed on the main one's timer.
pub type SharedCapture = Arc<Mutex<Capture<InterfaceKey>>>;

/// The capture, also when a thread panicked holding it: every write is of whole blocks.
pub fn lock_capture(capture: &SharedCapture) -> MutexGuard<'_, Capture<InterfaceKey>> {
    capture.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long a thread waits for its ring at most: its ring's drop count is read between waits.
const POLL_MS: libc::c_int = 1000;
/// Index of the rings' count in `Stats::socket_drops` (the sockets use their [`Listener`]'s).
const RING_DROPS: usize = 16;

/// Why a reading thread ended on its own.
#[derive(Debug)]
pub enum Finished {
    /// `--count` copies are written.
    Count,
    /// Writing the capture failed (a closed pipe among others).
    Capture(PcapngError),
    Poll(io::Error),
    /// The thread panicked: a bug, reported rather than leaving its senders unread.
    Panicked(String),
}

/// The running threads; dropping them asks them to stop.
pub struct Readers {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

/// Asks the threads to stop: a flag they look at between blocks, and an eventfd that wakes
/// them from waiting for their rings.
struct Stop {
    asked: AtomicBool,
    wake: OwnedFd,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        // SAFETY: plain eventfd(2); the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        Ok(Stop { asked: AtomicBool::new(false), wake: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn ask(&self) {
        self.asked.store(true, Ordering::Relaxed);
        // Never read: it stays readable, for every thread.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer of 8 to the eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

impl Readers {
    /// A thread per ring, each telling `finished` if it ends on its own.
    pub fn start(
        rings: Vec<Ring>,
        options: &Arc<Options>,
        stats: &SharedStats,
        capture: &SharedCapture,
        finished: &UnboundedSender<Finished>,
    ) -> io::Result<Readers> {
        let mut readers = Readers { stop: Arc::new(Stop::new()?), threads: Vec::new() };
        for (i, ring) in rings.into_iter().enumerate() {
            let (options, stats, capture) = (options.clone(), stats.clone(), capture.clone());
            let (stop, finished) = (readers.stop.clone(), finished.clone());
            let thread = std::thread::Builder::new().name(format!("collect-{i}")).spawn(move || {
                let outcome =
                    catch_unwind(AssertUnwindSafe(|| read(&ring, i, &options, &stats, &capture, &stop)));
                let report = match outcome {
                    Ok(Ok(None)) => return,
                    Ok(Ok(Some(finished))) | Ok(Err(finished)) => finished,
                    Err(panic) => Finished::Panicked(
                        panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default(),
                    ),
                };
                // The main loop may be gone already (it stops the threads on its way out).
                let _ = finished.send(report);
            })?;
            readers.threads.push(thread);
        }
        Ok(readers)
    }

    /// Stops the threads and waits for them: each has counted its ring's drops.
    pub async fn stop(mut self) {
        self.stop.ask();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.ask();
    }
}

/// Reads `ring` (reading thread `index`'s) until asked to stop (`Ok(None)`), `--count` is
/// reached, or a failure.
fn read(
    ring: &Ring,
    index: usize,
    options: &Options,
    stats: &SharedStats,
    capture: &SharedCapture,
    stop: &Stop,
) -> Result<Option<Finished>, Finished> {
    let mut sorter = Sorter::new(index);
    let mut drops_counted = Instant::now();
    let outcome = 'reading: loop {
        if stop.asked() {
            break Ok(None);
        }
        let mut poll = [ring.as_raw_fd(), stop.wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two live pollfds, their count given.
        if unsafe { libc::poll(poll.as_mut_ptr(), 2, POLL_MS) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break Err(Finished::Poll(e));
            }
        }
        while let Some(block) = ring.read_block(|packets| sorter.block(packets, options, stats, capture)) {
            match block {
                Ok(false) => {}
                Ok(true) => break 'reading Ok(Some(Finished::Count)),
                Err(e) => break 'reading Err(Finished::Capture(e)),
            }
            if stop.asked() {
                break;
            }
        }
        if drops_counted.elapsed() >= FLUSH_INTERVAL {
            count_drops(ring, index, stats);
            drops_counted = Instant::now();
        }
    };
    count_drops(ring, index, stats);
    outcome
}

/// Copies the ring dropped since the last call, into its thread's shard of `stats`.
fn count_drops(ring: &Ring, index: usize, stats: &SharedStats) {
    match ring.take_drops() {
        Ok(0) => {}
        Ok(n) => *stats.reader(index).socket_drops.entry(RING_DROPS).or_default() += n,
        Err(e) => log::warn!("cannot read the receive ring's drop count: {e}"),
    }
}

/// What a ring packet is.
enum Sorted<'a> {
    Copy(Copy<'a>),
    /// A datagram made whole from fragments, to decode.
    Whole(Vec<u8>),
    Skipped(Skip),
    /// A fragment kept until its datagram is whole.
    Kept,
}

/// One thread's state between blocks.
struct Sorter {
    /// The thread's index, and so its shard of the counts.
    index: usize,
    local: LocalAddresses,
    fragments: Reassembly,
    repeats: Repeats,
    batch: Batch<InterfaceKey>,
}

impl Sorter {
    fn new(index: usize) -> Sorter {
        Sorter {
            index,
            local: LocalAddresses::new(),
            fragments: Reassembly::default(),
            repeats: Repeats::new(),
            batch: Batch::new(),
        }
    }

    /// Sorts, decodes, counts and encodes a block's packets in one pass, then adds them to the
    /// capture; `Ok(true)` once `--count` copies are written. Counted in the thread's own shard
    /// and encoded into its own batch: only the append to the capture is shared.
    fn block(
        &mut self,
        packets: BlockPackets<'_>,
        options: &Options,
        stats: &SharedStats,
        capture: &SharedCapture,
    ) -> Result<bool, PcapngError> {
        let mut stats = stats.reader(self.index);
        // Out of `self` while the block's packets are read, beside `sort`'s own state.
        let mut window = std::mem::take(&mut self.repeats);
        let mut repeats = window.block();
        for packet in packets {
            if repeats.repeat(&packet) {
                continue;
            }
            let whole;
            let copy = match self.sort(packet.data, packet.timestamp, options) {
                Sorted::Copy(copy) => copy,
                Sorted::Whole(datagram) => {
                    whole = datagram;
                    match decode_whole(&whole, options) {
                        Ok(copy) => copy,
                        Err(skip) => {
                            skip.count(&mut stats);
                            continue;
                        }
                    }
                }
                Sorted::Skipped(skip) => {
                    skip.count(&mut stats);
                    continue;
                }
                Sorted::Kept => continue,
            };
            match copies::admit(&copy, options, &mut stats) {
                Admission::Write { interface, stream } => {
                    self.batch.push(stream.0, &interface, &copies::packet(&copy, packet.timestamp));
                }
                Admission::Refused => {}
                // The count is reached: nothing after this copy is written.
                Admission::Counted => break,
            }
        }
        drop(repeats);
        self.repeats = window;
        let given_up = self.fragments.take_given_up();
        if given_up > 0 {
            *stats.undecodable.entry(super::decode::Undecodable::FragmentsIncomplete).or_default() +=
                given_up;
        }
        let counted = copies::settle(options, &mut stats);
        drop(stats);
        pcapng::append_shared(capture, &mut self.batch, |key| copies::interface(&options.names, key))?;
        Ok(counted)
    }

    /// What one packet from the ring is: a copy, a datagram just made whole, a fragment kept
    /// until its datagram is whole, or a reason.
    fn sort<'a>(&mut self, packet: &'a [u8], timestamp: Duration, options: &Options) -> Sorted<'a> {
        let classified = if packet.first().is_some_and(|b| b >> 4 == 4) {
            let ipv4 = match ring::ipv4_for_this_host(packet, &mut self.local) {
                Ok(ipv4) => ipv4,
                Err(why) => return Sorted::Skipped(why.into()),
            };
            if reassembly::is_fragment(ipv4) {
                return match self.fragments.offer(ipv4, timestamp) {
                    Offered::Complete(datagram) => Sorted::Whole(datagram),
                    Offered::Pending => Sorted::Kept,
                    Offered::Refused(why) => Sorted::Skipped(why.into()),
                };
            }
            ring::classify_ipv4(ipv4, options.vxlan_port)
        } else {
            ring::classify_ipv6(packet, options.vxlan_port, &mut self.local)
        };
        match classified.map_err(Skip::from).and_then(|c| decode_classified(c, options)) {
            Ok(copy) => Sorted::Copy(copy),
            Err(skip) => Sorted::Skipped(skip),
        }
    }
}

/// A reassembled IPv4 datagram's copy.
fn decode_whole<'a>(datagram: &'a [u8], options: &Options) -> Result<Copy<'a>, Skip> {
    decode_classified(ring::classify_ipv4(datagram, options.vxlan_port)?, options)
}

fn decode_classified<'a>(classified: Classified<'a>, options: &Options) -> Result<Copy<'a>, Skip> {
    match classified {
        Classified::GreV4(packet) => copies::decode_copy(Listener::GreV4, packet, None, options),
        Classified::GreV6 { sender, gre } => copies::decode_copy(Listener::GreV6, gre, Some(sender), options),
        Classified::Vxlan { sender, datagram } => {
            copies::decode_copy(Listener::Vxlan, datagram, Some(sender), options)
        }
    }
}
