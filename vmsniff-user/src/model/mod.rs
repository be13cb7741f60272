//! The vocabulary every layer shares: directions, taps, targets, attach modes, MACs, the wire
//! formats and the observed eBPF state. Imports nothing else of the crate, so any layer may use
//! it.
pub mod cancel;
pub mod error;
pub mod listen;
pub mod mac;
pub mod mirror;
pub mod observed;
pub mod sources;
pub mod wire;
