//! The pcapng output: one interface per (sender, session), the direction in each packet's flags,
//! whole blocks only.
//!
//! pcap-file encodes the blocks (it checks interface ids and writes the options Wireshark reads),
//! but writes each block as many small writes. So every block is encoded into a buffer of its
//! own, and the output receives whole blocks: a file is extended block by block and cut back to
//! the last whole block if a write fails (a full disk); a pipe gets each block in one write and
//! a flush, so that `wireshark -k -i -` shows every packet as it arrives.
use crate::sys::files::create_safely;
use std::{
    borrow::Cow,
    collections::HashMap,
    fs::File,
    io::{self, Write as _},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use pcap_file::{
    DataLink, Endianness,
    pcapng::{
        PcapNgWriter,
        blocks::{
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};
use thiserror::Error;

/// Buffered blocks are written out at this size, and by the collector's timer every
/// [`FLUSH_INTERVAL`] (not looked at per packet: a clock read per copy is a tenth of its cost).
const FLUSH_BYTES: usize = 1 << 20;
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The largest frame an interface announces: a jumbo frame with room to spare.
const SNAPLEN: u32 = 65535;
/// if_tsresol 9: timestamps in nanoseconds (pcap-file writes them so).
const NANOSECONDS: u8 = 9;

#[derive(Debug, Error)]
pub enum PcapngError {
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write to {what}")]
    Write {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode a pcapng block")]
    Encode(#[source] pcap_file::PcapError),
}

/// An interface of the capture: the stream of one (sender, session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub description: String,
}

/// One packet to write.
pub struct Packet<'a> {
    pub timestamp: Duration,
    pub frame: &'a [u8],
    pub original_len: usize,
    /// The `epb_flags` word (direction).
    pub flags: u32,
}

/// Encodes pcapng blocks one at a time, each into its own bytes.
pub struct Encoder {
    writer: PcapNgWriter<Vec<u8>>,
}

impl Encoder {
    /// A new section; returns the encoder and the section header block.
    pub fn new() -> Result<(Encoder, Vec<u8>), PcapngError> {
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "vmsniff collect {}",
                env!("CARGO_PKG_VERSION")
            )))],
            ..Default::default()
        };
        let mut writer =
            PcapNgWriter::with_section_header(Vec::new(), section).map_err(PcapngError::Encode)?;
        let header = std::mem::take(writer.get_mut());
        Ok((Encoder { writer }, header))
    }

    /// The interface description block of the next interface id.
    pub fn interface(&mut self, interface: &Interface) -> Result<Vec<u8>, PcapngError> {
        let block = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: SNAPLEN,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(&interface.name)),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(&interface.description)),
                InterfaceDescriptionOption::IfTsResol(NANOSECONDS),
            ],
        };
        self.writer.write_pcapng_block(block).map_err(PcapngError::Encode)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }
}

/// Appends the enhanced packet block of `packet` on interface `id` to `out`: encoded by hand,
/// as pcap-file encodes it (a test holds them equal), because this runs once per copy and
/// pcap-file allocates an option list and a block buffer each time.
fn encode_packet(out: &mut Vec<u8>, id: u32, packet: &Packet) {
    const EPB: u32 = 6;
    const OPT_FLAGS: u16 = 2;
    let data = packet.frame;
    let padded = data.len().next_multiple_of(4);
    // Header 28, data, the flags option (4 + 4), end of options (4), trailing length (4).
    let total = 28 + padded + 8 + 4 + 4;
    let nanos = packet.timestamp.as_nanos() as u64;
    out.reserve(total);
    let word = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_ne_bytes());
    word(out, EPB);
    word(out, total as u32);
    word(out, id);
    word(out, (nanos >> 32) as u32);
    word(out, nanos as u32);
    word(out, data.len() as u32);
    word(out, packet.original_len.max(data.len()) as u32);
    out.extend_from_slice(data);
    out.resize(out.len() + padded - data.len(), 0);
    out.extend_from_slice(&OPT_FLAGS.to_ne_bytes());
    out.extend_from_slice(&4u16.to_ne_bytes());
    word(out, packet.flags);
    word(out, 0);
    word(out, total as u32);
}

