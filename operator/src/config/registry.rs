//! The proxies connected to this replica: who they are, what they applied or rejected, and
//! their last stats report. Bounded by [`Registry::new`]'s `max` (a connection beyond it is
//! refused); an entry lives exactly as long as its stream ([`Registration`] removes it on drop).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::model::{
    configs::ResourceKey,
    proxies::{ListenerTotals, ProxyView, Summary},
};

/// The connected proxies of this replica.
pub struct Registry {
    max: usize,
    next_id: AtomicU64,
    resources: Mutex<HashMap<ResourceKey, HashMap<u64, Entry>>>,
}

struct Entry {
    view: ProxyView,
    /// When the last stats report arrived.
    reported: Option<Instant>,
}

/// This replica holds as many proxies as it may.
#[derive(Debug, thiserror::Error)]
#[error("this operator replica serves {0} proxies, the most it may")]
pub struct Full(pub usize);

impl Registry {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, next_id: AtomicU64::new(1), resources: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ResourceKey, HashMap<u64, Entry>>> {
        // Holders never panic between related updates, so a poisoned map is still consistent.
        self.resources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a proxy named `name` serving `key`, until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, key: ResourceKey, name: String) -> Result<Registration, Full> {
        let mut resources = self.lock();
        let connected: usize = resources.values().map(HashMap::len).sum();
        if connected >= self.max {
            return Err(Full(self.max));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let view = ProxyView { name, ..Default::default() };
        resources.entry(key.clone()).or_default().insert(id, Entry { view, reported: None });
        Ok(Registration { registry: self.clone(), key, id })
    }

    /// Proxies connected now.
    pub fn connected(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }

    /// Every resource's proxies summed up against its current version (`version_of`); a report
    /// older than `stale_after` counts as none (the proxy is connected but silent).
    pub fn summaries(
        &self,
        version_of: impl Fn(&ResourceKey) -> Option<String>,
        stale_after: Duration,
    ) -> BTreeMap<ResourceKey, Summary> {
        let resources = self.lock();
        resources
            .iter()
            .map(|(key, proxies)| {
                let views: Vec<ProxyView> = proxies
                    .values()
                    .map(|entry| {
                        let fresh = entry.reported.is_some_and(|at| at.elapsed() <= stale_after);
                        let mut view = entry.view.clone();
                        if !fresh {
                            view.listeners.clear();
                        }
                        view
                    })
                    .collect();
                (key.clone(), Summary::of(version_of(key).as_deref(), &views))
            })
            .collect()
    }

    fn update(&self, key: &ResourceKey, id: u64, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.lock().get_mut(key).and_then(|proxies| proxies.get_mut(&id)) {
            change(entry);
        }
    }
}

/// One connected proxy's place in the registry.
pub struct Registration {
    registry: Arc<Registry>,
    key: ResourceKey,
    id: u64,
}

impl Registration {
    pub fn applied(&self, version: &str) {
        self.registry.update(&self.key, self.id, |entry| {
            entry.view.applied = Some(version.to_owned());
            entry.view.rejected = None;
        });
    }

    pub fn rejected(&self, version: &str, why: &str) {
        self.registry
            .update(&self.key, self.id, |entry| entry.view.rejected = Some((version.to_owned(), why.to_owned())));
    }

    pub fn report(&self, listeners: Vec<ListenerTotals>) {
        self.registry.update(&self.key, self.id, |entry| {
            entry.view.listeners = listeners;
            entry.reported = Some(Instant::now());
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut resources = self.registry.lock();
        if let Some(proxies) = resources.get_mut(&self.key) {
            proxies.remove(&self.id);
            if proxies.is_empty() {
                resources.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ResourceKey {
        ("shop".into(), "db".into())
    }

    fn totals(size: u64) -> Vec<ListenerTotals> {
        vec![ListenerTotals { name: "pg".into(), size, ..Default::default() }]
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_counts_while_its_stream_lives_and_its_report_while_it_is_fresh() {
        let registry = Registry::new(10);
        let first = registry.register(key(), "shop/web-1".into()).unwrap();
        let second = registry.register(key(), "shop/web-2".into()).unwrap();
        first.applied("v1");
        first.report(totals(3));
        second.rejected("v1", "address in use");
        let version = |_: &ResourceKey| Some("v1".to_owned());
        let summary = &registry.summaries(version, Duration::from_secs(20))[&key()];
        assert_eq!((summary.connected, summary.in_sync, summary.rejected_count), (2, 1, 1));
        assert_eq!(summary.listeners[0].size, 3);

        tokio::time::advance(Duration::from_secs(21)).await;
        let summary = &registry.summaries(version, Duration::from_secs(20))[&key()];
        assert!(summary.listeners.is_empty(), "a silent proxy's old report drops out");

        drop((first, second));
        assert!(registry.summaries(version, Duration::from_secs(20)).is_empty());
        assert_eq!(registry.connected(), 0);
    }

    #[tokio::test]
    async fn registrations_beyond_the_bound_are_refused() {
        let registry = Registry::new(1);
        let _held = registry.register(key(), "a".into()).unwrap();
        assert!(registry.register(key(), "b".into()).is_err());
    }
}
