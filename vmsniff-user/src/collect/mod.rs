//! `vmsniff collect`: decoding (pure), counting, naming, the pcapng writer and the receive loop.
pub mod decode;
pub mod names;
pub mod pcapng;
pub mod reassembly;
pub mod receive;
pub mod ring;
pub mod stats;
