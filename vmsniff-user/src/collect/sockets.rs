//! The socket system calls the ring, its fanout group and the datagram sockets share, each
//! returning the OS error as it is.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
};

/// A fresh non-blocking socket, or the OS error.
pub fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Attaches a classic BPF program with `option` (SO_ATTACH_FILTER, PACKET_FANOUT_DATA).
pub fn attach_program(
    fd: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    program: &[libc::sock_filter],
) -> io::Result<()> {
    let len = u16::try_from(program.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // `fprog` points at `program`, alive for the call; the kernel copies it.
    let fprog = libc::sock_fprog { len, filter: program.as_ptr().cast_mut() };
    setsockopt_raw(fd, level, option, &fprog)
}

pub fn setsockopt_raw<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` is a live `T` of `len` bytes, which is what `option` reads.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, option, std::ptr::from_ref(value).cast(), len) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
