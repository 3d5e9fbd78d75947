//! What Secret `l4proxy-ca` and ConfigMap `l4proxy-ca` hold, read into checked values and made
//! from PEM pairs. Pure: the API calls are in `store.rs`.
//!
//! The Secret is of type `Opaque`, not `kubernetes.io/tls`: that type says "a serving pair for
//! anyone to mount", and this one holds the CA key, which only the operator reads. Its keys:
//!
//! | key       | holds                                                     |
//! | --------- | --------------------------------------------------------- |
//! | `ca.crt`  | the CA certificate, PEM (published in the ConfigMap too)  |
//! | `ca.key`  | the CA's private key, PKCS#8 PEM                          |
//! | `tls.crt` | the serving certificate, PEM, signed by the CA            |
//! | `tls.key` | its private key, PKCS#8 PEM                               |
//!
//! Each pair is either absent (the operator makes it) or present and usable. Half a pair, or one
//! that does not parse or whose key is not its certificate's, is an error naming the key: what
//! the operator did not write itself it does not overwrite. (A usable serving pair that the CA
//! beside it did not sign is replaced: see `Rotation::Issuer`.) Other keys, labels and
//! annotations are kept when the operator writes.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{ResourceExt as _, api::ObjectMeta};
use rustls::crypto::CryptoProvider;

use super::{
    CertsError,
    pki::{Ca, Half, Invalid, PemPair, ServingCert},
};
use crate::api::labels::MANAGED_BY;

/// The name of both the Secret and the ConfigMap.
pub const NAME: &str = "l4proxy-ca";

/// The CA certificate's key in the Secret and in the ConfigMap.
pub const CA_CERT: &str = "ca.crt";

/// The Secret's keys of one pair.
struct Keys {
    cert: &'static str,
    key: &'static str,
}

const CA: Keys = Keys { cert: CA_CERT, key: "ca.key" };
const SERVING: Keys = Keys { cert: "tls.crt", key: "tls.key" };

/// What the Secret holds, checked.
#[derive(Debug, Default)]
pub(super) struct Contents {
    pub(super) ca: Option<Arc<Ca>>,
    pub(super) serving: Option<ServingCert>,
}

/// Reads the Secret's two pairs; see the module docs for what is refused.
pub(super) fn read(secret: &Secret, namespace: &str, provider: &CryptoProvider) -> Result<Contents, CertsError> {
    let data = secret.data.as_ref();
    let ca = pair(data, namespace, &CA)?
        .map(|pem| Ca::from_pem(&pem).map_err(|e| unusable(namespace, &CA, e)))
        .transpose()?;
    let serving = pair(data, namespace, &SERVING)?
        .map(|pem| ServingCert::from_pem(&pem, provider).map_err(|e| unusable(namespace, &SERVING, e)))
        .transpose()?;
    Ok(Contents { ca: ca.map(Arc::new), serving })
}

/// One pair's text: none when both keys are absent.
fn pair(
    data: Option<&BTreeMap<String, ByteString>>,
    namespace: &str,
    keys: &Keys,
) -> Result<Option<PemPair>, CertsError> {
    let text = |key: &'static str| {
        data.and_then(|data| data.get(key))
            .map(|bytes| {
                String::from_utf8(bytes.0.clone()).map_err(|_| CertsError::Unusable {
                    namespace: namespace.to_owned(),
                    key,
                    problem: "is not PEM text".into(),
                })
            })
            .transpose()
    };
    let missing = |key: &'static str, present: &str| CertsError::Unusable {
        namespace: namespace.to_owned(),
        key,
        problem: format!("is missing while {present} is there"),
    };
    match (text(keys.cert)?, text(keys.key)?) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(PemPair { cert, key })),
        (None, Some(_)) => Err(missing(keys.cert, keys.key)),
        (Some(_), None) => Err(missing(keys.key, keys.cert)),
    }
}

fn unusable(namespace: &str, keys: &Keys, invalid: Invalid) -> CertsError {
    let key = match invalid.half {
        Half::Cert => keys.cert,
        Half::Key => keys.key,
    };
    CertsError::Unusable { namespace: namespace.to_owned(), key, problem: invalid.problem }
}

/// What to do about an unusable key, for the error message.
pub(super) fn remedy(key: &str) -> String {
    if key.starts_with("ca.") {
        "the operator does not replace a CA that proxies may trust: repair the Secret, or delete it to have a new CA made"
            .into()
    } else {
        format!("repair it, or remove {} and {} to have a new serving certificate issued", SERVING.cert, SERVING.key)
    }
}

