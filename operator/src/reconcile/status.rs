//! Status and Events: the status patched (server-side apply) only when it differs from what
//! the resource says, and one Event per condition that changed status or reason.

use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use super::{Context, Error, FIELD_MANAGER, error::api_error};
use crate::{
    api::crd::{L4Proxy, L4ProxyStatus, ListenerStatus, PoolStatus, ProxyCounts},
    metrics::Write,
    model::{
        conditions::{self, Decided},
        effective::Resolved,
        proxies::Summary,
    },
};

/// Patches status when it differs from what the resource says, and publishes one Event per
/// condition that changed status or reason.
pub(super) async fn write(
    proxy: &L4Proxy,
    decided: &[Decided],
    resolved: Option<&Resolved>,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let generation = proxy.metadata.generation.unwrap_or(0);
    let config_version = ctx.configs.get(&ns, &proxy.name_any()).map(|c| c.version.to_string());
    let summary = ctx.proxy_status.get(&ns, &proxy.name_any()).against(config_version.as_deref());
    let mut decided = decided.to_vec();
    decided.push(summary.programmed());
    let listeners = listener_statuses(resolved, &summary, &proxy.status);
    let proxies = ProxyCounts {
        connected: summary.connected,
        in_sync: summary.in_sync,
        summary: format!("{}/{}", summary.in_sync, summary.connected),
    };
    let desired_over = |current: &L4ProxyStatus| L4ProxyStatus {
        observed_generation: Some(generation),
        conditions: conditions::merge(&current.conditions, &decided, generation, conditions::now()),
        config_version: config_version.clone(),
        proxies: proxies.clone(),
        listeners: listeners.clone(),
    };
    let cached = proxy.status.clone().unwrap_or_default();
    if desired_over(&cached) == cached {
        return Ok(());
    }
    // The cache may not have seen our previous write yet (a reconcile right after one): decide
    // against the stored status, so neither the status nor an Event is written twice.
    let api: Api<L4Proxy> = Api::namespaced(ctx.client.clone(), &ns);
    let stored = api.get_status(&proxy.name_any()).await.map_err(api_error("reading status"))?;
    let current = stored.status.unwrap_or_default();
    let desired = desired_over(&current);
    if desired == current {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "l4proxy.dev/v1alpha1",
        "kind": "L4Proxy",
        "status": desired,
    });
    api.patch_status(&proxy.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(api_error("writing status"))?;
    ctx.metrics.wrote(Write::Status);
    for condition in conditions::transitions(&current.conditions, &desired.conditions) {
        let event = Event {
            type_: if condition.status == "False" { EventType::Warning } else { EventType::Normal },
            reason: condition.reason.clone(),
            note: Some(format!("{} is {}: {}", condition.type_, condition.status, condition.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&event, &proxy.object_ref(&())).await {
            Ok(()) => ctx.metrics.wrote(Write::Event),
            // An Event is a courtesy: failing to publish one must not fail the reconcile.
            Err(e) => tracing::warn!(error = %e, "publishing an Event failed"),
        }
    }
    Ok(())
}

/// Each listener's backends (from this reconcile's resolution, or as the status last said when
/// the spec is not accepted) and what its proxies report.
fn listener_statuses(
    resolved: Option<&Resolved>,
    summary: &Summary,
    current: &Option<L4ProxyStatus>,
) -> Vec<ListenerStatus> {
    let backends: Vec<(String, u32)> = match resolved {
        Some(resolved) => resolved.backends_per_listener.clone(),
        None => current.iter().flat_map(|s| s.listeners.iter()).map(|l| (l.name.clone(), l.backends)).collect(),
    };
    backends
        .into_iter()
        .map(|(name, backends)| {
            let totals = summary.listeners.iter().find(|t| t.name == name);
            ListenerStatus {
                pool_stats: totals.map(|t| PoolStatus {
                    size: t.size,
                    max_size: t.max_size,
                    expired_count: t.expired_count,
                    average_age_seconds: (t.average_age_seconds() * 10.0).round() / 10.0,
                }),
                active: totals.map_or(0, |t| t.active),
                accepted: totals.map_or(0, |t| t.accepted),
                rejected: totals.map_or(0, |t| t.rejected),
                bytes_received: totals.map_or(0, |t| t.bytes_received),
                bytes_sent: totals.map_or(0, |t| t.bytes_sent),
                name,
                backends,
            }
        })
        .collect()
}

/// The Event recorder for this replica.
pub fn recorder(client: Client, identity: &str) -> Recorder {
    Recorder::new(client, Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity.to_owned()) })
}
