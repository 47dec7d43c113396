//! One watch per kind, shared: each watch keeps a reflector store (what reconcilers read) and fans every
//! event, deletions included, out to the controllers that are triggered by that kind.

use std::fmt::Debug;
use std::hash::Hash;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// A store and the trigger streams of one watched kind.
pub struct Shared<K: Resource + Clone + 'static>
where
    K::DynamicType: Hash + Eq,
{
    pub store: Store<K>,
    pub triggers: Vec<mpsc::Receiver<K>>,
}

/// Starts the watch of `api` on the current runtime, with `subscribers` trigger streams.
pub fn watch<K>(api: Api<K>, config: watcher::Config, subscribers: usize, metrics: Metrics) -> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watch_with(api, config, subscribers, metrics, |_| {})
}

/// Like [`watch`], with `prepare` applied to every object before it is stored or handed on (to drop what
/// must not be kept in memory).
pub fn watch_with<K>(
    api: Api<K>,
    config: watcher::Config,
    subscribers: usize,
    metrics: Metrics,
    prepare: impl Fn(&mut K) + Send + 'static,
) -> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    let (senders, triggers): (Vec<_>, Vec<_>) = (0..subscribers).map(|_| mpsc::channel::<K>(1024)).unzip();
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
                watcher::Event::Apply(object) | watcher::Event::Delete(object) | watcher::Event::InitApply(object) => {
                    prepare(object)
                }
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
            for object in ready {
                for sender in &senders {
                    // A closed receiver means its controller stopped (shutdown); nothing to deliver to.
                    let _ = sender.send(object.clone()).await;
                }
            }
        }
    });
    Shared { store, triggers }
}

/// A trigger receiver as the stream a controller takes.
pub fn trigger<K: Send + 'static>(receiver: mpsc::Receiver<K>) -> impl Stream<Item = Result<K, watcher::Error>> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|object| (Ok(object), receiver))
    })
}
