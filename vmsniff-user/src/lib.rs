//! vmsniff: mirror a VM's frames from the hypervisor to a remote collector.
//!
//! The layers, each importing only those before it (checked by `layers::tests`):
//! `model` → `sys`, `ovsdb`, `collect` → `resolve` → `plan` → `apply`, `observe` → `ovs` →
//! `service` → the front ends `daemon`, `metrics` and `cli`. ARCHITECTURE.md draws them.
mod apply;
pub mod cli;
mod collect;
mod daemon;
mod fleet;
mod layers;
mod metrics;
mod model;
mod observe;
mod ovs;
mod ovsdb;
mod plan;
mod resolve;
mod service;
mod sys;

pub use model::error::chain;
