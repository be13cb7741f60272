//! From what the operator typed to the kernel objects it names: libvirt's domains, Open
//! vSwitch's ports, and the interfaces of this network namespace.
pub mod domain;
pub mod interface;
pub mod libvirt;
pub mod select;
pub mod vm;
