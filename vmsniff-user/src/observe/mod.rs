//! What is running now, read from the kernel: sessions, their counters, their devices.
pub mod status;