/// Packet blocks a reading thread encodes without the capture's lock, for [`Capture::append`]
/// to add whole: under the lock, only each stream's interface id is checked (and patched where
/// it changed: a stream new to the file, a rotation) and the bytes are copied.
pub struct Batch<K> {
    blocks: Vec<u8>,
    /// Each block's offset in `blocks` and its stream's index in `streams`.
    packets: Vec<(usize, usize)>,
    /// The batch's streams, with the interface id their blocks carry.
    streams: Vec<(K, u32)>,
    /// Index in `streams` by stream, asked once per slot and batch.
    index: HashMap<K, usize, foldhash::fast::RandomState>,
    /// Index in `streams` + 1 by the caller's slot (0: not in this batch yet). A vector
    /// index and a key compare per packet: a hash lookup per packet was a tenth of the
    /// collector's CPU.
    slots: Vec<u32>,
    /// The slots set in this batch, to clear.
    slotted: Vec<usize>,
    /// Interface ids as the capture last told them, in its file `file`.
    known: HashMap<K, u32, foldhash::fast::RandomState>,
    file: u32,
}

/// The id a block carries until its stream's is known: patched before it is written.
const UNKNOWN_ID: u32 = u32::MAX;
/// Where an enhanced packet block keeps its interface id.
const EPB_ID_OFFSET: usize = 8;

impl<K: std::hash::Hash + Eq + Clone> Batch<K> {
    pub fn new() -> Batch<K> {
        Batch {
            blocks: Vec::new(),
            packets: Vec::new(),
            streams: Vec::new(),
            index: HashMap::default(),
            slots: Vec::new(),
            slotted: Vec::new(),
            known: HashMap::default(),
            file: 0,
        }
    }

    /// Adds `packet` of stream `key`. `slot` is the caller's small number for the stream (the
    /// batch keeps a table that large), a hint: the key is looked up only when the slot is new
    /// to the batch or its stream has another key (several slots may share a key, and a slot's
    /// key may change).
    pub fn push(&mut self, slot: usize, key: &K, packet: &Packet) {
        if self.slots.len() <= slot {
            self.slots.resize(slot + 1, 0);
        }
        let hinted = self.slots[slot].checked_sub(1).map(|stream| stream as usize);
        let stream = match hinted {
            Some(stream) if self.streams[stream].0 == *key => stream,
            _ => {
                let stream = match self.index.get(key) {
                    Some(&stream) => stream,
                    None => {
                        let id = self.known.get(key).copied().unwrap_or(UNKNOWN_ID);
                        self.streams.push((key.clone(), id));
                        self.index.insert(key.clone(), self.streams.len() - 1);
                        self.streams.len() - 1
                    }
                };
                if hinted.is_none() {
                    self.slotted.push(slot);
                }
                self.slots[slot] = stream as u32 + 1;
                stream
            }
        };
        self.packets.push((self.blocks.len(), stream));
        encode_packet(&mut self.blocks, self.streams[stream].1, packet);
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Empty, keeping its allocations and the ids it knows.
    fn clear(&mut self) {
        self.blocks.clear();
        self.packets.clear();
        self.streams.clear();
        self.index.clear();
        for slot in self.slotted.drain(..) {
            self.slots[slot] = 0;
        }
    }

    /// The block of packet `i`.
    fn block(&self, i: usize) -> &[u8] {
        let start = self.packets[i].0;
        let end = self.packets.get(i + 1).map_or(self.blocks.len(), |next| next.0);
        &self.blocks[start..end]
    }

    fn set_id(&mut self, i: usize, id: u32) {
        let at = self.packets[i].0 + EPB_ID_OFFSET;
        self.blocks[at..at + 4].copy_from_slice(&id.to_ne_bytes());
    }
}

/// Where the capture goes: `-w FILE` (rotated on request) or `-w -`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
}

/// `--rotate SIZE|TIME`, as tcpdump's -C and -G.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotate {
    Bytes(u64),
    Every(Duration),
}

