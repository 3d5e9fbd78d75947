//! Keeps the CA in the `caBundle` of every webhook of the operator's
//! MutatingWebhookConfiguration (named by `--webhook-configuration`; the chart creates it
//! without one), so the API server trusts the webhook's serving certificate without
//! cert-manager. The configuration is watched by name: whenever a webhook's bundle differs
//! (created, upgraded by Helm, edited), it is patched back. Every replica does this; they hold
//! the same CA, so their patches agree.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The webhooks of `configuration` whose bundle is not `ca_pem`.
pub fn stale(configuration: &MutatingWebhookConfiguration, ca_pem: &[u8]) -> Vec<String> {
    configuration
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem))
        .map(|w| w.name.clone())
        .collect()
}

/// A strategic merge patch setting the bundle of the named webhooks (the list merges by name).
pub fn patch(webhooks: &[String], ca_pem: &[u8]) -> serde_json::Value {
    let bundle = ByteString(ca_pem.to_vec());
    let entries: Vec<_> = webhooks
        .iter()
        .map(|name| serde_json::json!({ "name": name, "clientConfig": { "caBundle": bundle } }))
        .collect();
    serde_json::json!({ "webhooks": entries })
}

/// Watches `name` until `stop`, patching stale bundles as they appear.
pub async fn keep(client: Client, name: String, ca_pem: String, metrics: Arc<Metrics>, stop: CancellationToken) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let watch = watcher(api.clone(), watcher::Config::default().fields(&format!("metadata.name={name}")))
        .default_backoff()
        .take_until(stop.cancelled_owned());
    let mut watch = std::pin::pin!(watch);
    // Whether the last (re)list found the configuration.
    let mut found = false;
    while let Some(event) = watch.next().await {
        let configuration = match event {
            Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => c,
            Ok(watcher::Event::Init) => {
                found = false;
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if !found {
                    tracing::warn!(
                        configuration = name,
                        "no MutatingWebhookConfiguration so named: the API server calls no webhook of this operator until it exists"
                    );
                }
                continue;
            }
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(
                    configuration = name,
                    "the MutatingWebhookConfiguration was deleted: pods get no sidecar until it is back"
                );
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, configuration = name, "watching the webhook configuration failed");
                continue;
            }
        };
        found = true;
        let stale = stale(&configuration, ca_pem.as_bytes());
        if stale.is_empty() {
            continue;
        }
        let patched =
            api.patch(&name, &PatchParams::default(), &Patch::Strategic(patch(&stale, ca_pem.as_bytes()))).await;
        match patched {
            Ok(_) => {
                metrics.ca_bundle_write(true);
                tracing::info!(configuration = name, webhooks = ?stale, "wrote the CA into caBundle");
            }
            // The patch's own watch event, the next change, or the watch's next relist tries again.
            Err(error) => {
                metrics.ca_bundle_write(false);
                tracing::warn!(%error, configuration = name, "writing caBundle failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    use super::*;

    fn webhook(name: &str, bundle: Option<&[u8]>) -> MutatingWebhook {
        MutatingWebhook {
            name: name.into(),
            client_config: WebhookClientConfig {
                ca_bundle: bundle.map(|b| ByteString(b.to_vec())),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn webhooks_without_this_ca_are_stale_and_the_patch_names_each() {
        let configuration = MutatingWebhookConfiguration {
            webhooks: Some(vec![webhook("a", None), webhook("b", Some(b"CA")), webhook("c", Some(b"OLD"))]),
            ..Default::default()
        };
        let stale = stale(&configuration, b"CA");
        assert_eq!(stale, ["a", "c"]);
        let patch = patch(&stale, b"CA");
        // caBundle is base64 in JSON: "CA" is "Q0E=".
        assert_eq!(
            patch,
            serde_json::json!({ "webhooks": [
                { "name": "a", "clientConfig": { "caBundle": "Q0E=" } },
                { "name": "c", "clientConfig": { "caBundle": "Q0E=" } },
            ]})
        );
    }
}
