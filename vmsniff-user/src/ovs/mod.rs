//! OVS mode, whole: an Open vSwitch Mirror on the VM's port with a GRE output port. The VM's
//! port in OVSDB, vmsniff's rows there, the pure plans, the transactions that apply them, their
//! status and the OVSDB monitor that wakes the daemon. The bare protocol client is `ovsdb`.
pub mod apply;
pub mod events;
pub mod plan;
pub mod port;
pub mod session;
pub mod status;
