//! The CA and the serving certificates it issues (rcgen), and what the operator reads back from a
//! stored pair (x509-parser): its names, its expiry, and whether this CA issued it. Pure: no I/O,
//! and the clock is a parameter, so every decision here is unit tested.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType,
};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _};

use super::CertsError;

/// The CA's common name, which proxies see as the issuer of the operator's certificates.
const CA_NAME: &str = "l4proxy-ca";

/// Certificates start this long before they are made, so that a peer whose clock is behind the
/// operator's still accepts a fresh one.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate and its private key, PEM: what the Secret stores.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    pub cert: String,
    /// PKCS#8.
    pub key: String,
}

/// The key stays out of logs and test failures.
impl fmt::Debug for PemPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemPair").field("cert", &self.cert).finish_non_exhaustive()
    }
}

/// Which half of a stored pair is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Cert,
    Key,
}

/// Why a stored pair cannot be used: the half and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub half: Half,
    pub problem: String,
}

impl Invalid {
    fn cert(problem: impl Into<String>) -> Self {
        Self { half: Half::Cert, problem: problem.into() }
    }

    fn key(problem: impl Into<String>) -> Self {
        Self { half: Half::Key, problem: problem.into() }
    }
}

/// One subject alternative name of a serving certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SubjectName {
    /// Lower case.
    Dns(String),
    Ip(IpAddr),
}

impl SubjectName {
    /// An IP address when it parses as one, else a DNS name.
    fn parse(name: &str) -> Result<Self, CertsError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        dns_name(name)
            .map(Self::Dns)
            .map_err(|problem| CertsError::Config(format!("serving certificate name {name:?}: {problem}")))
    }
}

/// The names a serving certificate is issued for: the configured ones (DNS names in lower case;
/// a name that parses as an IP address is an IP address) and always 127.0.0.1, which is how a
/// process beside the operator (a test's proxy, a port-forward) reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingNames(BTreeSet<SubjectName>);

impl ServingNames {
    pub fn new<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self, CertsError> {
        let mut set = BTreeSet::from([SubjectName::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))]);
        for name in names {
            set.insert(SubjectName::parse(name.as_ref())?);
        }
        Ok(Self(set))
    }

    fn sans(&self) -> Result<Vec<SanType>, rcgen::Error> {
        self.0
            .iter()
            .map(|name| match name {
                SubjectName::Dns(dns) => Ok(SanType::DnsName(dns.as_str().try_into()?)),
                SubjectName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect()
    }

    /// The first DNS name, else the address: the common name, for people reading the certificate.
    fn common_name(&self) -> String {
        let dns = self.0.iter().find_map(|name| match name {
            SubjectName::Dns(dns) => Some(dns.clone()),
            SubjectName::Ip(_) => None,
        });
        dns.unwrap_or_else(|| Ipv4Addr::LOCALHOST.to_string())
    }
}

/// A DNS name in lower case: dot-separated labels of letters, digits and inner hyphens, at most
/// 63 characters each and 253 in all, optionally under a leading `*.`.
fn dns_name(name: &str) -> Result<String, &'static str> {
    let name = name.to_ascii_lowercase();
    let labels = name.strip_prefix("*.").unwrap_or(&name);
    if labels.is_empty() {
        return Err("is empty");
    }
    if name.len() > 253 {
        return Err("is longer than 253 characters");
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if !labels.split('.').all(label_ok) {
        return Err(
            "is neither an IP address nor a DNS name (labels of letters, digits and inner '-', at most 63 each)",
        );
    }
    Ok(name)
}

/// The operator's CA. Its key lives in this process's memory and in the Secret, nowhere else.
pub struct Ca {
    pem: PemPair,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("cert", &self.pem.cert).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA that may sign end-entity certificates only (path length 0).
    pub fn generate(validity: Duration, now: SystemTime) -> Result<Self, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity, now)?;
        let cert = params.self_signed(&key)?;
        let pem = PemPair { cert: cert.pem(), key: key.serialize_pem() };
        Ok(Self { pem, der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// A stored CA: a CA certificate and its own key.
    pub fn from_pem(pem: &PemPair) -> Result<Self, Invalid> {
        let der = cert_der(&pem.cert)?;
        let x509 = parse(&der)?;
        if !x509.is_ca() {
            return Err(Invalid::cert("is not a CA certificate (basicConstraints CA:TRUE)"));
        }
        let key = key_of(&x509, &pem.key)?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| Invalid::cert(e.to_string()))?;
        Ok(Self { pem: pem.clone(), der, issuer })
    }

    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// A serving certificate (server auth) for `names`, valid from a little before `now` for
    /// `validity`, with a new key. This is the one place the CA signs.
    pub fn issue(&self, names: &ServingNames, validity: Duration, now: SystemTime) -> Result<PemPair, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = names.sans()?;
        params.distinguished_name.push(DnType::CommonName, names.common_name());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity, now)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// Whether this CA signed `serving`: a certificate another CA signed is useless to proxies,
    /// which trust only this one.
    pub fn issued(&self, serving: &ServingCert) -> bool {
        let (Ok(ca), Ok(cert)) = (parse(&self.der), parse(&serving.der)) else { return false };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }
}

