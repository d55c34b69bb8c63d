//! `https://` and `wss://`: the client side of TLS for the load generator. rustls with the
//! ring provider, trusting one CA file (`--cacert`), TLS 1.3 and 1.2, ALPN `http/1.1`, as
//! the router's own dialers (`fedbus_router::tls::peer::client_config`).
//!
//! One `ClientConfig` is shared by every connection of a run (all executors): its session
//! store holds the tickets the router sends, so a connection opened after another one
//! resumes instead of doing a full handshake. `--conn-per-request` measures full handshakes:
//! it gets a config with resumption off (unless `--resume`).
//!
//! The session store is [`TicketStore`], not rustls's `ClientSessionMemoryCache`: that one
//! keeps at most 8 TLS 1.3 tickets per server, so with more than 8 connections opening at
//! once the rest found no ticket and did full handshakes (37% of a `--resume` run with 16
//! connections was full handshakes).

use anyhow::Context as _;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, NamedGroup};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
        let mut c = (*base).clone();
        c.resumption = if resume {
            Resumption::store(Arc::new(TicketStore::default()))
        } else {
            Resumption::disabled()
        };
        let config = Arc::new(c);
        let name = fedbus_router::tls::peer::server_name(host)?;
        Ok(TlsClient { config, name })
    }

    /// A connector over the shared config.
    pub(crate) fn connector(&self) -> futures_rustls::TlsConnector {
        futures_rustls::TlsConnector::from(self.config.clone())
    }
}

/// TLS 1.3 tickets kept per server: enough for every connection of a run to find one (the
/// router sends two per handshake, each is used once).
const TICKETS_PER_SERVER: usize = 4096;

/// A client session store that keeps up to [`TICKETS_PER_SERVER`] TLS 1.3 tickets per
/// server; key-exchange hints and TLS 1.2 sessions go to rustls's own cache.
#[derive(Debug)]
pub(crate) struct TicketStore {
    other: ClientSessionMemoryCache,
    tickets: Mutex<HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>>,
}

impl Default for TicketStore {
    fn default() -> TicketStore {
        TicketStore {
            other: ClientSessionMemoryCache::new(64),
            tickets: Mutex::new(HashMap::new()),
        }
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.other.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.other.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.other.set_tls12_session(name, value)
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.other.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.other.remove_tls12_session(name)
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut all = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let q = all.entry(name).or_default();
        if q.len() == TICKETS_PER_SERVER {
            q.pop_front();
        }
        q.push_back(value);
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let mut all = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        // Newest first, as rustls's cache: the freshest ticket is the least likely expired.
        all.get_mut(name).and_then(|q| q.pop_back())
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
