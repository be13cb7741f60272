//! `vmsniff collect`: decoding (pure), counting, naming, the pcapng writer and the receive loop.
pub mod copies;
pub mod decode;
pub mod fanout;
pub mod names;
pub mod pcapng;
pub mod reader;
pub mod reassembly;
pub mod receive;
pub mod ring;
pub mod sockets;
pub mod stats;
