//! `vmsniff daemon`: keeps the mirrors of a declarative config, re-attaching them when VMs
//! come and go.
pub mod config;
