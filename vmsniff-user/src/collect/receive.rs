//! The receive loop: with CAP_NET_RAW, a TPACKET_V3 ring for GRE over IPv4 and IPv6 and for
//! VXLAN (ring.rs; no tunnel device), raw sockets where the ring cannot be had; without it, a
//! UDP socket for VXLAN alone (no privilege at all above port 1023); decode, count, write;
//! signals for the summary and the end.
use std::{
    io::{self, IsTerminal as _, Write as _},
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, SystemTime},
};

use futures::future::select_all;
use nix::sys::socket::{SockaddrIn6, bind, setsockopt, sockopt};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use super::{
    decode::{self, Copy, Kind},
    names::Names,
    pcapng::{Capture, Destination, FLUSH_INTERVAL, Interface, Packet, PcapngError, Rotate},
    reassembly::{self, Offered, Reassembly},
    ring::{self, Classified, LocalAddresses, Repeats, Ring},
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
        "cannot open a packet socket for GRE: vmsniff collect needs CAP_NET_RAW for GRE and ERSPAN \
         (run it as root, or grant it with `setcap cap_net_raw+ep $(command -v vmsniff)`); VXLAN \
         alone (--vxlan-port) needs no privilege"
    )]
    NoPermission(#[source] io::Error),
    #[error(
        "UDP port {port} is taken on this host (a VXLAN device, another collector: `ss -ulpn sport = :{port}`); \
         stop it, or have the hypervisors send to another port (attach --port) and give that here"
    )]
    PortInUse { port: u16 },
    #[error("{op}")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Capture(#[from] PcapngError),
}

/// An IPv4 or IPv6 network, for `--from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

/// `--from`: `10.0.0.0/8`, `2001:db8::/32`, or an address alone (/32, /128).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let err = || {
        format!(
            "--from {text:?}: give a sender's address or network, such as 192.0.2.1, 10.0.0.0/8 or \
             2001:db8::/32"
        )
    };
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix.parse::<u8>().map_err(|_| err())?)),
        None => (text, None),
    };
    let network: IpAddr = ip.parse().map_err(|_| err())?;
    let bits = if network.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(bits);
    if prefix > bits {
        return Err(err());
    }
    Ok(Cidr { network, prefix })
}

pub struct Options {
    pub from: Vec<Cidr>,
    /// VXLAN's UDP port, when VXLAN is received too.
    pub vxlan_port: Option<u16>,
    pub destination: Destination,
    pub rotate: Option<Rotate>,
    pub count: Option<u64>,
    pub names: Names,
    /// `--plain-gre`: record GRE without vmsniff's sequence numbers whatever its key.
    pub plain_gre: bool,
    /// `--buffer-size`: the receive ring's size in MiB.
    pub ring_mib: usize,
}

/// What one socket receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// Raw IPv4, protocol GRE: whole IPv4 packets.
    GreV4,
    /// Raw IPv6, protocol GRE: the GRE header onward; the sender in the address.
    GreV6,
    /// UDP on the VXLAN port, both families: the VXLAN header onward.
    Vxlan,
}

/// A socket receiving copies addressed to this host, with kernel timestamps and the count of
/// what its buffer dropped.
struct Socket {
    fd: AsyncFd<OwnedFd>,
    listener: Listener,
}

/// One received packet.
struct Received {
    timestamp: Duration,
    drops: Option<u32>,
    /// The sender's address, for sockets whose packets do not start with an IPv4 header.
    from: Option<IpAddr>,
}

/// A fresh non-blocking socket, or the OS error.
pub(super) fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Where copies are read from.
struct Receivers {
    /// The ring, when this process may have one; it reads GRE and VXLAN alike.
    ring: Option<AsyncFd<Ring>>,
    /// Sockets read one datagram at a time: VXLAN without CAP_NET_RAW, or everything where the
    /// ring could not be set up.
    sockets: Vec<Socket>,
    /// Sockets beside the ring that take nothing (a drop-all filter): they keep the host from
    /// answering copies with ICMP "unreachable", and hold the VXLAN port.
    _quiet: Vec<OwnedFd>,
}

