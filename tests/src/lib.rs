#![forbid(unsafe_code)]
//! Data-plane integration tests against real Redis, Kafka and PostgreSQL live in `tests/tests/`; they
//! arrive with the data-plane components that need those servers.
