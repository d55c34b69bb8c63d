//! Mutual TLS on peer links (`[tls.peer]`). Every router of a federation holds a certificate
//! issued by the federation's CA for the host of its external address (`fedbus keys ca`, then
//! `fedbus keys cert --ca`). Both sides present it:
//!
//! - the dialer trusts only the federation CA and checks that the certificate of the router
//!   it reached is valid for the host it dialed (an impostor on that address, with a
//!   certificate of another CA or for another name, fails the handshake before the upgrade
//!   request, and so the peer token, is sent);
//! - the external listener requires a client certificate from the federation CA (a plaintext
//!   dialer, one without a certificate or with one of another CA fails before any request is
//!   read), and then one that names a router of the cluster whose peer token comes with it
//!   ([`names_one_of`]), so a router's certificate and another cluster's token do not mix.
//!
//! The router's own certificate reloads like the api listener's ([`super::Reloader`] on the
//! control thread, one atomic swap read by both the acceptor and the dialers); the CA is read
//! at start.

use super::{Reloader, Resolver};
use crate::config::{CertFiles, PeerTls as PeerTlsConfig};
use anyhow::{anyhow, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// TLS sessions the external listener remembers for resumption (a few per peer router).
const SESSION_CACHE: usize = 256;

/// The TLS configs of peer links, shared by every shard.
pub struct PeerTls {
    /// The external listener's side: requires a client certificate from the federation CA.
    pub server: Arc<ServerConfig>,
    /// The dialers' side: trusts only the federation CA, presents this router's certificate.
    pub client: Arc<ClientConfig>,
    /// Refuse plaintext peer links on the external listener.
    pub required: bool,
}

impl PeerTls {
    /// Reads the CA, this router's certificate and key; the reloader watches the latter two.
    pub fn load(cfg: &PeerTlsConfig) -> anyhow::Result<(PeerTls, Reloader)> {
        let roots = Arc::new(load_roots(&cfg.ca)?);
        let (resolver, reloader) = Resolver::load(&[CertFiles {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
        }])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("tls.peer: client verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        server.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS ticket keys")?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_client_cert_resolver(resolver);
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((
            PeerTls {
                server: Arc::new(server),
                client: Arc::new(client),
                required: cfg.required,
            },
            reloader,
        ))
    }
}

/// Every certificate in a PEM file, as trust anchors; an empty or unreadable file is an error.
pub fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("CA {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("CA {}", path.display()))?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| anyhow!("CA {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("CA {}: no CERTIFICATE in it", path.display());
    }
    Ok(roots)
}

/// A client config that trusts only the CA in `ca` (no client certificate): how a task dials
/// a router's internal listener over TLS.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let roots = load_roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// The host of `host:port` (`[v6]:port` too) as the name a dialed router's certificate must
/// be valid for.
pub fn server_name(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| anyhow!("{addr}: not a TLS name: {e}"))
}

/// True when the end-entity certificate `der` is valid for the host of one of `addrs`
/// (`host:port`): the check that a peer's client certificate belongs to a router of the
/// cluster its peer token names.
pub fn names_one_of(der: &CertificateDer<'_>, addrs: &[String]) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    addrs
        .iter()
        .any(|a| server_name(a).is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok()))
}

#[cfg(test)]
mod tests {
    use super::super::dev::Ca;
    use super::*;
    use crate::auth::test_util::TempDir;
    use rustls::{ClientConnection, ServerConnection};

    /// Writes a CA, and a router certificate from it for `names`, under `dir/<tag>-*`.
    fn setup(dir: &Path, tag: &str, ca: &Ca, names: &[&str]) -> PeerTlsConfig {
        let (cert, key) = ca.issue(names[0], names).expect("issue");
        let p = |s: &str| dir.join(format!("{tag}-{s}"));
        std::fs::write(p("ca.pem"), ca.cert_pem()).expect("ca");
        std::fs::write(p("r.pem"), cert).expect("cert");
        std::fs::write(p("r.key"), key).expect("key");
        PeerTlsConfig {
            ca: p("ca.pem"),
            cert: p("r.pem"),
            key: p("r.key"),
            required: true,
        }
    }

    /// Runs a handshake in memory; Err names the side that failed.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> Result<ServerConnection, String> {
        let mut c = ClientConnection::new(client, server_name(name).expect("name"))
            .map_err(|e| format!("client: {e}"))?;
        let mut s = ServerConnection::new(server).map_err(|e| format!("server: {e}"))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("read");
                s.process_new_packets()
                    .map_err(|e| format!("server: {e}"))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("read");
                c.process_new_packets()
                    .map_err(|e| format!("client: {e}"))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s);
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn both_sides_prove_they_come_from_the_federation_ca() {
        let dir = TempDir::new("tls-peer");
        std::fs::create_dir_all(dir.path()).expect("temp dir");
        let fed = Ca::generate().expect("ca");
        let (a, _) = PeerTls::load(&setup(dir.path(), "a", &fed, &["127.0.0.11"])).expect("a");
        let (b, _) = PeerTls::load(&setup(dir.path(), "b", &fed, &["127.0.0.21"])).expect("b");
        // a dials b: both certificates check out; b sees a's certificate.
        let s = handshake(a.client.clone(), b.server.clone(), "127.0.0.21:8950").expect("ok");
        let peer = &s.peer_certificates().expect("client certificate")[0];
        assert!(names_one_of(peer, &["127.0.0.11:8950".into()]));
        assert!(!names_one_of(peer, &["127.0.0.21:8950".into()]));

        // b's certificate does not name the host a dialed.
        let e = handshake(a.client.clone(), b.server.clone(), "127.0.0.99:8950").unwrap_err();
        assert!(e.starts_with("client:"), "{e}");

        // An impostor with a certificate of another CA, for the right name.
        let other = Ca::generate().expect("other ca");
        let (x, _) = PeerTls::load(&setup(dir.path(), "x", &other, &["127.0.0.21"])).expect("x");
        let e = handshake(a.client.clone(), x.server.clone(), "127.0.0.21:8950").unwrap_err();
        assert!(e.starts_with("client:"), "{e}");
        // The same impostor dialing b (trusting the federation CA, so that the handshake
        // gets as far as its own certificate): its client certificate is refused.
        let mut xc = setup(dir.path(), "x", &other, &["127.0.0.21"]);
        xc.ca = dir.path().join("a-ca.pem");
        let (x, _) = PeerTls::load(&xc).expect("x trusting the federation");
        let e = handshake(x.client.clone(), b.server.clone(), "127.0.0.21:8950").unwrap_err();
        assert!(e.starts_with("server:"), "{e}");
        // A dialer with no client certificate at all.
        let bare = client_config(&dir.path().join("a-ca.pem")).expect("bare");
        let e = handshake(bare, b.server.clone(), "127.0.0.21:8950").unwrap_err();
        assert!(e.starts_with("server:"), "{e}");
    }

    #[test]
    fn server_names_from_addresses() {
        let n = |a: &str| server_name(a).map(|n| n.to_str().into_owned());
        assert_eq!(n("127.0.0.1:8950").unwrap(), "127.0.0.1");
        assert_eq!(
            n("spb1.ru.heeus.cloud:8950").unwrap(),
            "spb1.ru.heeus.cloud"
        );
        assert_eq!(n("[::1]:8950").unwrap(), "::1");
        assert!(n("bad name:1").is_err());
    }
}
