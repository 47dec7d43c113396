//! The stage contract: a stage gets the request and the rest of the route's pipeline, and either answers
//! itself or passes the request on. Stages run in [`Phase`] order; a route's pipeline holds only the stages
//! that apply to it, so a phase without a stage costs nothing.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http::Request;

/// Where in the pipeline a stage runs, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Who is calling (sets the request's principal).
    Authenticate,
    /// How often they may.
    RateLimit,
    /// Whether they may do this.
    Authorize,
    /// Whether the request is well formed (the route's JSON Schema).
    Validate,
    /// Answer from the cache, or let the endpoint answer and keep the response.
    Cache,
}

/// One stage of a pipeline.
pub trait Stage: Send + Sync + 'static {
    fn call(&self, request: Request<Body>, next: Next) -> BoxFuture<'static, Response>;
}

/// What a step calls to pass the request on: the rest of the pipeline. It is also a tower service.
#[derive(Clone)]
pub struct Next(Arc<dyn Handle>);

/// A step together with everything after it.
pub trait Handle: Send + Sync + 'static {
    fn handle(&self, request: Request<Body>) -> BoxFuture<'static, Response>;
}

impl Next {
    pub fn new(handle: Arc<dyn Handle>) -> Self {
        Self(handle)
    }

    /// `stage` in front of `self`.
    pub fn with(self, stage: Arc<dyn Stage>) -> Self {
        Self(Arc::new(StageLink { stage, next: self }))
    }

    /// Passes the request to the rest of the pipeline.
    pub fn run(self, request: Request<Body>) -> BoxFuture<'static, Response> {
        self.0.handle(request)
    }

    /// Passes the request on without giving up this handle.
    pub fn call(&self, request: Request<Body>) -> BoxFuture<'static, Response> {
        self.0.handle(request)
    }
}

struct StageLink {
    stage: Arc<dyn Stage>,
    next: Next,
}

impl Handle for StageLink {
    fn handle(&self, request: Request<Body>) -> BoxFuture<'static, Response> {
        self.stage.call(request, self.next.clone())
    }
}

impl tower::Service<Request<Body>> for Next {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Map<BoxFuture<'static, Response>, fn(Response) -> Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.0.handle(request).map(Ok)
    }
}
