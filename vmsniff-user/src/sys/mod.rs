//! Handles on the kernel that reading and changing share: the netlink socket, this process's
//! network namespace and privileges, bpffs and the pin paths, vmsniff's pinned maps, and the
//! error every kernel operation returns.
pub mod blocking;
pub mod bpffs;
pub mod error;
pub mod files;
pub mod kill_point;
pub mod lock;
pub mod maps;
pub mod netlink;
pub mod netns;
pub mod paths;
pub mod privilege;

pub use error::KernelError;
