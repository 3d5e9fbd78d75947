//! The proxies' part of the status, across replicas: every `--status-interval` each replica
//! sums up the proxies connected to it ([`Registry::summaries`]) and publishes that in a
//! ConfigMap of its own (`l4proxy-proxies-<replica>` in the operator's namespace); the leader
//! merges its own summaries with the fresh ones of the others into [`ProxyStatus`], and asks for
//! a reconcile of each resource whose merged summary changed, so a resource's status is written
//! at most once per interval, by the one reconcile path.
//!
//! A replica's report counts while it keeps changing (each carries the time it was written): one
//! that has not changed for two intervals (its replica died) is dropped, and its proxies, which
//! reconnect to a live replica, are counted there.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::FIELD_MANAGER;
use crate::{
    api::{crd::L4Proxy, labels},
    config::Registry,
    lease::Leadership,
    model::{configs::ConfigStore, proxies::Summary},
};

/// Marks the per-replica report ConfigMaps (the watch of them selects on it).
pub const REPORT_LABEL: &str = "l4proxy.dev/proxy-report";
const REPORT_KEY: &str = "summaries.json";

/// Every resource's proxies, merged over the replicas; written by [`run`] on the leader.
#[derive(Debug, Default)]
pub struct ProxyStatus {
    merged: RwLock<BTreeMap<(String, String), Summary>>,
}

impl ProxyStatus {
    /// The proxies of `namespace/name`; none connected when there is no summary.
    pub fn get(&self, namespace: &str, name: &str) -> Summary {
        let merged = self.merged.read().unwrap_or_else(|e| e.into_inner());
        merged.get(&(namespace.to_owned(), name.to_owned())).cloned().unwrap_or_default()
    }

    /// Replaces the summaries; returns the resources whose summary changed.
    fn replace(&self, next: BTreeMap<(String, String), Summary>) -> Vec<(String, String)> {
        let mut merged = self.merged.write().unwrap_or_else(|e| e.into_inner());
        let mut changed: Vec<_> =
            next.iter().filter(|(k, v)| merged.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
        changed.extend(merged.keys().filter(|k| !next.contains_key(*k)).cloned());
        *merged = next;
        changed
    }
}

/// One replica's report, as its ConfigMap holds it.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    replica: String,
    /// When it was written (so that every write changes it, and a live replica's report never
    /// looks stale).
    written: String,
    /// By `namespace/name`.
    resources: BTreeMap<String, Summary>,
}

/// What [`run`] needs.
pub struct Aggregation {
    pub client: Client,
    /// The operator's namespace, where the reports live.
    pub namespace: String,
    /// This replica's name (its report's).
    pub identity: String,
    pub interval: Duration,
    pub registry: Arc<Registry>,
    pub configs: Arc<ConfigStore>,
    pub status: Arc<ProxyStatus>,
    pub leadership: Leadership,
    /// The other replicas' reports, as a watch sees them.
    pub reports: Store<ConfigMap>,
    /// Resources to reconcile because their proxies changed.
    pub triggers: mpsc::Sender<ObjectRef<L4Proxy>>,
}

/// Runs until `stop`, then removes this replica's report.
pub async fn run(aggregation: Aggregation, stop: CancellationToken) {
    let api: Api<ConfigMap> = Api::namespaced(aggregation.client.clone(), &aggregation.namespace);
    let name = report_name(&aggregation.identity);
    let mut seen: HashMap<String, (String, Instant)> = HashMap::new();
    let mut published = false;
    let mut tick = tokio::time::interval(aggregation.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let configs = &aggregation.configs;
        let own = aggregation
            .registry
            .summaries(|(ns, name)| configs.get(ns, name).map(|c| c.version.to_string()), 2 * aggregation.interval);
        if !own.is_empty() || published {
            match publish(&api, &name, &aggregation.identity, &own).await {
                Ok(()) => published = !own.is_empty(),
                Err(error) => tracing::warn!(%error, report = %name, "publishing this replica's proxy report failed"),
            }
        }
        if !aggregation.leadership.is_leader() {
            continue;
        }
        let mut merged = own;
        for (replica, resources) in fresh_reports(&aggregation, &mut seen) {
            for (key, summary) in resources {
                let Some((ns, name)) = key.split_once('/') else { continue };
                let entry = merged.entry((ns.to_owned(), name.to_owned())).or_default();
                if entry.version.is_none() && entry.connected == 0 {
                    entry.version = configs.get(ns, name).map(|c| c.version.to_string());
                }
                entry.merge(&summary);
            }
            tracing::trace!(%replica, "merged a replica's proxy report");
        }
        for (ns, name) in aggregation.status.replace(merged) {
            // Full: the resource stays changed and is asked for again at the next interval.
            let _ = aggregation.triggers.try_send(ObjectRef::new(&name).within(&ns));
        }
    }
    if published && let Err(error) = api.delete(&name, &DeleteParams::default()).await {
        tracing::debug!(%error, report = %name, "removing this replica's proxy report failed");
    }
}