/// The capture being written: the current file (or stdout), its interfaces, whole blocks.
pub struct Capture<K> {
    destination: Destination,
    rotate: Option<Rotate>,
    /// Shared with a reading thread while it writes a buffer out without the capture's lock.
    out: Arc<Mutex<Output>>,
    /// Bytes of whole blocks handed to the current file's output.
    written: u64,
    /// Whole blocks not yet written (files only).
    pending: Vec<u8>,
    encoder: Encoder,
    /// Interface ids of the current section, by stream.
    ids: HashMap<K, u32, foldhash::fast::RandomState>,
    opened: Instant,
    /// Files started so far (1 for the first).
    files: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Capture<K> {
    pub fn open(destination: Destination, rotate: Option<Rotate>) -> Result<Self, PcapngError> {
        let out = Output::shared(open_output(&destination, 1)?);
        let (encoder, header) = Encoder::new()?;
        let mut capture = Capture {
            destination,
            rotate,
            out,
            written: 0,
            pending: Vec::new(),
            encoder,
            ids: HashMap::default(),
            opened: Instant::now(),
            files: 1,
        };
        capture.block(header)?;
        Ok(capture)
    }

    /// The file being written, `None` for stdout.
    pub fn current_path(&self) -> Option<PathBuf> {
        match &self.destination {
            Destination::File(path) => Some(rotated_path(path, self.files)),
            Destination::Stdout => None,
        }
    }

    /// Writes one packet of stream `key`, announcing its interface first in this file.
    pub fn write(
        &mut self,
        key: &K,
        interface: impl FnOnce() -> Interface,
        packet: &Packet,
    ) -> Result<(), PcapngError> {
        self.rotate_if_due()?;
        let id = self.id(key, interface)?;
        match self.destination {
            Destination::Stdout => {
                let mut block = Vec::new();
                encode_packet(&mut block, id, packet);
                self.write_whole(&block)
            }
            Destination::File(_) => {
                encode_packet(&mut self.pending, id, packet);
                self.flush_if_due()
            }
        }
    }

    /// Adds `batch`'s packets in their order and empties it; [`append_shared`] writes a full
    /// buffer out.
    fn append(
        &mut self,
        batch: &mut Batch<K>,
        interface: impl Fn(&K) -> Interface,
    ) -> Result<(), PcapngError> {
        if batch.is_empty() {
            return Ok(());
        }
        let result = match self.number(batch, &interface) {
            Ok(Numbered::Whole) => match self.destination {
                Destination::Stdout => self.write_whole(&batch.blocks),
                Destination::File(_) => {
                    self.pending.extend_from_slice(&batch.blocks);
                    Ok(())
                }
            },
            Ok(Numbered::Added) => Ok(()),
            Err(e) => Err(e),
        };
        batch.clear();
        result
    }

    /// Rotates if due, then gives `batch`'s packets their streams' interface ids in this file
    /// (announcing new streams), each stream's checked once. A batch that would cross a size
    /// rotation is added packet by packet instead, so that every file starts with its own
    /// interfaces, as with [`Capture::write`].
    fn number(
        &mut self,
        batch: &mut Batch<K>,
        interface: &impl Fn(&K) -> Interface,
    ) -> Result<Numbered, PcapngError> {
        self.rotate_if_due()?;
        let fits = match self.rotate {
            Some(Rotate::Bytes(limit)) => {
                self.written + (self.pending.len() + batch.blocks.len()) as u64 <= limit
            }
            _ => true,
        };
        if !fits {
            self.append_each(batch, interface)?;
            return Ok(Numbered::Added);
        }
        let mut patch = false;
        for stream in 0..batch.streams.len() {
            let key = &batch.streams[stream].0;
            let id = self.id(key, || interface(key))?;
            patch |= id != batch.streams[stream].1;
            batch.streams[stream].1 = id;
        }
        if patch {
            for i in 0..batch.packets.len() {
                batch.set_id(i, batch.streams[batch.packets[i].1].1);
            }
        }
        self.learn(batch);
        Ok(Numbered::Whole)
    }

    fn append_each(
        &mut self,
        batch: &mut Batch<K>,
        interface: &impl Fn(&K) -> Interface,
    ) -> Result<(), PcapngError> {
        for i in 0..batch.packets.len() {
            self.rotate_if_due()?;
            let key = &batch.streams[batch.packets[i].1].0;
            let id = self.id(key, || interface(key))?;
            batch.set_id(i, id);
            let block = batch.block(i).to_vec();
            self.block(block)?;
        }
        self.learn(batch);
        Ok(())
    }

    /// Tells `batch` the ids of its streams in the current file, for its next packets.
    fn learn(&self, batch: &mut Batch<K>) {
        if batch.file != self.files {
            batch.known.clear();
            batch.file = self.files;
        }
        for (key, _) in &batch.streams {
            if let Some(&id) = self.ids.get(key) {
                batch.known.insert(key.clone(), id);
            }
        }
    }

    /// The interface id of stream `key` in this file, announcing it first if new.
    fn id(&mut self, key: &K, interface: impl FnOnce() -> Interface) -> Result<u32, PcapngError> {
        if let Some(&id) = self.ids.get(key) {
            return Ok(id);
        }
        let id = self.ids.len() as u32;
        let block = self.encoder.interface(&interface())?;
        self.block(block)?;
        self.ids.insert(key.clone(), id);
        Ok(id)
    }

    /// Writes out buffered blocks (files); called on a timer and before exit.
    pub fn flush(&mut self) -> Result<(), PcapngError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // The buffer is kept (cleared) so that its capacity serves the next blocks.
        let mut pending = std::mem::take(&mut self.pending);
        let result = self.write_whole(&pending);
        pending.clear();
        self.pending = pending;
        result
    }

