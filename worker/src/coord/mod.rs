//! The per-run coordinator: registration, wiring, the step barrier,
//! leases, recovery from lost workers, checkpoints, and an HTTP API with the
//! run's status and Prometheus metrics. See `docs/protocol.md`.

pub mod api;
pub mod client;
pub mod complaint_api;
pub mod history;
mod metrics;
mod page;
pub mod persist;
mod referee;
mod routes;
pub mod server;
pub mod setup;
pub mod state;

#[cfg(test)]
mod ledger_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use client::{Client, ClientError};
pub use server::{start, Config, Handle};
pub use state::{Coordinator, Layout, Persisted, Phase, Status};