/// Index of the ring in `Stats::socket_drops` (the sockets use their [`Listener`]'s).
const RING_DROPS: usize = 16;

impl Receivers {
    /// What `options` ask for. Must be called inside a tokio runtime.
    fn open(options: &Options) -> Result<Receivers, CollectError> {
        match Ring::open(options.vxlan_port, options.ring_mib) {
            Ok(ring) => {
                let mut quiet = Vec::new();
                for (domain, name) in [(libc::AF_INET, "IPv4"), (libc::AF_INET6, "IPv6")] {
                    match socket(domain, libc::SOCK_RAW, libc::IPPROTO_GRE) {
                        Ok(fd) => quiet.push(fd),
                        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
                        Err(source) => {
                            log::warn!("cannot open a raw {name} GRE socket beside the ring: {source}");
                            continue;
                        }
                    }
                }
                if let Some(port) = options.vxlan_port {
                    quiet.push(udp_socket(port)?);
                }
                for fd in &quiet {
                    ring::attach_program(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ATTACH_FILTER,
                        &ring::drop_all_filter(),
                    )
                    .map_err(|source| CollectError::Socket {
                        op: "cannot attach a filter to a socket beside the ring",
                        source,
                    })?;
                }
                // SAFETY: the AsyncFd owns the ring and its descriptor, open for as long as it lives.
                let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                    .map_err(|e| CollectError::Socket {
                        op: "cannot poll the receive ring",
                        source: e.into_parts().1,
                    })?;
                Ok(Receivers { ring: Some(ring), sockets: Vec::new(), _quiet: quiet })
            }
            Err(e) if matches!(e.source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                let Some(port) = options.vxlan_port else {
                    return Err(CollectError::NoPermission(e.source));
                };
                log::warn!("no CAP_NET_RAW: receiving VXLAN only (GRE and ERSPAN need CAP_NET_RAW)");
                let sockets = vec![Socket::ready(udp_socket(port)?, Listener::Vxlan)?];
                Ok(Receivers { ring: None, sockets, _quiet: Vec::new() })
            }
            Err(e) => {
                log::warn!("{}: {}; reading copies through sockets instead (slower)", e.op, e.source);
                Ok(Receivers { ring: None, sockets: Socket::open_all(options)?, _quiet: Vec::new() })
            }
        }
    }

    /// Copies the ring dropped since the last call, into `stats`.
    fn count_drops(&self, stats: &SharedStats) {
        if let Some(ring) = &self.ring {
            match ring.get_ref().take_drops() {
                Ok(0) => {}
                Ok(n) => *lock(stats).socket_drops.entry(RING_DROPS).or_default() += n,
                Err(e) => log::warn!("cannot read the receive ring's drop count: {e}"),
            }
        }
    }
}

impl Socket {
    /// The sockets `options` ask for, where the ring cannot be had. Must be called inside a
    /// tokio runtime.
    fn open_all(options: &Options) -> Result<Vec<Socket>, CollectError> {
        let mut sockets = Vec::new();
        match socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_GRE) {
            Ok(fd) => sockets.push(Socket::ready(fd, Listener::GreV4)?),
            Err(source) => {
                return Err(CollectError::Socket { op: "cannot open a raw IPv4 socket for GRE", source });
            }
        }
        match socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_GRE) {
            Ok(fd) => sockets.push(Socket::ready(fd, Listener::GreV6)?),
            // A host without IPv6 receives GRE over IPv4 only.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                log::warn!("this host has no IPv6: receiving GRE over IPv4 only");
            }
            Err(source) => {
                return Err(CollectError::Socket { op: "cannot open a raw IPv6 socket for GRE", source });
            }
        }
        if let Some(port) = options.vxlan_port {
            sockets.push(Socket::ready(udp_socket(port)?, Listener::Vxlan)?);
        }
        Ok(sockets)
    }

    fn ready(fd: OwnedFd, listener: Listener) -> Result<Socket, CollectError> {
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
        Ok(Socket { fd, listener })
    }
}

