//! The receive loop: with CAP_NET_RAW, TPACKET_V3 rings for GRE over IPv4 and IPv6 and for
//! VXLAN (ring.rs; no tunnel device), read by their own threads (reader.rs), or raw sockets
//! where a ring cannot be had; without it, a UDP socket for VXLAN alone (no privilege at all
//! above port 1023). Here: the sockets, the capture's flushing and rotation, signals for the
//! summary and the end.
use std::{
    io::{self, IsTerminal as _, Write as _},
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::future::select_all;
use nix::sys::socket::{SockaddrIn6, bind, setsockopt, sockopt};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{
    copies::{Listener, Options, handle},
    fanout,
    pcapng::{Capture, FLUSH_INTERVAL, PcapngError},
    reader::{Finished, Readers, SharedCapture, lock_capture},
    ring::{self, Ring},
    sockets::{attach_program, socket},
    stats::{InterfaceKey, SharedStats, Stats, render_live, render_summary},
};

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
    #[error("a reading thread stopped: {0} (a bug in vmsniff collect: please report it)")]
    ReaderPanicked(String),
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

/// Where copies are read from.
struct Receivers {
    /// The rings (one per reading thread), when this process may have them; they read GRE and
    /// VXLAN alike.
    rings: Vec<Ring>,
    /// Sockets read one datagram at a time: VXLAN without CAP_NET_RAW, or everything where the
    /// ring could not be set up.
    sockets: Vec<Socket>,
    /// Sockets beside the ring that take nothing (a drop-all filter): they keep the host from
    /// answering copies with ICMP "unreachable", and hold the VXLAN port.
    _quiet: Vec<OwnedFd>,
}

impl Receivers {
    /// What `options` ask for. Must be called inside a tokio runtime.
    fn open(options: &Options) -> Result<Receivers, CollectError> {
        match fanout::open_rings(options.vxlan_port, options.ring_mib, options.threads) {
            Ok(rings) => {
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
                    attach_program(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &ring::drop_all_filter())
                        .map_err(|source| CollectError::Socket {
                            op: "cannot attach a filter to a socket beside the ring",
                            source,
                        })?;
                }
                Ok(Receivers { rings, sockets: Vec::new(), _quiet: quiet })
            }
            Err(e) if matches!(e.source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                let Some(port) = options.vxlan_port else {
                    return Err(CollectError::NoPermission(e.source));
                };
                log::warn!("no CAP_NET_RAW: receiving VXLAN only (GRE and ERSPAN need CAP_NET_RAW)");
                let sockets = vec![Socket::ready(udp_socket(port)?, Listener::Vxlan)?];
                Ok(Receivers { rings: Vec::new(), sockets, _quiet: Vec::new() })
            }
            Err(e) => {
                log::warn!("{}: {}; reading copies through sockets instead (slower)", e.op, e.source);
                if options.threads > 1 {
                    log::warn!("--threads {}: the sockets are read by one thread", options.threads);
                }
                Ok(Receivers { rings: Vec::new(), sockets: Socket::open_all(options)?, _quiet: Vec::new() })
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
/// metrics endpoint reads between blocks).
pub async fn run(options: &Arc<Options>, stats: &SharedStats) -> Result<Ended, CollectError> {
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
    let capture: SharedCapture =
        Arc::new(Mutex::new(Capture::open(options.destination.clone(), options.rotate)?));
    let gre = !receivers.rings.is_empty() || sockets.iter().any(|s| s.listener != Listener::Vxlan);
    let what = match (gre, options.vxlan_port) {
        (true, Some(port)) => format!("GRE and ERSPAN copies, and VXLAN on UDP port {port},"),
        (false, Some(port)) => format!("VXLAN copies on UDP port {port}"),
        (_, None) => "GRE and ERSPAN copies".to_owned(),
    };
    let threads = match receivers.rings.len() {
        0 | 1 => String::new(),
        n => format!(" ({n} reading threads, each sender's copies on one)"),
    };
    let (finished_tx, mut finished) = mpsc::unbounded_channel();
    let readers = Readers::start(receivers.rings, options, stats, &capture, &finished_tx)
        .map_err(|source| CollectError::Socket { op: "cannot start a reading thread", source })?;
    // Only the threads hold senders: once all are gone, nothing more comes.
    drop(finished_tx);
    // Said once the threads run (the rings hold copies from their binding on).
    match lock_capture(&capture).current_path() {
        Some(path) => log::info!("collecting {what} into {}{threads}", path.display()),
        None => log::info!("collecting {what} to stdout{threads}"),
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
                eprint!("{}", render_summary(&stats.snapshot(), label));
            }
            _ = ticker.tick() => {
                let mut capture = lock_capture(&capture);
                if let Err(e) = capture.flush().and_then(|()| capture.rotate_if_due()) {
                    break pipe_or_error(e)?;
                }
                drop(capture);
                if live {
                    eprint!("\r\x1b[2K{}", render_live(&stats.snapshot(), label));
                    let _ = io::stderr().flush();
                }
            }
            Some(reader) = finished.recv() => match reader {
                Finished::Count => break Ended::Count,
                Finished::Capture(e) => break pipe_or_error(e)?,
                Finished::Poll(source) => {
                    return Err(CollectError::Socket { op: "waiting for the receive ring", source });
                }
                Finished::Panicked(why) => return Err(CollectError::ReaderPanicked(why)),
            },
            (ready, index) = sockets_readable(sockets) => {
                let mut guard = ready.map_err(|source| CollectError::Socket { op: "waiting for packets", source })?;
                let listener = sockets[index].listener;
                // Held for one batch, no await inside: a scrape waits at most that long.
                let counted = receive_batch(
                    &mut batch,
                    listener,
                    &mut guard,
                    options,
                    &mut stats.main(),
                    &mut lock_capture(&capture),
                );
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
    if let (Ended::Count, Some(count)) = (&ended, options.count) {
        // Nothing more is admitted: the capture is whole but for copies other threads are
        // still appending, which the flush after they stop writes.
        if let Err(e) = lock_capture(&capture).flush() {
            pipe_or_error(e)?;
        }
        log::info!("--count {count} reached: stopping");
    }
    if matches!(ended, Ended::Signal(_)) {
        // Copies that came before the signal may still be in a block the kernel has not handed
        // over: the threads read it before they stop.
        tokio::time::sleep(ring::LAST_BLOCK_WAIT).await;
    }
    // The threads count their rings' drops and write nothing more once they have stopped.
    readers.stop().await;
    match lock_capture(&capture).flush() {
        Ok(()) => {}
        Err(e) => {
            pipe_or_error(e)?;
        }
    }
    Ok(ended)
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