/// A serving certificate and its key, checked, ready for rustls.
pub struct ServingCert {
    pem: PemPair,
    der: CertificateDer<'static>,
    not_after: SystemTime,
    names: BTreeSet<SubjectName>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// A stored serving pair. Whether the CA issued it is the caller's question ([`Ca::issued`]).
    pub fn from_pem(pem: &PemPair, provider: &CryptoProvider) -> Result<Self, Invalid> {
        let der = cert_der(&pem.cert)?;
        let x509 = parse(&der)?;
        let key = key_of(&x509, &pem.key)?;
        let names = subject_names(&x509)?;
        let not_after = from_unix(x509.validity().not_after.timestamp());
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .map_err(|e| Invalid::key(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(vec![der.clone()], signing_key));
        Ok(Self { pem: pem.clone(), der, not_after, names, certified })
    }

    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn certified(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }
}

/// Why a new serving certificate is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// The Secret has none.
    Missing,
    /// Another CA signed it (someone put a serving pair or a CA into the Secret on its own):
    /// proxies trust only the CA beside it, so it is replaced rather than refused.
    Issuer,
    /// It is not valid for exactly the configured names.
    Names,
    /// Less than `renew_before` of its validity is left.
    Expiring,
}

impl Rotation {
    /// A bounded label for `serving_cert_rotations_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Issuer => "issuer",
            Self::Names => "names",
            Self::Expiring => "expiring",
        }
    }
}

/// What a serving certificate is issued for and when it is replaced. Checked by
/// [`ServingPolicy::new`] so that a fresh certificate is never already due.
#[derive(Clone, Debug)]
pub struct ServingPolicy {
    names: ServingNames,
    validity: Duration,
    renew_before: Duration,
}

impl ServingPolicy {
    pub fn new(names: ServingNames, validity: Duration, renew_before: Duration) -> Result<Self, CertsError> {
        if renew_before.is_zero() || renew_before >= validity {
            return Err(CertsError::Config(format!(
                "renew_before ({renew_before:?}) must be above zero and shorter than serving_validity ({validity:?})"
            )));
        }
        Ok(Self { names, validity, renew_before })
    }

    /// Why `serving` (none: the Secret has none) must be replaced now, if it must.
    pub fn rotation(&self, ca: &Ca, serving: Option<&ServingCert>, now: SystemTime) -> Option<Rotation> {
        let Some(serving) = serving else { return Some(Rotation::Missing) };
        if !ca.issued(serving) {
            Some(Rotation::Issuer)
        } else if serving.names != self.names.0 {
            Some(Rotation::Names)
        } else if serving.not_after.duration_since(now).unwrap_or_default() < self.renew_before {
            Some(Rotation::Expiring)
        } else {
            None
        }
    }

