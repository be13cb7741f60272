//! Configuration (e): what a tcpdump-based relay costs. A thread in the hypervisor's namespace
//! reads every frame of the tap, both directions, from an AF_PACKET socket and `send`s each
//! into the tunnel device through a second one: the work of `tcpdump -i tap -w - | <replay into
//! a tunnel>` without the pipe and the pcap framing, so a lower bound on such relays' cost.
use std::{
    fs::File,
    mem,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};
use vmsniff_tests::netns::Netns;

/// tcpdump's default capture buffer (`-B`): 2 MiB.
const RECEIVE_BUFFER: libc::c_int = 2 << 20;

pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    /// The relay thread's id, to read its CPU time in /proc.
    tid: i32,
}

impl Relay {
    /// Starts relaying `from`'s frames into `to`, both in `ns`.
    pub fn start(ns: &Netns, from: &str, to: &str) -> anyhow::Result<Relay> {
        let netns = File::open(ns.path()).context("opening the hypervisor's namespace")?;
        let (from_index, to_index) = (ns.ifindex(from) as i32, ns.ifindex(to) as i32);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let sockets = setns(&netns, CloneFlags::CLONE_NEWNET)
                .context("entering the hypervisor's namespace")
                .and_then(|()| Ok((open(from_index)?, open(to_index)?)));
            match sockets {
                Ok((rx, tx)) => {
                    let _ = ready_tx.send(Ok(nix::unistd::gettid().as_raw()));
                    relay(&rx, &tx, &stopped)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    Err(e)
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(Relay { stop, thread: Some(thread), tid }),
            Ok(Err(e)) => bail!("starting the AF_PACKET relay: {e}"),
            Err(_) => bail!("the AF_PACKET relay's thread died while starting"),
        }
    }

    /// The relay's user-space CPU time so far, in ns (its kernel time is in the system's
    /// counters with everything else the frames cost).
    pub fn user_ns(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/self/task/{}/stat", self.tid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the command name, which is in parentheses and may hold blanks: utime is
        // the 14th field of the line, the 12th after ")".
        let ticks: u64 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(11))
            .and_then(|t| t.parse().ok())
            .with_context(|| format!("no utime in {path}: {stat}"))?;
        Ok(ticks * 1_000_000_000 / super::traffic::clock_ticks())
    }

    /// Stops the relay.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("the relay was already stopped")?;
        thread.join().map_err(|_| anyhow::anyhow!("the relay thread panicked"))?
    }
}

impl Drop for Relay {
    /// A benchmark that fails half-way still stops its relay (its sockets close with it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One frame at a time, as libpcap's callback loop hands them to tcpdump.
fn relay(rx: &OwnedFd, tx: &OwnedFd, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            // The receive timeout: look at the stop flag again.
            if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                continue;
            }
            return Err(err).context("recv on the tap's AF_PACKET socket");
        }
        // SAFETY: buf holds n initialised bytes. A frame the tunnel cannot take (ENOBUFS under
        // load) is lost as it would be by a real relay: the collector's count shows it.
        unsafe { libc::send(tx.as_raw_fd(), buf.as_ptr().cast(), n as usize, 0) };
    }
    Ok(())
}

/// An AF_PACKET socket bound to `ifindex`, every protocol, both directions.
fn open(ifindex: i32) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let raw =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below bind it.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), mem::size_of::<libc::sockaddr_ll>() as u32)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
    }
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RECEIVE_BUFFER)?;
    let timeout = libc::timeval { tv_sec: 0, tv_usec: Duration::from_millis(100).as_micros() as _ };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> anyhow::Result<()> {
    // SAFETY: value points to a T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt({level}, {name})"));
    }
    Ok(())
}