/// Room for one message's control data: a nanosecond timestamp and the drop count.
const CMSG_ROOM: usize = 64;
/// The largest datagram: an IPv4 or IPv6 packet of any size.
const DATAGRAM: usize = 65536;
/// Datagrams one recvmmsg(2) call takes at most: one syscall for many copies under a flood.
const MMSG: usize = 64;

/// Buffers for one recvmmsg(2) call: a datagram, its control data and its sender per slot.
struct Batch {
    data: Vec<u8>,
    control: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    /// Slots filled by the last call.
    filled: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            data: vec![0; MMSG * DATAGRAM],
            control: vec![0; MMSG * CMSG_ROOM],
            // SAFETY: all-zero bytes are a valid sockaddr_storage (family AF_UNSPEC).
            names: (0..MMSG).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovecs: (0..MMSG).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            // SAFETY: all-zero bytes are a valid mmsghdr (null pointers, zero lengths); every
            // pointer is set before the kernel reads them.
            headers: (0..MMSG).map(|_| unsafe { std::mem::zeroed() }).collect(),
            filled: 0,
        }
    }

    /// Receives up to [`MMSG`] datagrams in one call without waiting.
    fn receive(&mut self, fd: &OwnedFd) -> io::Result<usize> {
        for i in 0..MMSG {
            self.iovecs[i] =
                libc::iovec { iov_base: self.data[i * DATAGRAM..].as_mut_ptr().cast(), iov_len: DATAGRAM };
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = (&raw mut self.names[i]).cast();
            header.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = &raw mut self.iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = self.control[i * CMSG_ROOM..].as_mut_ptr().cast();
            header.msg_controllen = CMSG_ROOM;
            header.msg_flags = 0;
            self.headers[i].msg_len = 0;
        }
        // SAFETY: every header points into this batch's buffers, which outlive the call, with
        // their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.headers.as_mut_ptr(),
                MMSG as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.filled = 0;
            return Err(io::Error::last_os_error());
        }
        self.filled = n as usize;
        Ok(self.filled)
    }

    /// Slot `i` of the last call: its bytes and what came with them.
    fn get(&self, i: usize) -> (&[u8], Received) {
        let header = &self.headers[i];
        let len = (header.msg_len as usize).min(DATAGRAM);
        let mut received = Received { timestamp: Duration::ZERO, drops: None, from: None };
        let name = &self.names[i];
        received.from = match i32::from(name.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let v4 = unsafe { &*(&raw const *name).cast::<libc::sockaddr_in>() };
                Some(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let v6 = unsafe { &*(&raw const *name).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
                Some(ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4))
            }
            _ => None,
        };
        let msg = &header.msg_hdr;
        // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG_* walk stays
        // inside it and each payload is read unaligned at its announced type.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                        let ts = std::ptr::read_unaligned(data.cast::<libc::timespec>());
                        received.timestamp = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                    }
                    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                        received.drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(msg, c);
            }
        }
        if received.timestamp.is_zero() {
            received.timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        }
        let start = i * DATAGRAM;
        (&self.data[start..start + len], received)
    }
}

