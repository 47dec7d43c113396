//! Authentication for the routes an AuthPolicy targets: bearer tokens checked against the issuers' keys
//! (OIDC discovery or `jwksUri`), with the principal and its claims passed on to the stages after it.

pub mod component;
pub mod crypto;
pub mod jwks;
pub mod jwt;
pub mod stage;
