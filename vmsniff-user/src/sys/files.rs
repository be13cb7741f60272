//! Files vmsniff creates as root where other users may write (captures in /tmp, state in a
//! run directory someone chose): never through a symlink, never onto a FIFO or a device, and
//! readable by root only unless the caller says otherwise. Captures hold tenants' frames.
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Creates or truncates `path` for writing, with `mode` when it is new. Refuses a symlink
/// (`O_NOFOLLOW`) and anything but a regular file; opening never blocks on a FIFO.
pub fn create_safely(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other(format!(
                "{} is a symbolic link: vmsniff does not write through links; give the real path",
                path.display()
            )),
            // What a FIFO without a reader answers a non-blocking open for writing.
            Some(libc::ENXIO) => io::Error::other(format!(
                "{} is a FIFO: give the path of a regular file (or `-` for stdout)",
                path.display()
            )),
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(io::Error::other(format!(
            "{} is {what}: give the path of a regular file",
            path.display()
        )));
    }
    // Blocking writes from here on; truncating only now that it is known to be a file.
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
        .map_err(io::Error::from)?;
    file.set_len(0)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_devices_are_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("vmsniff-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("precious");
        std::fs::write(&target, "keep me").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = create_safely(&link, 0o600).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = create_safely(&fifo, 0o600).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        assert!(create_safely(Path::new("/dev/null"), 0o600).unwrap_err().to_string().contains("device"));
        // A regular file is truncated; a new one gets the mode asked for.
        let mut file = create_safely(&target, 0o600).unwrap();
        std::io::Write::write_all(&mut file, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let fresh = dir.join("fresh");
        create_safely(&fresh, 0o600).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