/// A UDP socket on `port` of every address, IPv4 and IPv6 (one dual-stack socket; IPv4 alone on
/// a host without IPv6).
fn udp_socket(port: u16) -> Result<OwnedFd, CollectError> {
    let failed = |op: &'static str| move |source: io::Error| CollectError::Socket { op, source };
    let bound =
        |fd: OwnedFd, address: &dyn nix::sys::socket::SockaddrLike| match bind(fd.as_raw_fd(), address) {
            Ok(()) => Ok(fd),
            Err(nix::Error::EADDRINUSE) => Err(CollectError::PortInUse { port }),
            Err(e) => Err(CollectError::Socket { op: "cannot bind the VXLAN socket", source: e.into() }),
        };
    match socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP) {
        Ok(fd) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(|e| CollectError::Socket {
                op: "cannot receive IPv4 on the VXLAN socket",
                source: e.into(),
            })?;
            bound(fd, &SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)))
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(failed("cannot open a UDP socket for VXLAN"))?;
            bound(fd, &nix::sys::socket::SockaddrIn::new(0, 0, 0, 0, port))
        }
        Err(source) => Err(CollectError::Socket { op: "cannot open a UDP socket for VXLAN", source }),
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
    let receivers = Receivers::open(options)?;
    let sockets = &receivers.sockets;
    let mut batch = Batch::new();
    let mut local = LocalAddresses::new();
    let mut fragments = Reassembly::default();
    let mut repeats = Repeats::new();
    let mut capture: Capture<InterfaceKey> = Capture::open(options.destination.clone(), options.rotate)?;
    let gre = receivers.ring.is_some() || sockets.iter().any(|s| s.listener != Listener::Vxlan);
    let what = match (gre, options.vxlan_port) {
        (true, Some(port)) => format!("GRE and ERSPAN copies, and VXLAN on UDP port {port},"),
        (false, Some(port)) => format!("VXLAN copies on UDP port {port}"),
        (_, None) => "GRE and ERSPAN copies".to_owned(),
    };
    match capture.current_path() {
        Some(path) => log::info!("collecting {what} into {}", path.display()),
        None => log::info!("collecting {what} to stdout"),
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
                receivers.count_drops(stats);
                if let Err(e) = capture.flush().and_then(|()| capture.rotate_if_due()) {
                    break pipe_or_error(e)?;
                }
                if live {
                    eprint!("\r\x1b[2K{}", render_live(&lock(stats), label));
                    let _ = io::stderr().flush();
                }
            }
            ready = ring_readable(receivers.ring.as_ref()) => {
                let mut guard =
                    ready.map_err(|source| CollectError::Socket { op: "waiting for the receive ring", source })?;
                // Held for a few blocks, no await inside: a scrape waits at most that long.
                match receive_ring(&mut guard, &mut local, &mut fragments, &mut repeats, options, stats, &mut capture) {
                    Ok(false) => {}
                    Ok(true) => break Ended::Count,
                    Err(CollectError::Capture(e)) => break pipe_or_error(e)?,
                    Err(e) => return Err(e),
                }
            }
            (ready, index) = sockets_readable(sockets) => {
                let mut guard = ready.map_err(|source| CollectError::Socket { op: "waiting for packets", source })?;
                let listener = sockets[index].listener;
                // Held for one batch, no await inside: a scrape waits at most that long.
                let counted =
                    receive_batch(&mut batch, listener, &mut guard, options, &mut lock(stats), &mut capture);
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
    receivers.count_drops(stats);
    match capture.flush() {
        Ok(()) => {}
        Err(e) => {
            pipe_or_error(e)?;
        }
    }
    Ok(ended)
}

