//! One watch per kind, shared: each watch keeps a reflector store (what reconcilers read) and hands every
//! event, deletions included, to the controllers that are triggered by that kind.
//!
//! A controller subscribes by name before the watch starts ([`Watch::subscribe`]). Handing an event on
//! never waits for a subscriber: each keeps the latest version of every object it has not taken yet, so a
//! slow controller costs at most one entry per object and cannot stall the watch, the store or its peers.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, Weak};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// The objects one subscriber has not taken yet, latest version of each.
struct Pending<K: Resource<DynamicType = ()>> {
    objects: Mutex<HashMap<ObjectRef<K>, K>>,
    ready: Notify,
}

/// A subscriber's end: the objects of the watched kind that changed, as a stream for a controller.
pub struct Subscription<K: Resource<DynamicType = ()>> {
    pending: Arc<Pending<K>>,
}

/// A watch being set up: subscribe, then [`start`](Watch::start).
pub struct Watch<K: Resource<DynamicType = ()>> {
    api: Api<K>,
    config: watcher::Config,
    metrics: Metrics,
    subscribers: Vec<Weak<Pending<K>>>,
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config, metrics: Metrics) -> Self {
        Self { api, config, metrics, subscribers: Vec::new() }
    }

    /// One more controller triggered by this kind.
    pub fn subscribe(&mut self) -> Subscription<K> {
        let pending = Arc::new(Pending { objects: Mutex::new(HashMap::new()), ready: Notify::new() });
        self.subscribers.push(Arc::downgrade(&pending));
        Subscription { pending }
    }

    /// Starts the watch on the current runtime; `prepare` is applied to every object before it is stored
    /// or handed on (to drop what must not be kept in memory).
    pub fn start(self, prepare: impl Fn(&mut K) + Send + 'static) -> Store<K> {
        let (store, mut writer) = reflector::store::<K>();
        let Self { api, config, metrics, subscribers } = self;
        let kind = K::kind(&()).to_string();
        tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut listed = Vec::new();
            while let Some(event) = events.next().await {
                let mut event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        metrics.watch_errors.with_label_values(&[&kind]).inc();
                        tracing::warn!(%error, kind, "watch failed; retrying with backoff");
                        continue;
                    }
                };
                match &mut event {
                    watcher::Event::Apply(object)
                    | watcher::Event::Delete(object)
                    | watcher::Event::InitApply(object) => prepare(object),
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
                writer.apply_watcher_event(&event);
                // Objects listed during a (re)list reach the store only at InitDone, so their triggers wait
                // until then: a reconcile must find its object in the store.
                let ready: Vec<K> = match event {
                    watcher::Event::Apply(object) | watcher::Event::Delete(object) => vec![object],
                    watcher::Event::InitApply(object) => {
                        listed.push(object);
                        continue;
                    }
                    watcher::Event::Init => {
                        listed.clear();
                        continue;
                    }
                    watcher::Event::InitDone => std::mem::take(&mut listed),
                };
                for subscriber in &subscribers {
                    // Gone: its controller stopped (shutdown); nothing to deliver to.
                    let Some(pending) = subscriber.upgrade() else { continue };
                    if let Ok(mut objects) = pending.objects.lock() {
                        for object in &ready {
                            objects.insert(ObjectRef::from_obj(object), object.clone());
                        }
                    }
                    pending.ready.notify_one();
                }
            }
        });
        store
    }
}

impl<K> Subscription<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
{
    /// The stream a controller takes.
    pub fn stream(self) -> impl Stream<Item = Result<K, watcher::Error>> + Send {
        futures::stream::unfold(self.pending, |pending| async move {
            loop {
                let next = pending.objects.lock().ok().and_then(|mut objects| {
                    let key = objects.keys().next().cloned()?;
                    objects.remove(&key)
                });
                if let Some(object) = next {
                    return Some((Ok(object), pending));
                }
                pending.ready.notified().await;
            }
        })
    }

    /// Objects waiting to be taken.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.pending.objects.lock().map(|o| o.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn config_map(name: &str, version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_does_not_take_keeps_one_entry_per_object_and_gets_the_latest() {
        let pending = Arc::new(Pending { objects: Mutex::new(HashMap::new()), ready: Notify::new() });
        let subscription = Subscription { pending: pending.clone() };
        for version in 0..10_000 {
            let object = config_map(&format!("cm-{}", version % 3), &version.to_string());
            pending.objects.lock().unwrap().insert(ObjectRef::from_obj(&object), object);
            pending.ready.notify_one();
        }
        assert_eq!(subscription.waiting(), 3);
        let taken: Vec<ConfigMap> = subscription.stream().take(3).map(Result::unwrap).collect().await;
        let mut versions: Vec<String> = taken.iter().map(|c| c.metadata.resource_version.clone().unwrap()).collect();
        versions.sort();
        assert_eq!(versions, ["9997", "9998", "9999"]);
    }
}
