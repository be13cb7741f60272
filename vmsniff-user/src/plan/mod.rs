//! What to create or remove, decided without touching the kernel: (request, observed state) →
//! steps. Pure and unit-tested; `apply` carries the steps out and undoes them on failure.
pub mod attach;
pub mod controls;
pub mod detach;
pub mod filter;
pub mod rehome;
pub mod request;
pub mod update;
