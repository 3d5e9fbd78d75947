//! [`ConfigStore`]: each resource's current effective config, for the config service.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use tokio::{sync::watch, time::Instant};

use super::effective::EffectiveConfig;

/// Resource key: (namespace, name).
pub type ResourceKey = (String, String);

/// A resource's config as the config service pushes it, and when its version appeared (for the
/// push-latency metric).
#[derive(Clone, Debug)]
pub struct Published {
    pub config: Arc<EffectiveConfig>,
    pub since: Instant,
}

/// The effective config of every `L4Proxy` this operator knows, for the config service: each
/// one in a watch channel, so a subscriber sees the newest version and never a queue of them.
/// It mirrors the API server's set of resources (entries are removed when a resource is
/// deleted, which ends their subscriptions), so it is bounded by what the cluster holds.
#[derive(Debug, Default)]
pub struct ConfigStore {
    configs: RwLock<HashMap<ResourceKey, watch::Sender<Option<Published>>>>,
}

impl ConfigStore {
    /// Stores `config` for `key`; returns whether the version changed (subscribers are told
    /// only then; a new generation with the same content replaces it quietly).
    pub fn put(&self, key: ResourceKey, config: EffectiveConfig) -> bool {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        let sender = configs.entry(key).or_insert_with(|| watch::Sender::new(None));
        sender.send_if_modified(|current| {
            let changed = current.as_ref().is_none_or(|p| p.config.version != config.version);
            let since = match current {
                Some(published) if !changed => published.since,
                _ => Instant::now(),
            };
            *current = Some(Published { config: Arc::new(config), since });
            changed
        })
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<EffectiveConfig>> {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        let sender = configs.get(&(namespace.to_owned(), name.to_owned()))?;
        sender.borrow().as_ref().map(|p| p.config.clone())
    }

    /// Follows `key`'s config: the current one (or `None` while the resource has no valid
    /// config yet) and every later version. The channel closes when the resource is removed.
    pub fn subscribe(&self, key: &ResourceKey) -> watch::Receiver<Option<Published>> {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.entry(key.clone()).or_insert_with(|| watch::Sender::new(None)).subscribe()
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Drops every entry `keep` rejects (after a relist, for deletions the watch missed).
    pub fn retain(&self, mut keep: impl FnMut(&ResourceKey) -> bool) {
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.retain(|key, _| keep(key));
    }

    /// Resources with a valid config.
    pub fn len(&self) -> usize {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        configs.values().filter(|sender| sender.borrow().is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::effective::ConfigVersion;

    #[test]
    fn store_reports_version_changes_only() {
        let store = ConfigStore::default();
        let config = |v, generation| EffectiveConfig { version: ConfigVersion(v), generation, listeners: vec![] };
        let key = ("shop".to_string(), "db".to_string());
        assert!(store.put(key.clone(), config(1, 1)));
        assert!(!store.put(key.clone(), config(1, 2)));
        assert_eq!(store.get("shop", "db").unwrap().generation, 2);
        assert!(store.put(key, config(2, 2)));
        store.remove("shop", "db");
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn a_subscriber_sees_the_newest_version_and_the_end_of_the_resource() {
        let store = ConfigStore::default();
        let config = |v| EffectiveConfig { version: ConfigVersion(v), generation: 1, listeners: vec![] };
        let key = ("shop".to_string(), "db".to_string());
        let mut subscription = store.subscribe(&key);
        assert!(subscription.borrow_and_update().is_none(), "no valid config yet");
        for v in 1..=3 {
            store.put(key.clone(), config(v));
        }
        subscription.changed().await.unwrap();
        let newest = subscription.borrow_and_update().as_ref().map(|p| p.config.version);
        assert_eq!(newest, Some(ConfigVersion(3)), "versions in between are skipped, not queued");
        store.put(key.clone(), config(3));
        assert!(!subscription.has_changed().unwrap(), "the same version is not pushed again");
        store.remove("shop", "db");
        assert!(subscription.changed().await.is_err(), "the subscription ends with the resource");
    }
}
