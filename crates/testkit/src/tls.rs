//! TLS clients for the tests (rustls, ring): verifying configs from a dev CA, a probe that
//! accepts any certificate (to read which one was served), a connect that completes the
//! handshake, and the certificates a test issues.
//!
//! ```ignore
//! let pki = Pki::new("tls");
//! let a = pki.cert("a", &["a.test"]);
//! let r = Router::new().tls(&[a.clone()]).start();
//! let s = connect(r.api_tls.unwrap(), &verifying(&pki.ca, DEFAULT_VERSIONS, &[], false), "a.test")?;
//! assert!(peer_cert(&s) == der(&a.0));
//! ```

use crate::{dev_ca, dev_cert, TempDir, READ_TIMEOUT};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use rustls::DEFAULT_VERSIONS;

/// A TLS client connection over TCP.
pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// rustls's ring provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DER of the (first) certificate in the PEM file `pem`.
pub fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem)
        .expect("certificate PEM")
        .to_vec()
}

/// A client config that verifies against the CA file `ca`: protocol `versions`
/// ([`DEFAULT_VERSIONS`] for rustls's safe defaults), ALPN `alpn`, resumption on or off.
pub fn verifying(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
    resume: bool,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if !resume {
        c.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(c)
}

/// A certificate verifier that accepts any certificate (signatures are still checked) and
/// remembers nothing.
#[derive(Debug)]
pub struct AnyCert(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config that reads the served certificate whatever it is ([`AnyCert`]), with no
/// session to resume (every handshake is a full one and shows the certificate).
pub fn probe() -> Arc<ClientConfig> {
    let p = provider();
    let mut c = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(p)))
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// A TLS connection to `addr` (connect within 2 s, read and write timeouts [`READ_TIMEOUT`])
/// with SNI (and verification) `name`; the handshake completes here.
pub fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>, name: &str) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
    tcp.set_write_timeout(Some(READ_TIMEOUT))?;
    let name = ServerName::try_from(name.to_string()).expect("server name");
    let conn = ClientConnection::new(cfg.clone(), name).expect("client connection");
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The DER of the certificate the server sent on `s` (the leaf).
pub fn peer_cert(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().expect("server certificate")[0].to_vec()
}

/// Certificates of one fresh dev CA (`fedbus keys cert`), in a temp dir of their own.
pub struct Pki {
    dir: TempDir,
    /// The dev CA certificate.
    pub ca: PathBuf,
}

impl Pki {
    /// A fresh dir named after `tag`; the CA is made by the first [`Pki::cert`].
    pub fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let ca = dev_ca(dir.path());
        Pki { dir, ca }
    }

    /// A certificate for `names` written to `<dir>/<out>.pem` and `.key`: (cert, key).
    pub fn cert(&self, out: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        dev_cert(self.dir.path(), out, names)
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
