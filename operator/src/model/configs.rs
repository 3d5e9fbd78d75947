//! [`ConfigStore`]: each resource's current effective config, for the config service.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::effective::EffectiveConfig;

/// Resource key: (namespace, name).
pub type ResourceKey = (String, String);

/// The effective config of every `L4Proxy` this operator knows, for the config service. It
/// mirrors the API server's set of resources (entries are removed when a resource is deleted),
/// so it is bounded by what the cluster holds.
#[derive(Debug, Default)]
pub struct ConfigStore {
    configs: RwLock<HashMap<ResourceKey, Arc<EffectiveConfig>>>,
}

impl ConfigStore {
    /// Stores `config` for `key`; returns whether the version changed.
    pub fn put(&self, key: ResourceKey, config: EffectiveConfig) -> bool {
        let version = config.version;
        let mut configs = self.configs.write().unwrap_or_else(|e| e.into_inner());
        configs.insert(key, Arc::new(config)).is_none_or(|old| old.version != version)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<EffectiveConfig>> {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        configs.get(&(namespace.to_owned(), name.to_owned())).cloned()
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

    pub fn len(&self) -> usize {
        self.configs.read().unwrap_or_else(|e| e.into_inner()).len()
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
}
