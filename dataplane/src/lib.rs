#![forbid(unsafe_code)]
//! `umw-dataplane`: the Universal Middleware data plane.
//!
//! One binary that serves the routes of one Middleware: configuration from the same manifests a user
//! applies to a cluster ([`config`]), hot reload ([`reload`]), the HTTP listener ([`server`]) and its
//! middleware chain ([`chain`]) ending in the proxy ([`proxy`]), the admin endpoints ([`admin`]), and
//! telemetry ([`telemetry`], [`trace`], [`metrics`]). [`runtime`] builds every component from a
//! configuration snapshot and swaps snapshots atomically.

pub mod admin;
pub mod breaker;
pub mod cache;
pub mod chain;
pub mod config;
pub mod events;
pub mod health;
pub mod inbound;
pub mod metrics;
pub mod outbox;
pub mod problem;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod trace;
