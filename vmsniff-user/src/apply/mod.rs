//! Carrying plans out in the kernel: tc programs, GRE devices, the maps they use. One executor
//! applies a plan's steps and undoes them in reverse when one fails; the kernel operations it
//! uses are behind `kernel_ops`, so its undo paths are unit-tested against a fake.
pub mod cleanup;
#[cfg(test)]
mod crash_tests;
pub mod executor;
#[cfg(test)]
mod fake;
pub mod gre;
pub mod kernel_ops;
pub mod tc;