/// The ring's next wakeup; never, without a ring.
async fn ring_readable(
    ring: Option<&AsyncFd<Ring>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, Ring>> {
    match ring {
        Some(ring) => ring.readable().await,
        None => std::future::pending().await,
    }
}

/// The first socket with packets, and its index; never, without sockets.
async fn sockets_readable(
    sockets: &[Socket],
) -> (io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>>, usize) {
    if sockets.is_empty() {
        return std::future::pending().await;
    }
    let (ready, index, _) = select_all(sockets.iter().map(|s| Box::pin(s.fd.readable()))).await;
    (ready, index)
}

/// Blocks read from the ring per wakeup before signals and timers get their turn.
const RING_BLOCKS: usize = 8;

/// Reads the ring's ready blocks, up to [`RING_BLOCKS`]; `Ok(true)` once `--count` copies are
/// written. Readiness is cleared only once the ring is seen empty after clearing it, so a block
/// handed over meanwhile is never left waiting for the next one.
fn receive_ring(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Ring>,
    local: &mut LocalAddresses,
    fragments: &mut Reassembly,
    repeats: &mut Repeats,
    options: &Options,
    stats: &SharedStats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    let ring = guard.get_inner();
    for _ in 0..RING_BLOCKS {
        let mut stats = lock(stats);
        let mut outcome = Ok(false);
        let read = ring.read_block(|packet| {
            if repeats.repeat(&packet) {
                return true;
            }
            outcome = handle_ring_packet(
                packet.data,
                packet.timestamp,
                local,
                fragments,
                options,
                &mut stats,
                capture,
            );
            matches!(outcome, Ok(false))
        });
        let given_up = fragments.take_given_up();
        if given_up > 0 {
            *stats.undecodable.entry(decode::Undecodable::FragmentsIncomplete).or_default() += given_up;
        }
        if !matches!(outcome, Ok(false)) {
            return outcome;
        }
        if !read {
            guard.clear_ready();
            if !guard.get_inner().ready() {
                return Ok(false);
            }
        }
    }
    // More to read: readiness is kept, so the loop comes straight back.
    Ok(false)
}

/// Sorts, decodes, counts and writes one packet from the ring.
fn handle_ring_packet(
    packet: &[u8],
    timestamp: Duration,
    local: &mut LocalAddresses,
    fragments: &mut Reassembly,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    let whole;
    let classified = if packet.first().is_some_and(|b| b >> 4 == 4) {
        let mut ipv4 = match ring::ipv4_for_this_host(packet, local) {
            Ok(ipv4) => ipv4,
            Err(why) => {
                stats.undecodable(why);
                return Ok(false);
            }
        };
        if reassembly::is_fragment(ipv4) {
            match fragments.offer(ipv4, timestamp) {
                Offered::Complete(datagram) => {
                    whole = datagram;
                    ipv4 = &whole;
                }
                Offered::Pending => return Ok(false),
                Offered::Refused(why) => {
                    stats.undecodable(why);
                    return Ok(false);
                }
            }
        }
        ring::classify_ipv4(ipv4, options.vxlan_port)
    } else {
        ring::classify_ipv6(packet, options.vxlan_port, local)
    };
    match classified {
        Ok(Classified::GreV4(packet)) => {
            handle(Listener::GreV4, packet, None, timestamp, options, stats, capture)
        }
        Ok(Classified::GreV6 { sender, gre }) => {
            handle(Listener::GreV6, gre, Some(sender), timestamp, options, stats, capture)
        }
        Ok(Classified::Vxlan { sender, datagram }) => {
            handle(Listener::Vxlan, datagram, Some(sender), timestamp, options, stats, capture)
        }
        Err(why) => {
            stats.undecodable(why);
            Ok(false)
        }
    }
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

/// Reads up to [`BATCH`] packets, [`MMSG`] per syscall; `Ok(true)` once `--count` copies are
/// written.
fn receive_batch(
    batch: &mut Batch,
    listener: Listener,
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    for _ in 0..BATCH / MMSG {
        match guard.try_io(|fd| batch.receive(fd.get_ref())) {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Err(CollectError::Socket { op: "receiving from a collector socket", source });
            }
            // Would block: everything is read; the guard is cleared for the next wakeup.
            Err(_would_block) => return Ok(false),
        }
        for i in 0..batch.filled {
            let (packet, received) = batch.get(i);
            if let Some(drops) = received.drops {
                stats.socket_drops.insert(listener as usize, u64::from(drops));
            }
            if handle(listener, packet, received.from, received.timestamp, options, stats, capture)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Decodes, counts and writes one packet; `Ok(true)` once `--count` copies are written.
/// A raw IPv4 socket's packet names its sender in its header; the others' come with `from`.
fn handle(
    listener: Listener,
    packet: &[u8],
    from: Option<IpAddr>,
    timestamp: Duration,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, CollectError> {
    let sender = match (listener, from) {
        (Listener::GreV4, _) => match decode::ipv4_source(packet) {
            Ok(sender) => IpAddr::V4(sender),
            Err(why) => {
                stats.undecodable(why);
                return Ok(false);
            }
        },
        (_, Some(sender)) => sender,
        // Datagram sockets always name the sender: nothing to attribute the packet to otherwise.
        (_, None) => return Ok(false),
    };
    if !options.from.is_empty() && !options.from.iter().any(|c| c.contains(sender)) {
        stats.ignored += 1;
        return Ok(false);
    }
    let decoded = match listener {
        Listener::GreV4 => decode::decode_ipv4(packet),
        Listener::GreV6 => decode::decode_gre(sender, packet),
        Listener::Vxlan => decode::decode_vxlan(sender, packet),
    };
    let copy: Copy = match decoded {
        Ok(copy) => copy,
        Err(why) => {
            stats.undecodable(why);
            return Ok(false);
        }
    };
    let key = StreamKey { sender, kind: copy.kind, session: copy.session, direction: copy.direction };
    let names = &options.names;
    if copy.kind == Kind::PlainGre && !options.plain_gre && !names.knows_plain(&key.interface()) {
        stats.refused_plain += 1;
        return Ok(false);
    }
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

    /// Every option at its default, writing to `path`.
    fn writing_to(path: std::path::PathBuf) -> Options {
        Options {
            from: Vec::new(),
            vxlan_port: None,
            destination: Destination::File(path),
            rotate: None,
            count: None,
            names: Names::default(),
            plain_gre: false,
            ring_mib: ring::DEFAULT_RING_MIB,
        }
    }

    #[test]
    fn senders_are_filtered_by_network() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        let host = parse_cidr("192.0.2.1").unwrap();
        assert!(host.contains(ip("192.0.2.1")) && !host.contains(ip("192.0.2.2")));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(!parse_cidr("0.0.0.0/0").unwrap().contains(ip("2001:db8::1")), "families never mix");
        let net6 = parse_cidr("2001:db8:5::/48").unwrap();
        assert!(net6.contains(ip("2001:db8:5:1::9")) && !net6.contains(ip("2001:db8:6::9")));
        assert!(parse_cidr("fe80::1").unwrap().contains(ip("fe80::1")));
        assert!(parse_cidr("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(!parse_cidr("::/0").unwrap().contains(ip("192.0.2.1")));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "host", "2001:db8::/129", "10.0.0.0/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vxlan_and_ipv6_gre_take_the_sender_from_the_socket() {
        use crate::collect::decode::tests::{gre, ipv4_frame, vxlan};
        let dir = std::env::temp_dir().join(format!("vmsniff-handle6-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sender: IpAddr = "2001:db8::1".parse().unwrap();
        let options = Options {
            from: vec![parse_cidr("2001:db8::/64").unwrap()],
            vxlan_port: Some(4789),
            ..writing_to(dir.join("cap.pcapng"))
        };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        let mut handle = |listener, packet: &[u8], from: Option<IpAddr>| {
            handle(listener, packet, from, Duration::ZERO, &options, &mut stats, &mut capture).unwrap()
        };
        handle(Listener::Vxlan, &vxlan(15, &frame), Some(sender));
        handle(
            Listener::GreV6,
            &gre(false, Some(14), Some(0), crate::model::wire::PROTO_TEB, &frame),
            Some(sender),
        );
        handle(Listener::Vxlan, &vxlan(15, &frame), Some("2001:db9::1".parse().unwrap()));
        handle(Listener::Vxlan, &vxlan(15, &frame), None);
        assert_eq!((stats.written, stats.ignored), (2, 1));
        let kinds: Vec<_> =
            stats.streams.keys().map(|k| (k.kind, k.session, k.direction, k.sender)).collect();
        assert_eq!(
            kinds,
            [
                (decode::Kind::VmsniffGre, 7, Some(vmsniff_ebpf::Direction::Out), sender),
                (decode::Kind::Vxlan, 7, Some(vmsniff_ebpf::Direction::In), sender)
            ]
        );
        let summary = render_summary(&stats, |k| k.session.to_string());
        assert!(summary.contains("VXLAN carries no sequence numbers"), "{summary}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plain_gre_is_recorded_only_when_asked_for_or_named() {
        use crate::collect::decode::tests::{gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let frame = ipv4_frame(60, 46);
        // A GRE tenant network's packet: TEB, key 5, no sequence number.
        let tenant = ipv4(47, &gre(false, Some(5), None, crate::model::wire::PROTO_TEB, &frame));
        let ovs_session = ipv4(47, &gre(false, Some(4), None, crate::model::wire::PROTO_TEB, &frame));
        let mut names = Names::default();
        let (_fleet, receiver) = tokio::sync::watch::channel(std::collections::BTreeMap::from([(
            4,
            crate::model::wire::FleetLabel { name: "web (c-private nic 0)".to_owned(), plain_gre: true },
        )]));
        names.set_fleet(receiver);
        for (plain_gre, written) in [(false, 1), (true, 2)] {
            let options = Options {
                names: names.clone(),
                plain_gre,
                ..writing_to(dir.join(format!("{plain_gre}.pcapng")))
            };
            let mut stats = Stats::default();
            let mut capture = Capture::open(options.destination.clone(), None).unwrap();
            for packet in [&tenant, &ovs_session] {
                handle(Listener::GreV4, packet, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap();
            }
            assert_eq!(
                (stats.written, stats.refused_plain),
                (written, 2 - written),
                "--plain-gre {plain_gre}"
            );
            let summary = render_summary(&stats, |k| k.session.to_string());
            assert_eq!(summary.contains("--plain-gre records it) 1"), !plain_gre, "{summary}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_ovs_mode_fleet_mirrors_plain_gre_from_two_nodes_is_one_interface_with_one_move() {
        use crate::collect::decode::tests::{gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-fleet-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcapng");
        let mut names = Names::default();
        let (_fleet, receiver) = tokio::sync::watch::channel(std::collections::BTreeMap::from([(
            4,
            crate::model::wire::FleetLabel { name: "web (c-mig)".to_owned(), plain_gre: true },
        )]));
        names.set_fleet(receiver);
        let options = Options { names, ..writing_to(path.clone()) };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        // Node a's Open vSwitch sends two copies (key 4, no sequence), then node b's two.
        let from_a = ipv4(47, &gre(false, Some(4), None, crate::model::wire::PROTO_TEB, &frame));
        let mut from_b = from_a.clone();
        from_b[12..16].copy_from_slice(&[192, 0, 2, 77]);
        for packet in [&from_a, &from_a, &from_b, &from_b] {
            handle(Listener::GreV4, packet, None, Duration::ZERO, &options, &mut stats, &mut capture)
                .unwrap();
        }
        capture.flush().unwrap();
        assert_eq!((stats.written, stats.refused_plain), (4, 0));
        let moves: Vec<u64> = stats.moves.values().map(|m| m.moves).collect();
        assert_eq!(moves, [1], "one interface, one move: {:?}", stats.moves);
        let mut reader = pcap_file::pcapng::PcapNgReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let (mut interfaces, mut packets) = (Vec::new(), Vec::new());
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                    interfaces.push(format!("{:?}", idb.options))
                }
                pcap_file::pcapng::Block::EnhancedPacket(epb) => packets.push(epb.interface_id),
                _ => {}
            }
        }
        assert_eq!(interfaces.len(), 1, "{interfaces:?}");
        assert!(interfaces[0].contains("web (c-mig)"), "{interfaces:?}");
        assert_eq!(packets, [0, 0, 0, 0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_is_counted_and_copies_are_written_whole() {
        use crate::collect::decode::tests::{SENDER, gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-handle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcapng");
        let options = Options {
            from: vec![parse_cidr(&SENDER.to_string()).unwrap()],
            count: Some(3),
            ..writing_to(path.clone())
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
            assert!(
                !handle(Listener::GreV4, &stranger, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap()
            );
            if junk.len() > 16 {
                junk[0] = 0x45;
                junk[12..16].copy_from_slice(&SENDER.octets());
            }
            handle(Listener::GreV4, &junk, None, Duration::ZERO, &options, &mut stats, &mut capture).unwrap();
            if i % 400 == 0 {
                handle(Listener::GreV4, &good, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap();
            }
        }
        assert_eq!(stats.ignored, 1000);
        assert!(stats.undecodable_total() > 900, "{:?}", stats.undecodable);
        assert_eq!(stats.written, 3);
        let mut more = good.clone();
        more[20 + 11] = 4;
        assert!(
            handle(Listener::GreV4, &more, None, Duration::ZERO, &options, &mut stats, &mut capture).unwrap(),
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
