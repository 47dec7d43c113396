//! Ports: what one component needs of another, as small traits. A component that provides one puts it in
//! [`Ports`] while it builds; components built after it take it from there. Nothing else crosses between
//! components.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;
use http::Request;
use umw_crds::event_route::EventFormat;
use umw_crds::middleware::{RouteMatch, Upstream};
use umw_crds::template::Part;

use super::endpoint::Route;
use super::stage::Next;
use super::task::{TaskKey, TaskSpec};

/// The ports of one build, by type.
#[derive(Default)]
pub struct Ports {
    ports: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl Ports {
    /// Offers `port` to the components built after this one.
    pub fn provide<T: ?Sized + Send + Sync + 'static>(&mut self, port: Arc<T>) {
        self.ports.insert(TypeId::of::<Arc<T>>(), Box::new(port));
    }

    pub fn get<T: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.ports.get(&TypeId::of::<Arc<T>>()).and_then(|p| p.downcast_ref::<Arc<T>>()).cloned()
    }
}

/// Forward a request to an upstream (the proxy provides it).
pub trait Forward: Send + Sync + 'static {
    /// A route that sends its requests to `upstream`; the caller calls its endpoint (the route is listed
    /// after every other, with `matches`, so that `/status` shows it). An error names the field under
    /// `upstream` (e.g. `.url`) and the problem.
    fn route(
        &self,
        name: &str,
        matches: &RouteMatch,
        upstream: &Upstream,
        max_body: u64,
    ) -> Result<Arc<Route>, (String, String)>;
}

/// An event to publish: CloudEvents attributes, data, and extra Kafka headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub topic: String,
    /// The Kafka key; events of one key are published in order.
    pub key: Option<String>,
    pub ty: String,
    pub source: String,
    pub subject: Option<String>,
    /// RFC 3339 time the event was recorded.
    pub time: Option<String>,
    pub data: Vec<u8>,
    pub content_type: Option<String>,
    /// CloudEvents extensions (`traceparent`, `commandid`).
    pub extensions: Vec<(String, String)>,
    /// Kafka headers besides the CloudEvents ones.
    pub headers: Vec<(String, String)>,
}

/// Why a record was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The broker cannot be reached, or pushes back: nothing is wrong with the record. Try again later
    /// without counting an attempt.
    #[error("{0}")]
    Unavailable(String),
    /// The broker did not take this record this time: counts as an attempt.
    #[error("{0}")]
    Failed(String),
    /// The broker will never take this record (too large, malformed).
    #[error("{0}")]
    Refused(String),
}

/// Where records go, in one event format.
pub trait Sink: Send + Sync + 'static {
    /// Publishes and waits for the broker's acknowledgement.
    fn publish<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// Publish events to the Middleware's broker (the events component provides it).
pub trait Publish: Send + Sync + 'static {
    fn sink(&self, format: EventFormat) -> Arc<dyn Sink>;
    /// Identifies the broker connection: a task that publishes through it is replaced when it changes.
    fn connection(&self) -> u64;
}

/// One event read from a topic, as a subscriber sees it.
pub trait EventView: Send + Sync {
    fn event_type(&self) -> &str;
    /// Renders a template (`{{ data.id }}`, `{{ subject }}`, `{{ ext.name }}`) over the event.
    fn render(&self, template: &[Part]) -> String;
}

/// What a subscriber gets: the event, or why the message is not one.
pub struct Delivery {
    pub topic: String,
    pub offset: i64,
    pub event: Result<Box<dyn EventView>, String>,
}

pub trait EventHandler: Send + Sync + 'static {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, ()>;
}

/// How subscribers of one subscription share a topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// Every pod reads every event, from the end of the topic on; nothing is committed.
    Broadcast,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// Who subscribes, for logs and metrics (`cache-<policy>`).
    pub owner: String,
    pub topic: String,
    pub group: Group,
}

/// Subscribe to a topic (the events component provides it). The subscription runs as the returned task.
pub trait Subscribe: Send + Sync + 'static {
    /// `version` is the subscriber's: it is folded with the connection's.
    fn subscribe(
        &self,
        key: TaskKey,
        version: u64,
        subscription: Subscription,
        handler: Arc<dyn EventHandler>,
    ) -> TaskSpec;
}

/// What to invalidate: keys and key prefixes (after the Middleware's own prefix), and tags.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Invalidate cache entries (the cache component provides it when CachePolicies exist).
pub trait Invalidate: Send + Sync + 'static {
    /// How many entries went, or why the cache could not be reached.
    fn invalidate<'a>(&'a self, what: &'a Invalidation) -> BoxFuture<'a, Result<usize, String>>;
}

/// The gateway's own chain, once the listener has built it: tasks that fetch through the gateway (cache
/// warm-up) wait for it.
#[derive(Clone)]
pub struct Loopback(Arc<tokio::sync::watch::Sender<Option<Next>>>);

impl Default for Loopback {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(None).0))
    }
}

impl Loopback {
    pub fn set(&self, chain: Next) {
        self.0.send_replace(Some(chain));
    }

    /// Lets go of the chain (which holds the runtime) when the gateway stops.
    pub fn clear(&self) {
        self.0.send_replace(None);
    }

    /// Sends `request` through the chain, waiting for the chain to exist.
    pub async fn send(&self, request: Request<Body>) -> Response {
        let mut receiver = self.0.subscribe();
        let chain = match receiver.wait_for(Option::is_some).await {
            Ok(chain) => chain.clone(),
            Err(_) => None,
        };
        match chain {
            Some(chain) => chain.run(request).await,
            None => {
                super::problem::Problem::new(super::problem::kinds::INTERNAL, "the gateway is stopping").into_response()
            }
        }
    }
}

use axum::response::IntoResponse as _;
