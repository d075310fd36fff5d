//! Development PKI: a private CA, the relay's certificate and agent/connector identities,
//! so a newcomer needs no openssl. Identities are URI SANs (`ztna://agent/alice`).
//! Production deployments bring their own CA; only the SAN convention matters.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use ztna_proto::identity::{Identity, Kind};

/// Names of the files in a PKI directory.
pub fn cert_path(dir: &Path, id: &Identity) -> PathBuf {
    match id.kind {
        Kind::Relay => dir.join("relay.pem"),
        k => dir.join(format!("{}-{}.pem", k.name(), id.name)),
    }
}

pub fn key_path(dir: &Path, id: &Identity) -> PathBuf {
    cert_path(dir, id).with_extension("key")
}

pub struct CertificateAuthority {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl CertificateAuthority {
    pub fn create(common_name: &str) -> Result<Self> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "ZTNA development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { key, cert })
    }

    /// Loads a CA written by [`CertificateAuthority::save`] to issue more identities.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_pem = fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
        let key_pem = fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?;
        let key = KeyPair::from_pem(&key_pem).context("parsing ca.key")?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).context("parsing ca.pem")?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { key, cert })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_file(&dir.join("ca.pem"), self.cert.pem().as_bytes(), false)?;
        write_file(&dir.join("ca.key"), self.key.serialize_pem().as_bytes(), true)
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a leaf certificate for `id`; relay certificates also carry DNS/IP names.
    pub fn issue(&self, id: &Identity, dns_names: &[String], ips: &[IpAddr]) -> Result<(String, String)> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(id.to_string().try_into()?));
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(name.clone().try_into()?));
        }
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match id.kind {
            Kind::Relay => vec![ExtendedKeyUsagePurpose::ServerAuth],
            // Connectors are TLS servers of the end-to-end tunnel and clients of the relay.
            Kind::Connector => vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth],
            Kind::Agent => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(397);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues and writes `<kind>-<name>.pem` and `.key` into `dir`.
    pub fn issue_to(&self, dir: &Path, id: &Identity, dns_names: &[String], ips: &[IpAddr]) -> Result<()> {
        let (cert, key) = self.issue(id, dns_names, ips)?;
        write_file(&cert_path(dir, id), cert.as_bytes(), false)?;
        write_file(&key_path(dir, id), key.as_bytes(), true)
    }
}

/// What `pki init` creates.
pub struct DevPkiSpec {
    pub relay_names: Vec<String>,
    pub agents: Vec<String>,
    pub connectors: Vec<String>,
    /// The example service that the example policy grants.
    pub service: String,
}

impl Default for DevPkiSpec {
    fn default() -> Self {
        DevPkiSpec {
            relay_names: vec!["localhost".into()],
            agents: vec!["alice".into()],
            connectors: vec!["web-1".into()],
            service: "web".into(),
        }
    }
}

/// Creates a CA, the relay certificate, the identities and an example policy in `dir`.
/// Refuses to overwrite an existing CA unless `force`.
pub fn init_dev_pki(dir: &Path, spec: &DevPkiSpec, force: bool) -> Result<()> {
    if dir.join("ca.key").exists() && !force {
        bail!("{} already holds a CA (ca.key); pass --force to replace it", dir.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::create("ZTNA development CA")?;
    ca.save(dir)?;
    let relay = Identity::new(Kind::Relay, "relay")?;
    let ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    ca.issue_to(dir, &relay, &spec.relay_names, &ips)?;
    for name in &spec.agents {
        ca.issue_to(dir, &Identity::new(Kind::Agent, name)?, &[], &[])?;
    }
    for name in &spec.connectors {
        ca.issue_to(dir, &Identity::new(Kind::Connector, name)?, &[], &[])?;
    }
    let policy = dir.join("policy.toml");
    if !policy.exists() || force {
        let list = |kind: &str, names: &[String]| {
            names.iter().map(|n| format!("\"ztna://{kind}/{n}\"")).collect::<Vec<_>>().join(", ")
        };
        let text = format!(
            "# Access policy: who may reach (agents) and who may serve (connectors) each service.\n\
             # \"ztna://agent/*\" matches every agent. Reload with SIGHUP.\n\
             [services.{svc}]\nagents = [{agents}]\nconnectors = [{connectors}]\n",
            svc = spec.service,
            agents = list("agent", &spec.agents),
            connectors = list("connector", &spec.connectors),
        );
        write_file(&policy, text.as_bytes(), false)?;
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = CertificateAuthority::create("test").unwrap();
        let id = Identity::new(Kind::Agent, "alice").unwrap();
        let (pem, _key) = ca.issue(&id, &[], &[]).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        assert_eq!(Identity::from_certificate_der(&der).unwrap(), id);
    }

    #[test]
    fn init_then_load_and_issue() {
        let dir = std::env::temp_dir().join(format!("ztna-pki-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init_dev_pki(&dir, &DevPkiSpec::default(), false).unwrap();
        assert!(init_dev_pki(&dir, &DevPkiSpec::default(), false).is_err(), "must not overwrite a CA");
        let ca = CertificateAuthority::load(&dir).unwrap();
        ca.issue_to(&dir, &Identity::new(Kind::Agent, "bob").unwrap(), &[], &[]).unwrap();
        for f in ["ca.pem", "relay.pem", "relay.key", "agent-alice.pem", "connector-web-1.key", "agent-bob.pem", "policy.toml"] {
            assert!(dir.join(f).exists(), "{f}");
        }
        crate::policy::Policy::load(&dir.join("policy.toml")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
