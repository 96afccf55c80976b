//! The main watch of each controller, with a readiness signal any number of tasks can await.
//!
//! `Store::wait_until_ready` is backed by a oneshot that remembers a single waker, so awaiting
//! it next to the controller's own runner can leave one of them asleep. Here the reflector
//! stream itself reports its first complete list on a `watch` channel.

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::hash::Hash;
use tokio::sync::watch;

/// A controller's input: the store, the applied-object stream that fills it, and a future
/// that resolves once the first list is in the store.
pub struct MainWatch<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    pub stream: futures::stream::BoxStream<'static, Result<K, watcher::Error>>,
    pub ready: futures::future::BoxFuture<'static, ()>,
}

pub fn main_watch<K>(api: Api<K>, dyntype: K::DynamicType) -> MainWatch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let (tx, mut rx) = watch::channel(false);
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .inspect(move |ev| {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            tx.send_replace(true);
        }
    })
    .applied_objects();
    let ready = async move {
        // An error means the stream (and with it the controller) is gone: nothing to wait for.
        let _ = rx.wait_for(|r| *r).await;
    };
    MainWatch {
        store,
        stream: stream_boxed(stream),
        ready: Box::pin(ready),
    }
}

fn stream_boxed<K: Send + 'static>(
    s: impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<K, watcher::Error>> {
    s.boxed()
}
