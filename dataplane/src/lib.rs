#![forbid(unsafe_code)]
//! `umw-dataplane`: the Universal Middleware data plane.
//!
//! One binary that serves the routes of one Middleware: configuration from the same manifests a user
//! applies to a cluster ([`config`]), hot reload ([`reload`]), the HTTP listener ([`server`]) and its
//! middleware chain ([`chain`]) ending in the proxy ([`proxy`]), the admin endpoints ([`admin`]), and
//! telemetry ([`telemetry`], [`trace`], [`metrics`]). [`runtime`] builds every component from a
//! configuration snapshot and swaps snapshots atomically.

pub mod admin;
pub mod app;
pub mod chain;
pub mod components;
pub mod kernel;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod tls;

pub use components::{cache, events, outbox, proxy};
pub use kernel::{breaker, config, health, inbound, metrics, problem, routing, telemetry, trace};