    /// Time-based rotation, also without traffic; called on a timer.
    pub fn rotate_if_due(&mut self) -> Result<(), PcapngError> {
        let due = match self.rotate {
            Some(Rotate::Every(every)) => self.opened.elapsed() >= every,
            Some(Rotate::Bytes(limit)) => self.written + self.pending.len() as u64 >= limit,
            None => false,
        };
        if !due {
            return Ok(());
        }
        self.flush()?;
        self.files += 1;
        self.out = Output::shared(open_output(&self.destination, self.files)?);
        self.written = 0;
        self.opened = Instant::now();
        self.ids.clear();
        let (encoder, header) = Encoder::new()?;
        self.encoder = encoder;
        self.block(header)
    }

    fn block(&mut self, block: Vec<u8>) -> Result<(), PcapngError> {
        match self.destination {
            Destination::Stdout => self.write_whole(&block),
            Destination::File(_) => {
                self.pending.extend_from_slice(&block);
                self.flush_if_due()
            }
        }
    }

    fn flush_if_due(&mut self) -> Result<(), PcapngError> {
        if self.pending.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes whole blocks now.
    fn write_whole(&mut self, blocks: &[u8]) -> Result<(), PcapngError> {
        self.written += blocks.len() as u64;
        let what = self.what();
        lock_output(&self.out).write_whole(blocks, &self.destination, || what)
    }

    fn what(&self) -> String {
        match self.current_path() {
            Some(path) => path.display().to_string(),
            None => "stdout".into(),
        }
    }
}

/// What [`Capture::number`] did with a batch.
enum Numbered {
    /// Its blocks carry their ids: to be added whole.
    Whole,
    /// Added packet by packet already.
    Added,
}

/// Appends `batch` to the capture and empties it (see [`Capture::append`]). When a buffer's
/// worth of blocks is pending, this thread writes it out after letting the capture go, so that
/// the other reading threads append while the file system copies it; the output's own lock,
/// taken first, keeps the buffers in order. A large batch (a flood's: a ring block's copies)
/// is written out as it is, after the blocks pending before it, rather than copied into the
/// pending buffer first.
pub fn append_shared<K: std::hash::Hash + Eq + Clone>(
    capture: &Mutex<Capture<K>>,
    batch: &mut Batch<K>,
    interface: impl Fn(&K) -> Interface,
) -> Result<(), PcapngError> {
    let mut guard = capture.lock().unwrap_or_else(PoisonError::into_inner);
    let file = guard.destination != Destination::Stdout;
    let (pending, as_is) = if !file || batch.blocks.len() < AS_IS_BYTES {
        guard.append(batch, interface)?;
        if !file || guard.pending.len() < FLUSH_BYTES {
            return Ok(());
        }
        (std::mem::replace(&mut guard.pending, Vec::with_capacity(FLUSH_BYTES + FLUSH_SLACK)), false)
    } else {
        match guard.number(batch, &interface) {
            Ok(Numbered::Whole) => {}
            numbered => {
                batch.clear();
                return numbered.map(drop);
            }
        }
        (std::mem::take(&mut guard.pending), true)
    };
    let as_is: &[u8] = if as_is { &batch.blocks } else { &[] };
    guard.written += (pending.len() + as_is.len()) as u64;
    let (out, destination, what) = (Arc::clone(&guard.out), guard.destination.clone(), guard.what());
    let mut output = lock_output(&out);
    drop(guard);
    let result = output
        .write_whole(&pending, &destination, || what.clone())
        .and_then(|()| output.write_whole(as_is, &destination, || what));
    batch.clear();
    result
}

/// Room beyond a buffer's worth, for the batch that fills it.
const FLUSH_SLACK: usize = 1 << 18;
/// A batch at least this large is written as it is (see [`append_shared`]): still one large
/// write.
const AS_IS_BYTES: usize = 1 << 17;

/// Where whole blocks go: the current file (or stdout) and how much of it is whole.
pub struct Output {
    file: File,
    /// Bytes known to be whole blocks in the file.
    whole: u64,
    /// A write failed: the file ends at its last whole block, and nothing more is added (a
    /// thread still holding a buffer must not write it after the cut).
    failed: bool,
}

impl Output {
    fn shared(file: File) -> Arc<Mutex<Output>> {
        Arc::new(Mutex::new(Output { file, whole: 0, failed: false }))
    }

