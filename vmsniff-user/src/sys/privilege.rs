//! Checks, before anything is touched, that the process may do what vmsniff does.
use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "vmsniff needs {missing} to load eBPF programs, pin them and change interfaces; run it as \
         root (sudo vmsniff ...) or grant CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    Missing { missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status")]
    Unreadable(#[source] std::io::Error),
}

/// Fails unless the effective set holds CAP_NET_ADMIN (tc, links) and CAP_SYS_ADMIN (bpffs,
/// and BPF itself on kernels without CAP_BPF).
pub fn require_admin() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Unreadable)?;
    let effective = parse_cap_eff(&status).unwrap_or(0);
    let missing: Vec<&str> = [(CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(PrivilegeError::Missing { missing: missing.join(" and ") }) }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tvmsniff\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
