//! The service layer: the operations every front end (the command line, the daemon, later the
//! fleet and metrics) is made of, for eBPF mode and OVS mode. Each takes typed specs and
//! returns typed results; below it are resolve → plan → apply → observe.
pub mod namespace;
pub mod ovs;
