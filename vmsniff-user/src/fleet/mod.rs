//! The fleet: mirrors declared once in etcd and kept by every compute node's daemon, following
//! their VM when it migrates. A front end like `cli` and `daemon`: it builds [`MirrorSpec`]s
//! with the same parser and hands them to the daemon, which runs them through the service.
//!
//! [`MirrorSpec`]: crate::service::MirrorSpec
pub mod etcd;
pub mod names;
pub mod node;
pub mod store;
pub mod view;