fn report_name(identity: &str) -> String {
    let safe: String = identity
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    format!("l4proxy-proxies-{}", safe.trim_matches('-'))
}

async fn publish(
    api: &Api<ConfigMap>,
    name: &str,
    identity: &str,
    own: &BTreeMap<(String, String), Summary>,
) -> Result<(), kube::Error> {
    let report = Report {
        replica: identity.to_owned(),
        written: Timestamp::now().to_string(),
        resources: own.iter().map(|((ns, n), s)| (format!("{ns}/{n}"), s.clone())).collect(),
    };
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                (REPORT_LABEL.to_owned(), "true".to_owned()),
                (labels::MANAGED_BY.0.to_owned(), labels::MANAGED_BY.1.to_owned()),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            REPORT_KEY.to_owned(),
            serde_json::to_string(&report).expect("a report serialises"),
        )])),
        ..Default::default()
    };
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&config_map)).await.map(drop)
}

/// The other replicas' reports that changed within two intervals, by this replica's clock.
fn fresh_reports(
    aggregation: &Aggregation,
    seen: &mut HashMap<String, (String, Instant)>,
) -> Vec<(String, BTreeMap<String, Summary>)> {
    let own = report_name(&aggregation.identity);
    let now = Instant::now();
    let mut fresh = Vec::new();
    let current: Vec<_> = aggregation.reports.state();
    seen.retain(|name, _| current.iter().any(|c| c.name_any() == *name));
    for config_map in current {
        let name = config_map.name_any();
        if name == own {
            continue;
        }
        let version = config_map.resource_version().unwrap_or_default();
        let first_seen = match seen.get(&name) {
            Some((seen_version, at)) if *seen_version == version => *at,
            _ => {
                seen.insert(name.clone(), (version, now));
                now
            }
        };
        if now.duration_since(first_seen) > 2 * aggregation.interval {
            continue;
        }
        let text = config_map.data.as_ref().and_then(|d| d.get(REPORT_KEY));
        match text.map(|t| serde_json::from_str::<Report>(t)) {
            Some(Ok(report)) => fresh.push((report.replica, report.resources)),
            Some(Err(error)) => tracing::warn!(report = %name, %error, "unreadable proxy report, ignored"),
            None => {}
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(report_name("l4proxy-operator-7d9f-x2"), "l4proxy-proxies-l4proxy-operator-7d9f-x2");
        assert_eq!(report_name("Host_Name-1234"), "l4proxy-proxies-host-name-1234");
    }

    #[test]
    fn replacing_summaries_names_the_resources_that_changed_or_went() {
        let status = ProxyStatus::default();
        let key = |n: &str| ("shop".to_owned(), n.to_owned());
        let one = Summary { connected: 1, ..Default::default() };
        assert_eq!(status.replace(BTreeMap::from([(key("a"), one.clone())])), vec![key("a")]);
        assert!(status.replace(BTreeMap::from([(key("a"), one.clone())])).is_empty(), "unchanged");
        assert_eq!(status.replace(BTreeMap::new()), vec![key("a")], "its proxies went");
        assert_eq!(status.get("shop", "a"), Summary::default());
    }
}