    /// Writes whole blocks; on failure cuts a file back to its last whole block.
    fn write_whole(
        &mut self,
        blocks: &[u8],
        destination: &Destination,
        what: impl FnOnce() -> String,
    ) -> Result<(), PcapngError> {
        let result = if self.failed {
            Err(io::Error::other("an earlier write to it failed"))
        } else {
            self.file.write_all(blocks).and_then(|()| self.file.flush())
        };
        match result {
            Ok(()) => {
                self.whole += blocks.len() as u64;
                Ok(())
            }
            Err(source) => {
                if !self.failed && matches!(destination, Destination::File(_)) {
                    // Best effort: the error below is what the operator must see.
                    let _ = self.file.set_len(self.whole);
                }
                self.failed = true;
                Err(PcapngError::Write { what: what(), source })
            }
        }
    }
}

fn lock_output(out: &Mutex<Output>) -> MutexGuard<'_, Output> {
    out.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_output(destination: &Destination, file: u32) -> Result<File, PcapngError> {
    match destination {
        // Unbuffered (stdout's own handle is line-buffered): each block goes in one write.
        Destination::Stdout => io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|source| PcapngError::Write { what: "stdout".into(), source }),
        Destination::File(path) => {
            let path = rotated_path(path, file);
            // Root's, as the frames in it are the tenants'.
            create_safely(&path, 0o600).map_err(|source| PcapngError::Create { path, source })
        }
    }
}

/// The `n`th file (1-based) of a rotated capture: `cap.pcapng`, `cap.1.pcapng`, `cap.2.pcapng`...
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    if n <= 1 {
        return path.to_owned();
    }
    let index = n - 1;
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => {
            path.with_file_name(format!("{}.{index}.{}", stem.to_string_lossy(), ext.to_string_lossy()))
        }
        _ => PathBuf::from(format!("{}.{index}", path.display())),
    }
}

