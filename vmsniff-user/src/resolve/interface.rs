//! `--tap NAME` and `--to-dev NAME`: any Ethernet interface of the caller's network namespace,
//! checked through netlink. Names never reach a shell; they are validated before use.
use thiserror::Error;

use crate::sys::netlink::{Link, Netlink};

#[derive(Debug, Error)]
pub enum InterfaceError {
    #[error(
        "{name:?} is not a valid interface name: {why} (Linux interface names are 1 to 15 \
         characters, without '/', ':', whitespace or control characters)"
    )]
    InvalidName { name: String, why: &'static str },
    #[error(
        "interface {name:?} does not exist in this network namespace; check the name with \
         `ip link show` (a VM's tap exists only while the VM runs)"
    )]
    NotFound { name: String },
    #[error("{role} {name:?} is not an Ethernet interface (it is {kind}); vmsniff mirrors Ethernet frames")]
    NotEthernet { role: &'static str, name: String, kind: String },
    #[error("reading interface {name:?} through netlink failed")]
    Netlink {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Checks a name the way the kernel's `dev_valid_name` does.
pub fn validate_name(name: &str) -> Result<(), InterfaceError> {
    let invalid = |why| Err(InterfaceError::InvalidName { name: name.to_owned(), why });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 15 {
        return invalid("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return invalid("it is a path component");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        return invalid("it contains '/', ':', whitespace or a control character");
    }
    Ok(())
}

/// Looks up an existing Ethernet interface by name. `role` names it in errors ("tap", "--to-dev").
pub async fn ethernet_interface(
    netlink: &Netlink,
    role: &'static str,
    name: &str,
) -> Result<Link, InterfaceError> {
    validate_name(name)?;
    let link = netlink
        .link_by_name(name)
        .await
        .map_err(|source| InterfaceError::Netlink { name: name.to_owned(), source })?
        .ok_or_else(|| InterfaceError::NotFound { name: name.to_owned() })?;
    if !link.ethernet {
        return Err(InterfaceError::NotEthernet {
            role,
            name: name.to_owned(),
            kind: link.kind.clone().unwrap_or_else(|| "not Ethernet".into()),
        });
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_the_kernel_accepts() {
        for ok in ["tapf7eae624-34", "qvof7eae624-34", "eth0", "a", "veth.100", "x".repeat(15).as_str()] {
            validate_name(ok).unwrap();
        }
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        for bad in ["", ".", "..", "a/b", "tap:1", "tap 1", "tap\n", &"x".repeat(16), "$(reboot)\t"] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
