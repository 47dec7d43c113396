//! What the chain knows about a request, in its extensions, for every step and component after it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderName, HeaderValue};

use super::endpoint::Route;
use super::trace::TraceContext;

/// Request and response header carrying the request id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The peer address of the connection, set by the listener.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Who is calling, once an authentication stage has decided it. A cache must key on it or bypass: a
/// response for one principal is not another's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The subject (a JWT's `sub`, an API key's name).
    pub subject: String,
    /// How it was established (`jwt`, `session`, `api-key`).
    pub scheme: &'static str,
    /// The verified claims of its token (empty without one).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// The request's context.
#[derive(Clone)]
pub struct RequestInfo {
    pub id: HeaderValue,
    pub client: SocketAddr,
    pub trace: TraceContext,
    /// The route that takes the request; `None` when no route does.
    pub route: Option<Arc<Route>>,
    /// When the route's timeout expires.
    pub deadline: Option<Instant>,
    /// Set by an authentication stage.
    pub principal: Option<Arc<Principal>>,
}

impl RequestInfo {
    /// The context of a request in `request`'s extensions.
    pub fn of<B>(request: &http::Request<B>) -> Option<&RequestInfo> {
        request.extensions().get::<RequestInfo>()
    }

    pub fn of_mut<B>(request: &mut http::Request<B>) -> Option<&mut RequestInfo> {
        request.extensions_mut().get_mut::<RequestInfo>()
    }
}

/// The token of an `Authorization: Bearer <token>` header, or `""`.
pub fn bearer_token(headers: &http::HeaderMap) -> &str {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim())
}