/// `--rotate`: a size (`100M`, `1G`, `500K`, bytes) or a time (`30s`, `10m`, `1h`).
pub fn parse_rotate(text: &str) -> Result<Rotate, String> {
    let err = || {
        format!(
            "--rotate {text:?}: give a size such as 100M or 1G (a new file when the current one \
             reaches it) or a time such as 30s, 10m or 1h (a new file that often)"
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| err())?;
    if number == 0 {
        return Err(err());
    }
    let bytes = |scale: u64| number.checked_mul(scale).map(Rotate::Bytes).ok_or_else(err);
    let secs =
        |scale: u64| number.checked_mul(scale).map(|s| Rotate::Every(Duration::from_secs(s))).ok_or_else(err);
    match unit {
        "" | "B" => bytes(1),
        "K" | "k" | "KB" | "KiB" => bytes(1 << 10),
        "M" | "MB" | "MiB" => bytes(1 << 20),
        "G" | "GB" | "GiB" => bytes(1 << 30),
        "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use pcap_file::pcapng::{
        Block, PcapNgReader,
        blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
    };

    use super::*;

    fn packet(frame: &[u8], flags: u32) -> Packet<'_> {
        Packet {
            timestamp: Duration::new(1_700_000_000, 123_456_789),
            frame,
            original_len: frame.len(),
            flags,
        }
    }

    fn iface(name: &str) -> Interface {
        Interface { name: name.into(), description: format!("{name} described") }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmsniff-pcapng-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A packet read back: interface id, data, original length, flags.
    type ReadPacket = (u32, Vec<u8>, u32, Option<u32>);

    /// Reads a capture back: the interface names and the packets.
    fn read_back(path: &Path) -> (Vec<String>, Vec<ReadPacket>) {
        let mut reader = PcapNgReader::new(File::open(path).unwrap()).unwrap();
        let (mut names, mut packets) = (Vec::new(), Vec::new());
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(idb) => names.extend(idb.options.iter().find_map(|o| match o {
                    InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                    _ => None,
                })),
                Block::EnhancedPacket(epb) => {
                    let flags = epb.options.iter().find_map(|o| match o {
                        EnhancedPacketOption::Flags(f) => Some(*f),
                        _ => None,
                    });
                    packets.push((epb.interface_id, epb.data.to_vec(), epb.original_len, flags));
                }
                _ => {}
            }
        }
        (names, packets)
    }

    #[test]
    fn packets_are_encoded_as_pcap_file_encodes_them() {
        let (mut writer, _) = Encoder::new().unwrap();
        // pcap-file refuses a packet of an interface not announced.
        writer.interface(&iface("x")).unwrap();
        for (len, original, flags) in [(60, 60, 1), (61, 1500, 2), (1, 1, 0), (64, 64, 2), (0, 0, 1)] {
            let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let packet = Packet { original_len: original, ..packet(&frame, flags) };
            let block = EnhancedPacketBlock {
                interface_id: 0,
                timestamp: packet.timestamp,
                original_len: original as u32,
                data: Cow::Borrowed(&frame),
                options: vec![EnhancedPacketOption::Flags(flags)],
            };
            writer.writer.write_pcapng_block(block).unwrap();
            let mut ours = vec![9];
            encode_packet(&mut ours, 0, &packet);
            assert_eq!(ours[1..], writer.writer.get_mut()[..], "frame of {len}");
            writer.writer.get_mut().clear();
        }
    }

    #[test]
    fn interfaces_are_announced_once_per_stream_and_packets_carry_direction_and_length() {
        let dir = scratch("basic");
        let path = dir.join("cap.pcapng");
        let mut capture: Capture<u32> = Capture::open(Destination::File(path.clone()), None).unwrap();
        let (a, b) = (vec![1u8; 60], vec![2u8; 61]);
        capture.write(&1, || iface("192.0.2.1 session 1"), &packet(&a, 2)).unwrap();
        capture.write(&2, || iface("192.0.2.1 session 2"), &packet(&b, 1)).unwrap();
        capture
            .write(&1, || panic!("announced already"), &Packet { original_len: 1500, ..packet(&a, 1) })
            .unwrap();
        capture.flush().unwrap();
        let (names, packets) = read_back(&path);
        assert_eq!(names, ["192.0.2.1 session 1", "192.0.2.1 session 2"]);
        assert_eq!(packets.len(), 3);
        assert_eq!(packets[0], (0, a.clone(), 60, Some(2)));
        assert_eq!(packets[1], (1, b, 61, Some(1)));
        assert_eq!(packets[2], (0, a, 1500, Some(1)), "the original length of a cut copy");
        if let Some(rows) = tshark(
            &path,
            &["frame.interface_name", "frame.packet_flags_direction", "frame.len", "frame.cap_len"],
        ) {
            // tshark prints the direction as 0x00000002 or 2, depending on its version.
            let rows: Vec<(String, u32, String)> = rows
                .iter()
                .map(|row| {
                    let cells: Vec<&str> = row.split('\t').collect();
                    let direction = cells[1]
                        .strip_prefix("0x")
                        .map_or_else(|| cells[1].parse(), |h| u32::from_str_radix(h, 16));
                    (cells[0].to_owned(), direction.unwrap(), format!("{} {}", cells[2], cells[3]))
                })
                .collect();
            let expect = |name: &str, d, lens: &str| (name.to_owned(), d, lens.to_owned());
            assert_eq!(
                rows,
                [
                    expect("192.0.2.1 session 1", 2, "60 60"),
                    expect("192.0.2.1 session 2", 1, "61 61"),
                    expect("192.0.2.1 session 1", 1, "1500 60"),
                ]
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// tshark's fields for every packet of `path`, when tshark is installed.
    fn tshark(path: &Path, fields: &[&str]) -> Option<Vec<String>> {
        let mut cmd = std::process::Command::new("tshark");
        cmd.arg("-r").arg(path).args(["-T", "fields"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = match cmd.output() {
            Ok(out) => out,
            Err(e) => {
                eprintln!("tshark not run ({e}): the capture was checked with pcap-file's reader only");
                return None;
            }
        };
        assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }

    #[test]
    fn rotation_by_size_starts_whole_files_with_their_own_interfaces() {
        let dir = scratch("rotate");
        let path = dir.join("cap.pcapng");
        let mut capture: Capture<u32> =
            Capture::open(Destination::File(path.clone()), Some(Rotate::Bytes(1000))).unwrap();
        let frame = vec![7u8; 300];
        for i in 0..10 {
            capture.write(&(i % 2), || iface(&format!("s{}", i % 2)), &packet(&frame, 2)).unwrap();
        }
        capture.flush().unwrap();
        let mut total = 0;
        for n in 1.. {
            let file = rotated_path(&path, n);
            if !file.exists() {
                break;
            }
            let (names, packets) = read_back(&file);
            assert!(!names.is_empty() && names.len() <= 2, "{} announces its own interfaces", file.display());
            assert!(packets.iter().all(|p| (p.0 as usize) < names.len()));
            total += packets.len();
        }
        assert_eq!(total, 10);
        assert!(rotated_path(&path, 3).exists(), "3 files at least for 10 x 300 B with 1000 B each");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotated_names_number_before_the_extension() {
        let p = Path::new("/x/cap.pcapng");
        assert_eq!(rotated_path(p, 1), Path::new("/x/cap.pcapng"));
        assert_eq!(rotated_path(p, 2), Path::new("/x/cap.1.pcapng"));
        assert_eq!(rotated_path(Path::new("cap"), 3), Path::new("cap.2"));
    }

    #[test]
    fn rotate_takes_sizes_and_times() {
        assert_eq!(parse_rotate("100M"), Ok(Rotate::Bytes(100 << 20)));
        assert_eq!(parse_rotate("4096"), Ok(Rotate::Bytes(4096)));
        assert_eq!(parse_rotate("1G"), Ok(Rotate::Bytes(1 << 30)));
        assert_eq!(parse_rotate("30s"), Ok(Rotate::Every(Duration::from_secs(30))));
        assert_eq!(parse_rotate("10m"), Ok(Rotate::Every(Duration::from_secs(600))));
        assert_eq!(parse_rotate("1h"), Ok(Rotate::Every(Duration::from_secs(3600))));
        for bad in ["", "0", "M", "10x", "-5M", "99999999999999999999G"] {
            assert!(parse_rotate(bad).is_err(), "{bad}");
        }
    }

    /// A capture into /dev/full, which fails every write.
    fn full_capture() -> Capture<u32> {
        Capture {
            destination: Destination::File(PathBuf::from("/dev/full")),
            rotate: None,
            out: Output::shared(File::options().write(true).open("/dev/full").unwrap()),
            written: 0,
            pending: Vec::new(),
            encoder: Encoder::new().unwrap().0,
            ids: HashMap::default(),
            opened: Instant::now(),
            files: 1,
        }
    }

    #[test]
    fn a_failing_write_leaves_only_whole_blocks() {
        // /dev/full fails every write: nothing, not even part of a block, lands there, and the
        // error names the destination.
        let mut capture = full_capture();
        capture.write(&1, || iface("x"), &packet(&[0u8; 60], 0)).unwrap();
        let error = capture.flush().unwrap_err();
        assert!(error.to_string().contains("/dev/full"), "{error}");
        assert_eq!(lock_output(&capture.out).whole, 0);
    }

    /// Every packet of every file of the capture `path`: the name of its interface and the
    /// stream its frame says it belongs to (each test frame is filled with its stream's number).
    fn streams_of_packets(path: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in 1.. {
            let file = rotated_path(path, n);
            if !file.exists() {
                break;
            }
            let (names, packets) = read_back(&file);
            for (id, data, ..) in packets {
                let name = names
                    .get(id as usize)
                    .unwrap_or_else(|| panic!("{}: id {id} not announced", file.display()));
                out.push((name.clone(), format!("s{}", data[0])));
            }
        }
        out
    }

    #[test]
    fn batches_of_several_threads_are_written_whole_in_order_with_their_streams_ids() {
        let dir = scratch("batches");
        let path = dir.join("cap.pcapng");
        let capture = Mutex::new(Capture::<u32>::open(Destination::File(path.clone()), None).unwrap());
        let name = |k: &u32| iface(&format!("s{k}"));
        let (mut a, mut b) = (Batch::new(), Batch::new());
        let mut expect = Vec::new();
        let mut push = |batch: &mut Batch<u32>, stream: u32| {
            batch.push(stream as usize, &stream, &packet(&[stream as u8; 60], 1));
            expect.push(format!("s{stream}"));
        };
        // b announces 2 and 3 after a announced 1 and 2: a's next batch learns 3's id from
        // the capture, b's knows 2's from its own first batch.
        for stream in [1, 2, 1] {
            push(&mut a, stream);
        }
        append_shared(&capture, &mut a, name).unwrap();
        for stream in [3, 2, 3] {
            push(&mut b, stream);
        }
        append_shared(&capture, &mut b, name).unwrap();
        // A flood's batch, written as it is after the blocks pending before it (4 is new: its
        // interface is announced between them).
        for i in 0..AS_IS_BYTES / 100 {
            push(&mut b, [1, 4][i % 2]);
        }
        append_shared(&capture, &mut b, name).unwrap();
        for stream in [3, 1, 2] {
            push(&mut a, stream);
        }
        append_shared(&capture, &mut a, name).unwrap();
        push(&mut b, 2);
        append_shared(&capture, &mut b, name).unwrap();
        capture.lock().unwrap().flush().unwrap();
        let (names, _) = read_back(&path);
        assert_eq!(names, ["s1", "s2", "s3", "s4"], "each stream announced once, when first written");
        let written: Vec<String> = streams_of_packets(&path)
            .into_iter()
            .map(|(name, stream)| {
                assert_eq!(name, stream, "a packet carries its own stream's id");
                name
            })
            .collect();
        assert_eq!(written, expect);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_slot_is_only_a_hint_of_the_stream() {
        let dir = scratch("slots");
        let path = dir.join("cap.pcapng");
        let capture = Mutex::new(Capture::<u32>::open(Destination::File(path.clone()), None).unwrap());
        let mut batch = Batch::new();
        // Slot 0 changes its key (a fleet mirror declared or dropped mid-block); slots 1 and 2
        // share one (both directions of a session).
        for (slot, stream) in [(0, 1), (0, 2), (1, 1), (2, 1), (0, 2), (0, 1), (1, 1)] {
            batch.push(slot, &stream, &packet(&[stream as u8; 60], 1));
        }
        append_shared(&capture, &mut batch, |k: &u32| iface(&format!("s{k}"))).unwrap();
        capture.lock().unwrap().flush().unwrap();
        let written = streams_of_packets(&path);
        assert_eq!(written.len(), 7);
        assert!(written.iter().all(|(name, stream)| name == stream), "{written:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_batch_that_crosses_a_size_rotation_starts_the_next_file_with_its_own_interfaces() {
        let dir = scratch("batch-rotate");
        let path = dir.join("cap.pcapng");
        let capture = Mutex::new(
            Capture::<u32>::open(Destination::File(path.clone()), Some(Rotate::Bytes(2000))).unwrap(),
        );
        let name = |k: &u32| iface(&format!("s{k}"));
        let mut batch = Batch::new();
        let mut expect = 0;
        // Batches of 6 x 300 B: most cross the 2000 B limit part way. The ids the batch
        // learnt in one file are wrong in the next (stream 2 is first there): patched.
        for round in 0..6u32 {
            for i in 0..6u32 {
                let stream = (round + i) % 3;
                batch.push(stream as usize, &stream, &packet(&[stream as u8; 300], 2));
                expect += 1;
            }
            append_shared(&capture, &mut batch, name).unwrap();
        }
        capture.lock().unwrap().flush().unwrap();
        let written = streams_of_packets(&path);
        assert_eq!(written.len(), expect);
        assert!(written.iter().all(|(name, stream)| name == stream), "{written:?}");
        assert!(rotated_path(&path, 5).exists(), "36 x 300 B make 5 files of 2000 B at least");
        for n in 1.. {
            let file = rotated_path(&path, n);
            if !file.exists() {
                break;
            }
            let size = std::fs::metadata(&file).unwrap().len();
            assert!(size < 2000 + 400, "{}: {size} B, one packet over the limit at most", file.display());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn after_a_failed_write_no_thread_adds_to_the_file() {
        let capture = Mutex::new(full_capture());
        let frame = vec![0u8; 1400];
        // Small batches, until a buffer's worth of them is written out.
        let mut small = Batch::new();
        let error = loop {
            for _ in 0..AS_IS_BYTES / 1500 {
                small.push(1, &1, &packet(&frame, 0));
            }
            if let Err(error) = append_shared(&capture, &mut small, |_| iface("x")) {
                break error;
            }
        };
        assert!(error.to_string().contains("/dev/full"), "{error}");
        // Then a flood's batch, which would be written as it is.
        let mut large = Batch::new();
        for _ in 0..AS_IS_BYTES / 1400 + 1 {
            large.push(1, &1, &packet(&frame, 0));
        }
        let error = append_shared(&capture, &mut large, |_| iface("x")).unwrap_err();
        let cause = std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default();
        assert!(cause.contains("earlier write"), "{error}: {cause}");
        assert_eq!(lock_output(&capture.lock().unwrap().out).whole, 0);
    }
}
