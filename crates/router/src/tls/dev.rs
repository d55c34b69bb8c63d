//! Certificates for development and for small deployments: a CA made with rcgen (ECDSA P-256,
//! ring) and router certificates issued from it (`fedbus keys cert`). On embedded defaults
//! `fedbus run` calls [`ensure`], which makes a dev CA and a router certificate for
//! `localhost` and `127.0.0.1` once, in `<keyring>/tls/`, the way the keyring itself is made:
//! built whole in a temporary sibling directory and renamed into place, so of two routers
//! starting at once exactly one creates it and both serve the same certificate.

use anyhow::{anyhow, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Subdirectory of the keyring holding the dev certificates.
pub const DIR: &str = "tls";
/// The dev CA certificate (what a client trusts: `curl --cacert`).
pub const CA_CERT: &str = "dev-ca.pem";
/// The dev CA private key (mode 0600; `fedbus keys cert` signs with it).
pub const CA_KEY: &str = "dev-ca.key";
/// The router certificate for `localhost` and `127.0.0.1`.
pub const ROUTER_CERT: &str = "router.pem";
/// Its private key (mode 0600).
pub const ROUTER_KEY: &str = "router.key";

/// A certificate authority that can issue router certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    /// A fresh self-signed dev CA.
    pub fn generate() -> anyhow::Result<Ca> {
        Ca::make("fedbus dev CA", "fedbus (development only)")
    }

    /// A fresh self-signed CA named `common_name` (`fedbus keys ca`: a federation's CA).
    pub fn generate_named(common_name: &str) -> anyhow::Result<Ca> {
        Ca::make(common_name, "fedbus")
    }

    fn make(common_name: &str, org: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.distinguished_name.push(DnType::OrganizationName, org);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// A CA from its PEM certificate and PEM private key (PKCS#8).
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Ca> {
        let cert_pem =
            fs::read_to_string(cert).with_context(|| format!("CA {}", cert.display()))?;
        let key_pem =
            fs::read_to_string(key).with_context(|| format!("CA key {}", key.display()))?;
        let key =
            KeyPair::from_pem(&key_pem).with_context(|| format!("CA key {}", key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| anyhow!("CA {}: {e}", cert.display()))?;
        Ok(Ca { issuer, cert_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `names` (DNS names, `*.` wildcards or IP addresses), valid for server
    /// and client authentication, with a fresh key: (certificate PEM, key PEM).
    pub fn issue(&self, common_name: &str, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Paths of the dev certificates in a keyring.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// The dev CA certificate.
    pub ca: PathBuf,
    /// The router certificate.
    pub cert: PathBuf,
    /// The router key.
    pub key: PathBuf,
}

impl DevFiles {
    /// The dev certificates' paths under `keyring`.
    pub fn in_keyring(keyring: &Path) -> DevFiles {
        let d = keyring.join(DIR);
        DevFiles {
            ca: d.join(CA_CERT),
            cert: d.join(ROUTER_CERT),
            key: d.join(ROUTER_KEY),
        }
    }
}

/// Makes the dev CA and router certificate in `<keyring>/tls/` unless they exist. Returns the
/// paths and whether this call created them.
pub fn ensure(keyring: &Path) -> anyhow::Result<(DevFiles, bool)> {
    let files = DevFiles::in_keyring(keyring);
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        return Ok((files, false));
    }
    let dir = keyring.join(DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(keyring)
        .with_context(|| format!("keyring {}", keyring.display()))?;
    let tmp = keyring.join(format!(
        ".tls-tmp-{}-{:016x}",
        std::process::id(),
        crate::util::random_u64()
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("{}", tmp.display()))?;
    let made = (|| -> anyhow::Result<()> {
        let ca = Ca::generate()?;
        let (cert, key) = ca.issue("localhost", &["localhost", "127.0.0.1", "::1"])?;
        write(&tmp.join(CA_CERT), ca.cert_pem(), 0o644)?;
        write(&tmp.join(CA_KEY), &ca.key_pem(), 0o600)?;
        write(&tmp.join(ROUTER_CERT), &cert, 0o644)?;
        write(&tmp.join(ROUTER_KEY), &key, 0o600)?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // rename(2) onto a missing or empty directory is atomic; onto one with files it fails,
    // and then another process made them first: use theirs.
    match fs::rename(&tmp, &dir) {
        Ok(()) => Ok((files, true)),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            if files.ca.exists() && files.cert.exists() && files.key.exists() {
                Ok((files, false))
            } else {
                Err(anyhow!(
                    "{}: {e} (an incomplete dev certificate directory: remove it to have it made again)",
                    dir.display()
                ))
            }
        }
    }
}

/// Writes `text` to a new file with `mode`, synced.
fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_util::TempDir;

    #[test]
    fn ensure_creates_once_and_racers_share_one_ca() {
        let dir = TempDir::new("tls-dev");
        let keyring = dir.path().join("keys");
        let results: Vec<(DevFiles, bool)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| ensure(&keyring))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").expect("ensure"))
                .collect()
        });
        assert_eq!(
            results.iter().filter(|(_, c)| *c).count(),
            1,
            "exactly one creator"
        );
        let ca = fs::read_to_string(&results[0].0.ca).expect("ca");
        assert!(ca.contains("BEGIN CERTIFICATE"));
        let (again, created) = ensure(&keyring).expect("again");
        assert!(!created);
        assert_eq!(fs::read_to_string(again.ca).expect("ca"), ca);
        // Nothing temporary is left behind.
        let left: Vec<_> = fs::read_dir(&keyring)
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tls-tmp"))
            .collect();
        assert!(left.is_empty());
        // The CA on disk issues certificates that load with their key.
        let loaded = Ca::load(
            &keyring.join(DIR).join(CA_CERT),
            &keyring.join(DIR).join(CA_KEY),
        )
        .expect("load ca");
        let (cert, key) = loaded.issue("x", &["x.example"]).expect("issue");
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
    }
}
