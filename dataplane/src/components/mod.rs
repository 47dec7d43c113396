//! The components: each folder builds its part of a snapshot from the configuration, and imports only the
//! kernel. What one needs of another goes through the kernel's ports.

pub mod auth;
pub mod cache;
pub mod events;
pub mod outbox;
pub mod proxy;
