//! What a reload can change about a listener, swapped as one unit. A connection (or UDP
//! session) keeps the snapshot it was admitted with, so a reload never changes it mid-flight.

use std::sync::Arc;

use crate::{
    backend::BackendSet,
    config::{EffectiveLimits, ListenerConfig},
    metrics::{ListenerMetrics, Metrics},
    routing::{Probed, best_route},
};

pub struct ListenerSettings {
    pub name: Arc<str>,
    pub config: ListenerConfig,
    /// The default route's backends.
    pub backends: BackendSet,
    /// One set per `config.routes` entry, in the same order.
    pub routes: Vec<BackendSet>,
    pub metrics: ListenerMetrics,
}

impl ListenerSettings {
    /// Settings for `config`; `previous` lends backend state to backends it also had (same
    /// listener name and address), so health and counts survive a reload.
    pub fn new(config: ListenerConfig, previous: Option<&ListenerSettings>, metrics: &Metrics) -> Self {
        let previous: Vec<&BackendSet> = previous
            .filter(|p| *p.name == config.name)
            .map(|p| std::iter::once(&p.backends).chain(p.routes.iter()).collect())
            .unwrap_or_default();
        let lb = config.load_balancing;
        let backends = BackendSet::new(&config.name, &config.backends, lb, &previous, metrics);
        let routes =
            config.routes.iter().map(|r| BackendSet::new(&config.name, &r.backends, lb, &previous, metrics)).collect();
        Self { name: config.name.as_str().into(), backends, routes, metrics: metrics.listener(&config.name), config }
    }

    pub fn limits(&self) -> &EffectiveLimits {
        &self.config.limits
    }

    /// Whether connections must be probed before a backend is chosen.
    pub fn probes(&self) -> bool {
        !self.config.routes.is_empty()
    }

    /// The backends for what probing found: the best matching route's, or the default route's;
    /// `None` when nothing matched and the listener has no default backends.
    pub fn route(&self, probed: &Probed<'_>) -> Option<&BackendSet> {
        match best_route(&self.config.routes, probed).and_then(|i| self.routes.get(i)) {
            Some(route) => Some(route),
            None if self.backends.backends().is_empty() => None,
            None => Some(&self.backends),
        }
    }

    /// Every backend set: the default route's, then each route's.
    pub fn backend_sets(&self) -> impl Iterator<Item = &BackendSet> {
        std::iter::once(&self.backends).chain(self.routes.iter())
    }
}
