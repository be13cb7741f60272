//! The receive loop: a raw IPv4 socket for GRE (protocol 47; CAP_NET_RAW is enough, no tunnel
//! device), decode, count, write; signals for the summary and the end.
use std::{
    io::{self, IoSliceMut, IsTerminal as _, Write as _},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, SystemTime},
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use super::{
    decode::{self, Copy},
    names::Names,
    pcapng::{Capture, Destination, FLUSH_INTERVAL, Interface, Packet, PcapngError, Rotate},
    stats::{InterfaceKey, SharedStats, Stats, StreamKey, lock, render_live, render_summary},
};
use crate::model::wire::pcapng_direction_flags;

/// Packets read per wakeup before signals and timers get their turn, under a flood too.
const BATCH: usize = 256;
/// The socket's receive buffer: room for bursts while a block is written.
const RECEIVE_BUFFER: usize = 8 << 20;

#[derive(Debug, Error)]
pub enum CollectError {
    #[error(
        "cannot open a raw IPv4 socket for GRE: vmsniff collect needs CAP_NET_RAW (run it as \
         root, or grant it with `setcap cap_net_raw+ep $(command -v vmsniff)`)"
    )]
    NoPermission(#[source] io::Error),
    #[error("{op}")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Capture(#[from] PcapngError),
}

/// An IPv4 network, for `--from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        u32::from(ip) & mask == u32::from(self.network) & mask
    }
}

/// `--from`: `10.0.0.0/8`, or an address alone (/32).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let err = || {
        format!("--from {text:?}: give a sender's IPv4 address or network, such as 192.0.2.1 or 10.0.0.0/8")
    };
    if text.contains(':') {
        return Err(format!(
            "--from {text:?}: vmsniff collect receives GRE over IPv4 only; give IPv4 senders"
        ));
    }
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(err)?),
        None => (text, 32),
    };
    Ok(Cidr { network: ip.parse().map_err(|_| err())?, prefix })
}

pub struct Options {
    pub from: Vec<Cidr>,
    pub destination: Destination,
    pub rotate: Option<Rotate>,
    pub count: Option<u64>,
    pub names: Names,
}

/// A raw socket receiving every GRE packet addressed to this host, with kernel timestamps and
/// the count of what its buffer dropped.
pub struct GreSocket {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
}

/// One received packet.
struct Received {
    timestamp: Duration,
    len: usize,
    drops: Option<u32>,
}

impl GreSocket {
    /// Must be called inside a tokio runtime.
    pub fn open() -> Result<GreSocket, CollectError> {
        // SAFETY: plain socket(2); the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_GRE,
            )
        };
        if raw < 0 {
            let error = io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => CollectError::NoPermission(error),
                _ => CollectError::Socket { op: "cannot open a raw IPv4 socket for GRE", source: error },
            });
        }
        // SAFETY: `raw` is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let option = |op: &'static str| move |e: nix::Error| CollectError::Socket { op, source: e.into() };
        setsockopt(&fd, sockopt::ReceiveTimestampns, &true)
            .map_err(option("cannot ask for receive timestamps"))?;
        setsockopt(&fd, sockopt::RxqOvfl, &1).map_err(option("cannot ask for the socket's drop count"))?;
        // Beyond the system's rmem_max needs CAP_NET_ADMIN: fall back to what is allowed.
        if setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER)
                .map_err(option("cannot size the receive buffer"))?;
        }
        // SAFETY: the AsyncFd owns the descriptor, which stays open for as long as it lives.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| CollectError::Socket { op: "cannot poll the socket", source: e.into_parts().1 })?;
        Ok(GreSocket { fd, buf: vec![0; 65536], cmsg: nix::cmsg_space!(nix::sys::time::TimeSpec, u32) })
    }

    fn try_recv(fd: &OwnedFd, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<Received> {
        let mut iov = [IoSliceMut::new(buf)];
        let message = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())?;
        let mut received = Received { timestamp: Duration::ZERO, len: message.bytes, drops: None };
        for c in message.cmsgs()? {
            match c {
                ControlMessageOwned::ScmTimestampns(ts) => {
                    received.timestamp = Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
                }
                ControlMessageOwned::RxqOvfl(drops) => received.drops = Some(drops),
                _ => {}
            }
        }
        if received.timestamp.is_zero() {
            received.timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        }
        Ok(received)
    }
}