    pub fn issue(&self, ca: &Ca, now: SystemTime) -> Result<PemPair, CertsError> {
        ca.issue(&self.names, self.validity, now)
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration, now: SystemTime) -> Result<(), CertsError> {
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| CertsError::Config(format!("a validity of {validity:?} ends past the end of time")))?;
    params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
    params.not_after = not_after.into();
    Ok(())
}

/// The first certificate in `pem`.
fn cert_der(pem: &str) -> Result<CertificateDer<'static>, Invalid> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Invalid::cert(format!("is not a PEM certificate: {e}")))
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Invalid> {
    let (_, x509) =
        X509Certificate::from_der(der).map_err(|e| Invalid::cert(format!("is not an X.509 certificate: {e}")))?;
    Ok(x509)
}

/// The PKCS#8 key in `key_pem`, if it is the key of `cert`.
fn key_of(cert: &X509Certificate<'_>, key_pem: &str) -> Result<KeyPair, Invalid> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| Invalid::key(format!("is not a PEM PKCS#8 private key: {e}")))?;
    if key.subject_public_key_info() != cert.public_key().raw {
        return Err(Invalid::key("is not the key of the certificate beside it"));
    }
    Ok(key)
}

fn subject_names(cert: &X509Certificate<'_>) -> Result<BTreeSet<SubjectName>, Invalid> {
    let san = cert.subject_alternative_name().map_err(|e| Invalid::cert(format!("subjectAltName: {e}")))?;
    let names = san.map(|san| san.value.general_names.iter()).into_iter().flatten();
    Ok(names
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(SubjectName::Dns(dns.to_ascii_lowercase())),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(SubjectName::Ip(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?))),
                16 => Some(SubjectName::Ip(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?))),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

