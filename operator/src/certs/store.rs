//! The API calls: Secret `l4proxy-ca` read and written as a compare-and-swap, ConfigMap
//! `l4proxy-ca` applied. Every failure says what was being done to which object.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};

use super::{CertsError, layout};
use crate::reconcile::FIELD_MANAGER;

pub(super) struct Store {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
}

/// What a write of the Secret came to.
pub(super) enum Written {
    /// The Secret as stored.
    Stored(Box<Secret>),
    /// Another writer got there first (the Secret was created, replaced or deleted since it was
    /// read): read it again and decide on what it holds now.
    Raced,
}

impl Store {
    pub(super) fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    pub(super) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(super) async fn read(&self) -> Result<Option<Secret>, CertsError> {
        self.secrets.get_opt(layout::NAME).await.map_err(|e| self.api_error("reading", "Secret", e))
    }

    /// Creates `secret` when it has no `resourceVersion`, else replaces exactly that version, so
    /// two replicas never both win: the loser gets 409 (or 404 when the Secret went meanwhile).
    pub(super) async fn write(&self, secret: &Secret) -> Result<Written, CertsError> {
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
        let result = match secret.metadata.resource_version {
            None => self.secrets.create(&params, secret).await,
            Some(_) => self.secrets.replace(layout::NAME, &params, secret).await,
        };
        match result {
            Ok(stored) => Ok(Written::Stored(Box::new(stored))),
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => Ok(Written::Raced),
            Err(e) => Err(self.api_error("writing", "Secret", e)),
        }
    }

    /// Applies the ConfigMap with `ca.crt`. Replicas apply the same content under the same field
    /// manager, so they never conflict; an apply that changes nothing stores nothing.
    pub(super) async fn publish(&self, ca_cert: &str) -> Result<(), CertsError> {
        let config_map = layout::config_map(&self.namespace, ca_cert);
        self.config_maps
            .patch(layout::NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&config_map))
            .await
            .map_err(|e| self.api_error("applying", "ConfigMap", e))?;
        Ok(())
    }

    fn api_error(&self, action: &'static str, kind: &'static str, source: kube::Error) -> CertsError {
        CertsError::Api { action, kind, namespace: self.namespace.clone(), source }
    }
}
