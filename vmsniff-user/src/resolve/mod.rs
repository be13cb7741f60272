//! From what the operator typed to the kernel objects it names.
pub mod interface;