/// Why the loop ended.
pub enum Ended {
    Signal(&'static str),
    Count,
    /// The reader of `-w -` went away.
    PipeClosed,
}

/// Receives until a signal, `--count`, or a closed pipe, counting into `stats` (which the
/// metrics endpoint reads between batches).
pub async fn run(options: &Options, stats: &SharedStats) -> Result<Ended, CollectError> {
    let signal = |kind| {
        signal(kind).map_err(|source| CollectError::Socket { op: "cannot install a signal handler", source })
    };
    let (mut interrupt, mut terminate, mut hangup, mut usr1) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
        signal(SignalKind::hangup())?,
        signal(SignalKind::user_defined1())?,
    );
    let GreSocket { fd, mut buf, mut cmsg } = GreSocket::open()?;
    let mut capture: Capture<InterfaceKey> = Capture::open(options.destination.clone(), options.rotate)?;
    match capture.current_path() {
        Some(path) => log::info!("collecting GRE and ERSPAN copies into {}", path.display()),
        None => log::info!("collecting GRE and ERSPAN copies to stdout"),
    }
    let live = io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    let label = |key: &InterfaceKey| options.names.interface_name(key);
    let ended = loop {
        tokio::select! {
            _ = interrupt.recv() => break Ended::Signal("interrupt"),
            _ = terminate.recv() => break Ended::Signal("SIGTERM"),
            _ = hangup.recv() => break Ended::Signal("SIGHUP"),
            _ = usr1.recv() => {
                if live {
                    eprint!("\r\x1b[2K");
                }
                eprint!("{}", render_summary(&lock(stats), label));
            }
            _ = ticker.tick() => {
                if let Err(e) = capture.flush().and_then(|()| capture.rotate_if_due()) {
                    break pipe_or_error(e)?;
                }
                if live {
                    eprint!("\r\x1b[2K{}", render_live(&lock(stats), label));
                    let _ = io::stderr().flush();
                }
            }
            ready = fd.readable() => {
                let mut guard = ready.map_err(|source| CollectError::Socket { op: "waiting for packets", source })?;
                let mut buffers = (&mut buf[..], &mut cmsg);
                // Held for one batch, no await inside: a scrape waits at most that long.
                let counted = receive_batch(&mut buffers, &mut guard, options, &mut lock(stats), &mut capture);
                match counted {
                    Ok(false) => {}
                    Ok(true) => break Ended::Count,
                    Err(CollectError::Capture(e)) => break pipe_or_error(e)?,
                    Err(e) => return Err(e),
                }
            }
        }
    };
    if live {
        eprintln!();
    }
    match capture.flush() {
        Ok(()) => {}
        Err(e) => {
            pipe_or_error(e)?;
        }
    }
    Ok(ended)
}

