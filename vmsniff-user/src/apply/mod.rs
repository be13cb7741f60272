//! Carrying plans out in the kernel: tc programs, GRE devices, the maps they use. One executor
//! applies a plan's steps and undoes them in reverse when one fails.
pub mod executor;
pub mod gre;
pub mod tc;
