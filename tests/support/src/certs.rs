//! Throwaway PKI for one control plane: a CA, the apiserver's serving cert, an admin client
//! cert and the service-account token signing key.
//!
//! Generated fresh per start so nothing secret lives in the repository and parallel control
//! planes never trust each other.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Subject alternative names of the serving cert: every way a test may reach loopback, plus the
/// in-cluster names so tokens and webhooks that use them verify too.
const SERVING_NAMES: [&str; 6] =
    ["127.0.0.1", "::1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"];

/// Files the apiserver reads, all under the PKI directory.
#[derive(Clone, Debug)]
pub(crate) struct PkiFiles {
    pub(crate) ca_cert: PathBuf,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) service_account_key: PathBuf,
    pub(crate) service_account_pub: PathBuf,
    /// The admin client cert, also what kube-apiserver presents to a kubelet.
    pub(crate) admin_cert: PathBuf,
    pub(crate) admin_key: PathBuf,
}

/// The admin identity (CN=admin, O=system:masters) in the encodings its two users need.
pub(crate) struct AdminCredentials {
    pub(crate) ca_cert_pem: String,
    pub(crate) ca_cert_der: Vec<u8>,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pem: String,
    /// PKCS#8.
    pub(crate) key_der: Vec<u8>,
}

pub(crate) struct Pki {
    pub(crate) files: PkiFiles,
    pub(crate) admin: AdminCredentials,
}

/// Generates the PKI and writes it to `dir` (created if needed); `extra_ips` are added to the
/// serving cert's names (a node's address, the `kubernetes` Service's ClusterIP).
pub(crate) fn generate(dir: &Path, extra_ips: &[Ipv4Addr]) -> Result<Pki> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_params, ca_key) = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key).context("self-signing the CA")?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate()?;
    let serving_cert = serving_params(extra_ips)?.signed_by(&serving_key, &ca).context("signing the serving cert")?;
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin_params()?.signed_by(&admin_key, &ca).context("signing the admin cert")?;
    let service_account_key = KeyPair::generate()?;

    let files = PkiFiles {
        ca_cert: write(dir, "ca.crt", &ca_cert.pem(), false)?,
        serving_cert: write(dir, "apiserver.crt", &serving_cert.pem(), false)?,
        serving_key: write(dir, "apiserver.key", &serving_key.serialize_pem(), true)?,
        service_account_key: write(dir, "sa.key", &service_account_key.serialize_pem(), true)?,
        service_account_pub: write(dir, "sa.pub", &service_account_key.public_key_pem(), false)?,
        // Also handy for curl by hand; the library itself uses the in-memory copies.
        admin_cert: write(dir, "admin.crt", &admin_cert.pem(), false)?,
        admin_key: write(dir, "admin.key", &admin_key.serialize_pem(), true)?,
    };

    let admin = AdminCredentials {
        ca_cert_pem: ca_cert.pem(),
        ca_cert_der: ca_cert.der().to_vec(),
        cert_pem: admin_cert.pem(),
        cert_der: admin_cert.der().to_vec(),
        key_pem: admin_key.serialize_pem(),
        key_der: admin_key.serialize_der(),
    };
    Ok(Pki { files, admin })
}

fn ca_params() -> Result<(CertificateParams, KeyPair)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "l4proxy-test-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok((params, KeyPair::generate()?))
}

fn serving_params(extra_ips: &[Ipv4Addr]) -> Result<CertificateParams> {
    let mut names: Vec<String> = SERVING_NAMES.iter().map(|name| name.to_string()).collect();
    names.extend(extra_ips.iter().map(Ipv4Addr::to_string));
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Kubernetes maps CN to the user name and O to groups; `system:masters` bypasses RBAC.
fn admin_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.distinguished_name.push(DnType::OrganizationName, "system:masters");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes one PEM file; private keys get mode 0600 even though they are throwaway.
fn write(dir: &Path, name: &str, contents: &str, private: bool) -> Result<PathBuf> {
    let path = dir.join(name);
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
