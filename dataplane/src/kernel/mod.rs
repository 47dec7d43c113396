//! The kernel: what every component shares and nothing else. It imports no component, and components
//! import only the kernel (and `umw-crds`): the request context, the stage contract and its phases, the
//! endpoint trait, the component contract with its ports, tasks, pooled HTTP clients, health, problems,
//! metrics, traces and the loaded configuration.

pub mod body;
pub mod breaker;
pub mod component;
pub mod config;
pub mod context;
pub mod endpoint;
pub mod health;
pub mod inbound;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod pool;
pub mod ports;
pub mod problem;
pub mod routing;
pub mod secret;
pub mod stage;
pub mod task;
pub mod telemetry;
pub mod trace;
pub mod validate;
pub mod x509;
