//! Carrying plans out in the kernel: bpffs, pinned maps, tc programs, GRE devices. One executor
//! applies a plan's steps and undoes them in reverse when one fails.
pub mod bpffs;
pub mod error;
pub mod executor;
#[cfg(test)]
mod fake;
pub mod gre;
pub mod kernel_ops;
pub mod maps;
pub mod ovs;
pub mod tc;

pub use error::KernelError;