fn from_unix(seconds: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Seconds since the epoch, for the expiry gauge.
pub(super) fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    fn names(list: &[&str]) -> ServingNames {
        ServingNames::new(list).unwrap()
    }

    fn policy(list: &[&str]) -> ServingPolicy {
        ServingPolicy::new(names(list), 90 * DAY, 30 * DAY).unwrap()
    }

    fn serving(ca: &Ca, policy: &ServingPolicy, now: SystemTime) -> ServingCert {
        ServingCert::from_pem(&policy.issue(ca, now).unwrap(), &provider()).unwrap()
    }

    #[test]
    fn serving_names_always_include_loopback_and_normalise_case_and_addresses() {
        let got: Vec<_> = names(&["L4Proxy.Example", "10.0.0.1", "127.0.0.1", "*.svc"]).0.into_iter().collect();
        assert_eq!(
            got,
            [
                SubjectName::Dns("*.svc".into()),
                SubjectName::Dns("l4proxy.example".into()),
                SubjectName::Ip("10.0.0.1".parse().unwrap()),
                SubjectName::Ip("127.0.0.1".parse().unwrap()),
            ]
        );
        assert_eq!(names(&[]).0.len(), 1);
    }

    #[test]
    fn a_serving_name_that_is_no_dns_name_is_refused_naming_it() {
        for bad in ["", "a..b", "-a.b", "under_score.svc", "a b", &"x".repeat(64)] {
            let err = ServingNames::new([bad]).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn renew_before_must_leave_a_fresh_certificate_not_due() {
        assert!(ServingPolicy::new(names(&[]), DAY, DAY).is_err());
        assert!(ServingPolicy::new(names(&[]), DAY, Duration::ZERO).is_err());
        assert!(ServingPolicy::new(names(&[]), DAY, DAY / 3).is_ok());
    }

    #[test]
    fn an_issued_certificate_has_the_names_and_the_validity_and_the_ca_signed_it() {
        let now = SystemTime::now();
        let ca = Ca::generate(3650 * DAY, now).unwrap();
        let policy = policy(&["op.l4proxy.svc"]);
        let cert = serving(&ca, &policy, now);
        assert_eq!(cert.names, policy.names.0);
        let lifetime = cert.not_after.duration_since(now).unwrap();
        assert!(lifetime > 90 * DAY - Duration::from_secs(2) && lifetime <= 90 * DAY, "{lifetime:?}");
        assert!(ca.issued(&cert));
        assert!(!Ca::generate(DAY, now).unwrap().issued(&cert));
    }

    #[test]
    fn a_stored_ca_reads_back_and_signs_like_the_original() {
        let now = SystemTime::now();
        let original = Ca::generate(3650 * DAY, now).unwrap();
        let stored = Ca::from_pem(original.pem()).unwrap();
        let policy = policy(&["a.svc"]);
        assert!(original.issued(&serving(&stored, &policy, now)));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_as_the_key() {
        let now = SystemTime::now();
        let ca = Ca::generate(DAY * 2, now).unwrap();
        let other = Ca::generate(DAY * 2, now).unwrap();
        let swapped = PemPair { cert: ca.pem().cert.clone(), key: other.pem().key.clone() };
        assert_eq!(Ca::from_pem(&swapped).unwrap_err().half, Half::Key);

        let policy = ServingPolicy::new(names(&[]), DAY, DAY / 3).unwrap();
        let (a, b) = (policy.issue(&ca, now).unwrap(), policy.issue(&ca, now).unwrap());
        let swapped = PemPair { cert: a.cert, key: b.key };
        assert_eq!(ServingCert::from_pem(&swapped, &provider()).unwrap_err().half, Half::Key);
    }

    #[test]
    fn garbage_is_refused_naming_the_half_it_is_in() {
        let now = SystemTime::now();
        let ca = Ca::generate(DAY * 2, now).unwrap();
        let bad_cert = PemPair { cert: "not pem".into(), key: ca.pem().key.clone() };
        assert_eq!(Ca::from_pem(&bad_cert).unwrap_err().half, Half::Cert);
        let bad_key = PemPair { cert: ca.pem().cert.clone(), key: "not pem".into() };
        assert_eq!(Ca::from_pem(&bad_key).unwrap_err().half, Half::Key);
    }

    #[test]
    fn a_serving_certificate_is_not_a_ca() {
        let now = SystemTime::now();
        let ca = Ca::generate(DAY * 2, now).unwrap();
        let leaf = ServingPolicy::new(names(&[]), DAY, DAY / 3).unwrap().issue(&ca, now).unwrap();
        let err = Ca::from_pem(&leaf).unwrap_err();
        assert_eq!(err.half, Half::Cert);
        assert!(err.problem.contains("not a CA"), "{err:?}");
    }

    #[test]
    fn rotation_is_due_when_missing_foreign_renamed_or_within_renew_before_of_expiry() {
        let now = SystemTime::now();
        let ca = Ca::generate(3650 * DAY, now).unwrap();
        let policy = policy(&["a.svc"]);
        let cert = serving(&ca, &policy, now);
        assert_eq!(policy.rotation(&ca, None, now), Some(Rotation::Missing));
        assert_eq!(policy.rotation(&ca, Some(&cert), now), None);
        let other_ca = Ca::generate(3650 * DAY, now).unwrap();
        assert_eq!(policy.rotation(&other_ca, Some(&cert), now), Some(Rotation::Issuer));
        assert_eq!(self::policy(&["b.svc"]).rotation(&ca, Some(&cert), now), Some(Rotation::Names));
        // 90 days of validity, renewed with 30 left: not yet after 59 days, due after 61.
        assert_eq!(policy.rotation(&ca, Some(&cert), now + 59 * DAY), None);
        assert_eq!(policy.rotation(&ca, Some(&cert), now + 61 * DAY), Some(Rotation::Expiring));
        assert_eq!(policy.rotation(&ca, Some(&cert), now + 200 * DAY), Some(Rotation::Expiring));
    }
}