/// `base` (none: a new Secret) with both pairs set and the operator's label; everything else in
/// it, its `resourceVersion` included, is kept, so a replace of it is a compare-and-swap.
pub(super) fn secret(base: Option<Secret>, namespace: &str, ca: &PemPair, serving: &PemPair) -> Secret {
    let mut secret = base.unwrap_or_else(|| Secret {
        metadata: ObjectMeta { name: Some(NAME.into()), namespace: Some(namespace.into()), ..ObjectMeta::default() },
        type_: Some("Opaque".into()),
        ..Secret::default()
    });
    secret.labels_mut().insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    let data = secret.data.get_or_insert_default();
    for (keys, pem) in [(&CA, ca), (&SERVING, serving)] {
        data.insert(keys.cert.into(), ByteString(pem.cert.clone().into_bytes()));
        data.insert(keys.key.into(), ByteString(pem.key.clone().into_bytes()));
    }
    secret
}

/// The ConfigMap that publishes the CA certificate, for server-side apply.
pub(super) fn config_map(namespace: &str, ca_cert: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CA_CERT.into(), ca_cert.into())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::certs::pki::{ServingNames, ServingPolicy};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    fn pairs() -> (PemPair, PemPair) {
        let now = SystemTime::now();
        let ca = Ca::generate(10 * DAY, now).unwrap();
        let policy = ServingPolicy::new(ServingNames::new(["a.svc"]).unwrap(), DAY, DAY / 3).unwrap();
        let serving = policy.issue(&ca, now).unwrap();
        (ca.pem().clone(), serving)
    }

    fn with(mut secret: Secret, key: &str, value: Option<&str>) -> Secret {
        let data = secret.data.get_or_insert_default();
        match value {
            Some(value) => data.insert(key.into(), ByteString(value.as_bytes().to_vec())),
            None => data.remove(key),
        };
        secret
    }

    fn refusal(secret: &Secret) -> String {
        read(secret, "ns", &provider()).unwrap_err().to_string()
    }

    #[test]
    fn written_pairs_read_back_unchanged() {
        let (ca, serving) = pairs();
        let contents = read(&secret(None, "ns", &ca, &serving), "ns", &provider()).unwrap();
        assert_eq!(contents.ca.unwrap().pem(), &ca);
        assert_eq!(contents.serving.unwrap().pem(), &serving);
    }

    #[test]
    fn a_secret_without_either_pair_reads_as_empty() {
        let contents = read(&Secret::default(), "ns", &provider()).unwrap();
        assert!(contents.ca.is_none() && contents.serving.is_none());
    }

    #[test]
    fn half_a_pair_is_refused_naming_the_missing_key() {
        let (ca, serving) = pairs();
        let full = secret(None, "ns", &ca, &serving);
        let err = refusal(&with(full.clone(), "ca.key", None));
        assert!(err.starts_with("Secret ns/l4proxy-ca, key ca.key: is missing while ca.crt is there"), "{err}");
        let err = refusal(&with(full, "tls.crt", None));
        assert!(err.starts_with("Secret ns/l4proxy-ca, key tls.crt: is missing while tls.key is there"), "{err}");
    }

    #[test]
    fn an_unusable_key_is_refused_naming_it_with_what_to_do() {
        let (ca, serving) = pairs();
        let full = secret(None, "ns", &ca, &serving);
        let err = refusal(&with(full.clone(), "ca.key", Some(&serving.key)));
        assert!(err.contains("key ca.key: is not the key of the certificate beside it"), "{err}");
        assert!(err.contains("does not replace a CA"), "{err}");
        let err = refusal(&with(full.clone(), "tls.crt", Some("garbage")));
        assert!(err.contains("key tls.crt: is not a PEM certificate"), "{err}");
        assert!(err.contains("remove tls.crt and tls.key"), "{err}");
        let mut not_text = full;
        not_text.data.as_mut().unwrap().insert("ca.crt".into(), ByteString(vec![0xff, 0xfe]));
        assert!(refusal(&not_text).contains("key ca.crt: is not PEM text"));
    }

    #[test]
    fn a_written_secret_keeps_what_else_it_held_and_its_resource_version() {
        let (ca, serving) = pairs();
        let mut base = with(Secret::default(), "other", Some("kept"));
        base.metadata.resource_version = Some("42".into());
        base.type_ = Some("example.com/custom".into());
        let written = secret(Some(base), "ns", &ca, &serving);
        assert_eq!(written.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(written.type_.as_deref(), Some("example.com/custom"));
        let data = written.data.unwrap();
        assert_eq!(data["other"].0, b"kept");
        assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt", "ca.key", "other", "tls.crt", "tls.key"]);
        assert_eq!(written.metadata.labels.unwrap()[MANAGED_BY.0], MANAGED_BY.1);
    }
}
