//! `https://` and `wss://`: the client side of TLS for the load generator. rustls with the
//! ring provider, trusting one CA file (`--cacert`), TLS 1.3 and 1.2, ALPN `http/1.1`, as
//! the router's own dialers (`fedbus_router::tls::peer::client_config`).
//!
//! One `ClientConfig` is shared by every connection of a run (all executors): its session
//! store holds the tickets the router sends, so a connection opened after another one
//! resumes instead of doing a full handshake. `--conn-per-request` measures full handshakes:
//! it gets a config with resumption off (unless `--resume`).

use anyhow::Context as _;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::path::Path;
use std::sync::Arc;

/// What a connection needs to speak TLS to the target.
#[derive(Debug, Clone)]
pub(crate) struct TlsClient {
    /// Shared by every connection of the run (and so its session store).
    pub(crate) config: Arc<ClientConfig>,
    /// The name the router's certificate must be valid for (the target's host).
    pub(crate) name: ServerName<'static>,
}

impl TlsClient {
    /// Trusts the CA certificate(s) in `cacert` (PEM) and checks certificates against the
    /// host of `host` (`HOST:PORT`). `resume`: keep session resumption (the rustls default,
    /// tickets and session ids); off, every handshake is a full one.
    pub(crate) fn new(cacert: &Path, host: &str, resume: bool) -> anyhow::Result<TlsClient> {
        let base = fedbus_router::tls::peer::client_config(cacert)
            .with_context(|| format!("--cacert {}", cacert.display()))?;
        let config = if resume {
            base
        } else {
            let mut c = (*base).clone();
            c.resumption = Resumption::disabled();
            Arc::new(c)
        };
        let name = fedbus_router::tls::peer::server_name(host)?;
        Ok(TlsClient { config, name })
    }

    /// A connector over the shared config.
    pub(crate) fn connector(&self) -> futures_rustls::TlsConnector {
        futures_rustls::TlsConnector::from(self.config.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusts_the_ca_file_and_turns_resumption_off_for_full_handshakes() {
        let dir = std::env::temp_dir().join(format!("fedbus-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = fedbus_router::tls::dev::Ca::generate().unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, ca.cert_pem()).unwrap();
        let c = TlsClient::new(&pem, "127.0.0.1:8443", true).unwrap();
        assert_eq!(
            format!("{:?}", c.name),
            format!("{:?}", ServerName::try_from("127.0.0.1").unwrap())
        );
        let full = TlsClient::new(&pem, "localhost:8443", false).unwrap();
        assert!(!Arc::ptr_eq(&full.config, &c.config));
        assert!(TlsClient::new(&dir.join("missing.pem"), "localhost:1", true).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