/// A closed pipe ends the capture as tcpdump's does; any other write error is fatal.
fn pipe_or_error(error: PcapngError) -> Result<Ended, CollectError> {
    match &error {
        PcapngError::Write { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => {
            Ok(Ended::PipeClosed)
        }
        _ => Err(error.into()),
    }
}

/// Reads up to [`BATCH`] packets; `Ok(true)` once `--count` copies are written.
fn receive_batch(
    (buf, cmsg): &mut (&mut [u8], &mut Vec<u8>),
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    for _ in 0..BATCH {
        let received = match guard.try_io(|fd| GreSocket::try_recv(fd.get_ref(), buf, cmsg)) {
            Ok(Ok(received)) => received,
            Ok(Err(source)) => {
                return Err(CollectError::Socket { op: "receiving from the GRE socket", source });
            }
            // Would block: everything is read; the guard is cleared for the next wakeup.
            Err(_would_block) => return Ok(false),
        };
        if let Some(drops) = received.drops {
            stats.socket_drops = u64::from(drops);
        }
        let packet = &buf[..received.len];
        if handle(packet, received.timestamp, options, stats, capture)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Decodes, counts and writes one packet; `Ok(true)` once `--count` copies are written.
fn handle(
    packet: &[u8],
    timestamp: Duration,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    let sender = match decode::ipv4_source(packet) {
        Ok(sender) => sender,
        Err(why) => {
            stats.undecodable(why);
            return Ok(false);
        }
    };
    if !options.from.is_empty() && !options.from.iter().any(|c| c.contains(sender)) {
        stats.ignored += 1;
        return Ok(false);
    }
    let copy: Copy = match decode::decode_ipv4(packet) {
        Ok(copy) => copy,
        Err(why) => {
            stats.undecodable(why);
            return Ok(false);
        }
    };
    let key = StreamKey { sender, kind: copy.kind, session: copy.session, direction: copy.direction };
    let names = &options.names;
    let interface = match names.fleet_interface(&key) {
        Some(interface) => {
            if !stats.fleet_copy(interface, key, copy.frame.len(), copy.sequence) {
                return Ok(false);
            }
            interface
        }
        None => {
            if !stats.copy(key, copy.frame.len(), copy.sequence) {
                return Ok(false);
            }
            key.interface()
        }
    };
    capture.write(
        &interface,
        || Interface {
            name: names.interface_name(&interface),
            description: names.interface_description(&interface),
        },
        &Packet {
            timestamp,
            frame: copy.frame,
            original_len: copy.original_len,
            flags: pcapng_direction_flags(copy.direction),
        },
    )?;
    stats.written += 1;
    Ok(options.count.is_some_and(|n| stats.written >= n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_filtered_by_network() {
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert!(net.contains(Ipv4Addr::new(10, 1, 200, 3)));
        assert!(!net.contains(Ipv4Addr::new(10, 2, 0, 1)));
        let host = parse_cidr("192.0.2.1").unwrap();
        assert!(host.contains(Ipv4Addr::new(192, 0, 2, 1)) && !host.contains(Ipv4Addr::new(192, 0, 2, 2)));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(Ipv4Addr::new(203, 0, 113, 9)));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "host", "fe80::1/64", "10.0.0.0/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(parse_cidr("fe80::1").unwrap_err().contains("IPv4 only"));
    }

    #[test]
    fn garbage_is_counted_and_copies_are_written_whole() {
        use crate::collect::decode::tests::{SENDER, gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-handle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcapng");
        let options = Options {
            from: vec![parse_cidr(&SENDER.to_string()).unwrap()],
            destination: Destination::File(path.clone()),
            rotate: None,
            count: Some(3),
            names: Names::default(),
        };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        let good = ipv4(47, &gre(false, Some(3), Some(1), crate::model::wire::PROTO_TEB, &frame));
        let mut stranger = good.clone();
        stranger[12..16].copy_from_slice(&[203, 0, 113, 5]);
        let mut x: u32 = 99;
        for i in 0..1000u32 {
            // A flood of garbage from a stranger, and from the listed sender.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut junk: Vec<u8> = (0..(x % 90) as usize).map(|j| (x >> (j % 24)) as u8).collect();
            assert!(!handle(&stranger, Duration::ZERO, &options, &mut stats, &mut capture).unwrap());
            if junk.len() > 16 {
                junk[0] = 0x45;
                junk[12..16].copy_from_slice(&SENDER.octets());
            }
            handle(&junk, Duration::ZERO, &options, &mut stats, &mut capture).unwrap();
            if i % 400 == 0 {
                handle(&good, Duration::ZERO, &options, &mut stats, &mut capture).unwrap();
            }
        }
        assert_eq!(stats.ignored, 1000);
        assert!(stats.undecodable_total() > 900, "{:?}", stats.undecodable);
        assert_eq!(stats.written, 3);
        let mut more = good.clone();
        more[20 + 11] = 4;
        assert!(
            handle(&more, Duration::ZERO, &options, &mut stats, &mut capture).unwrap(),
            "--count 3 reached"
        );
        capture.flush().unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let mut packets = 0;
        while let Some(block) = reader.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(epb) = block.unwrap() {
                assert_eq!(&epb.data[..], &frame[..]);
                packets += 1;
            }
        }
        assert_eq!(packets, 4);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
