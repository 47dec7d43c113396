//! Event-driven invalidation: the events of a CachePolicy's `invalidation.events` topics, read through the
//! events component's `Subscribe` port, turned into invalidations of this configuration's caches.

use std::sync::Arc;

use futures::future::BoxFuture;
use kube::ResourceExt as _;
use umw_crds::template::Part;

use super::{Invalidation, Invalidator};
use crate::kernel::config::Loaded;
use crate::kernel::ports::{Delivery, EventHandler, Group, Subscribe, Subscription};
use crate::kernel::task::{TaskKey, TaskSpec, version_of};

struct Rule {
    event_type: Option<String>,
    key: Option<Vec<Part>>,
    prefix: Option<Vec<Part>>,
    tag: Option<Vec<Part>>,
}

struct Handler {
    policy: String,
    rules: Vec<Rule>,
    /// The committed configuration's invalidator: a consumer outlives reloads that keep its topic.
    invalidator: Current,
}

/// The invalidator of the committed snapshot.
pub type Current = Arc<arc_swap::ArcSwapOption<Invalidator>>;

impl EventHandler for Handler {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, ()> {
        let Some(invalidator) = self.invalidator.load_full() else { return Box::pin(async {}) };
        let mut what = Invalidation::default();
        match &delivery.event {
            Ok(event) => {
                for rule in &self.rules {
                    if rule.event_type.as_deref().is_some_and(|t| t != event.event_type()) {
                        continue;
                    }
                    let render =
                        |parts: &Option<Vec<Part>>| parts.as_ref().map(|p| event.render(p)).filter(|v| !v.is_empty());
                    what.keys.extend(render(&rule.key));
                    what.prefixes.extend(render(&rule.prefix));
                    what.tags.extend(render(&rule.tag));
                }
            }
            Err(error) => {
                tracing::warn!(policy = %self.policy, topic = %delivery.topic, offset = delivery.offset, %error, "an invalidation event could not be read; skipped");
                invalidator.metrics.events_handled.with_label_values(&[&self.policy, "invalid"]).inc();
            }
        }
        let policy = self.policy.clone();
        Box::pin(async move {
            if what.keys.is_empty() && what.prefixes.is_empty() && what.tags.is_empty() {
                return;
            }
            // A cache that cannot be reached now keeps the entries until their TTL: logged, not retried.
            let outcome = match invalidator.invalidate(&what).await {
                Ok(deleted) => {
                    tracing::debug!(%policy, deleted, "cache invalidated by an event");
                    "delivered"
                }
                Err(error) => {
                    tracing::warn!(%policy, %error, "cache invalidation by an event failed");
                    "failed"
                }
            };
            invalidator.metrics.events_handled.with_label_values(&[&policy, outcome]).inc();
        })
    }
}

/// One subscription per topic of each CachePolicy's `invalidation.events`. Every pod reads every event
/// (an in-process cache is the pod's own, and deleting from a shared Redis twice is harmless).
pub fn subscriptions(loaded: &Loaded, invalidator: &Current, subscribe: &dyn Subscribe) -> Vec<TaskSpec> {
    let mut tasks = Vec::new();
    for policy in &loaded.bundle.cache_policies {
        let Some(invalidation) = &policy.spec.invalidation else { continue };
        let mut topics: Vec<&str> = invalidation.events.iter().map(|e| e.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        let owner = format!("cache-{}", policy.name_any());
        for topic in topics {
            let events: Vec<_> = invalidation.events.iter().filter(|e| e.topic == topic).collect();
            let parse = |t: &Option<String>| t.as_deref().and_then(|t| umw_crds::template::parse(t).ok());
            let rules = events
                .iter()
                .map(|e| Rule {
                    event_type: e.event_type.clone(),
                    key: parse(&e.key_template),
                    prefix: parse(&e.prefix_template),
                    tag: parse(&e.tag_template),
                })
                .collect();
            let handler = Arc::new(Handler { policy: owner.clone(), rules, invalidator: invalidator.clone() });
            let version = version_of(&serde_json::to_string(&events).unwrap_or_default());
            let subscription = Subscription { owner: owner.clone(), topic: topic.to_string(), group: Group::Broadcast };
            let key = TaskKey::new("cache", "invalidation", format!("{owner} {topic}"));
            tasks.push(subscribe.subscribe(key, version, subscription, handler));
        }
    }
    tasks
}
