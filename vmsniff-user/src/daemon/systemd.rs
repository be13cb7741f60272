//! The two things the daemon asks of systemd, without linking libsystemd: tell it when the
//! mirrors are in place (Type=notify), and tell a restart from a stop.
use std::{
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
    process::Command,
};

/// Sends `state` (`READY=1`, `RELOADING=1`, `STOPPING=1`) to systemd when it asked for it
/// through NOTIFY_SOCKET; nothing otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => socket
                .send_to_addr(state.as_bytes(), &std::os::unix::net::SocketAddr::from_abstract_name(name)?),
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = result {
        log::warn!("could not tell systemd {state}: {e}");
    }
}

/// True when systemd stops this service as part of a restart (`systemctl restart`,
/// `try-restart`, `reload-or-restart`): the mirrors stay for the next start to adopt, with no
/// gap. A stop, or no systemd, is false: the caller detaches what the daemon owns.
pub fn restart_queued() -> bool {
    let Some(unit) = own_unit() else { return false };
    // `list-jobs` shows the restart job while its stop half runs.
    match Command::new("systemctl").args(["list-jobs", "--no-legend", "--plain", &unit]).output() {
        Ok(out) if out.status.success() => restart_job(&String::from_utf8_lossy(&out.stdout), &unit),
        Ok(out) => {
            log::warn!(
                "could not ask systemd whether this is a restart ({}): treating it as a stop",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            log::warn!("could not run systemctl to tell a restart from a stop ({e}): treating it as a stop");
            false
        }
    }
}

/// The service unit this process runs in, from its cgroup (`0::/system.slice/vmsniff.service`).
fn own_unit() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|l| l.rsplit('/').find(|part| part.ends_with(".service")))
        .map(str::to_owned)
        .next()
}

/// Whether `systemctl list-jobs --plain` output holds a restart job of `unit`.
fn restart_job(jobs: &str, unit: &str) -> bool {
    jobs.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, u, kind, ..] if *u == unit && kind.contains("restart"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_comes_from_the_cgroup() {
        assert_eq!(unit_of_cgroup("0::/system.slice/vmsniff.service\n").as_deref(), Some("vmsniff.service"));
        assert_eq!(unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"), None);
    }

    #[test]
    fn restart_jobs_are_told_from_stops() {
        let unit = "vmsniff.service";
        assert!(restart_job("1234 vmsniff.service restart running\n", unit));
        assert!(restart_job("1234 vmsniff.service try-restart running\n", unit));
        assert!(!restart_job("1234 vmsniff.service stop running\n", unit));
        assert!(!restart_job("77 other.service restart waiting\n", unit));
        assert!(!restart_job("", unit));
    }
}
