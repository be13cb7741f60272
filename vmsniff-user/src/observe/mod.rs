//! What is running now, read from the kernel, libvirt and OVSDB: sessions, their counters and
//! devices, the host's VM NICs and the path their frames take.
pub mod inventory;
pub mod path;
pub mod route;
pub mod status;
pub mod vm_names;
