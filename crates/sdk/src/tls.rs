//! Task links over TLS (`wss://`), to routers with `[listen] internal_tls = true`: the router
//! serves its internal listener with the api listener's certificates, and the task trusts only
//! the CA certificates of [`crate::TaskOptions::tls_ca`] (no system roots), checking the
//! router's certificate against the host it dials (an IP address or a DNS name). The same
//! config as the router's built-in task runner (`fedbus task --tls-ca`): ring, TLS 1.3 and 1.2,
//! no client certificate.

use crate::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// The client config of every link: trusts every certificate of the PEM file `ca`, and only
/// those. A missing, unreadable or empty file, or a certificate rustls cannot use as a trust
/// anchor, is [`Error::Options`].
pub(crate) fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, Error> {
    let bad = |m: String| Error::Options(format!("tls_ca {}: {m}", ca.display()));
    // Read first, so that a missing file says so (the PEM iterator would too, less plainly).
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| bad(format!("bad CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // As the router's own dialers: the upgrade that follows is HTTP/1.1.
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// The TLS reason inside an I/O error of the handshake (tokio-rustls wraps rustls' errors in
/// `io::Error`), e.g. `invalid peer certificate: UnknownIssuer`; None for other I/O errors.
pub(crate) fn reason(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, body: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "fedbus-sdk-tls-{}-{}-{name}",
            std::process::id(),
            crate::random_u64()
        ));
        std::fs::write(&p, body).expect("write temp file");
        p
    }

    #[test]
    fn bad_ca_files_are_option_errors() {
        let missing = std::env::temp_dir().join("fedbus-sdk-tls-no-such-file.pem");
        let empty = temp("empty.pem", b"");
        let key_only = temp(
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let garbage = temp(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        for (p, want) in [
            (&missing, "No such file"),
            (&empty, "no CERTIFICATE"),
            (&key_only, "no CERTIFICATE"),
            (&garbage, "bad CA certificate"),
        ] {
            match client_config(p) {
                Err(Error::Options(m)) => assert!(m.contains(want), "{}: {m}", p.display()),
                other => panic!("{}: {other:?}", p.display()),
            }
        }
        for p in [empty, key_only, garbage] {
            let _ = std::fs::remove_file(p);
        }
    }
}
