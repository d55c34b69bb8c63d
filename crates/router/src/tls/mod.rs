//! TLS on the api listener (`listen.api_tls`) and the internal listener
//! (`listen.internal_tls`), mutual TLS on peer links ([`peer`]): certificates from PEM files, an SNI resolver
//! among several certificates, the rustls server config (ring, TLS 1.3 and 1.2, ALPN
//! `http/1.1`, session resumption), reloading, and the dev CA ([`dev`]).
//!
//! Who runs what: [`ServerTls::load`] on the main thread at start; [`Reloader`] on the control
//! thread (mtime poll and SIGHUP), which swaps the resolver's certificate set with one atomic
//! store; the handshakes on the shard that accepted the connection ([`accept`]). A reload never
//! touches an open connection: its session keys do not depend on the certificate after the
//! handshake. A reload that fails (a missing file, a key that does not match) keeps the
//! certificates in force and logs why.

pub mod dev;
pub mod peer;

use crate::config::{CertFiles, Tls as TlsConfig};
use anyhow::{anyhow, Context};
use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// The certificates in force: the first is the default.
#[derive(Debug)]
pub struct CertSet {
    certs: Vec<Arc<CertifiedKey>>,
}

impl CertSet {
    /// Reads every certificate chain and key; the first error names the file.
    pub fn load(files: &[CertFiles]) -> anyhow::Result<CertSet> {
        let provider = rustls::crypto::ring::default_provider();
        let mut certs = Vec::with_capacity(files.len());
        for f in files {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
                .with_context(|| format!("certificate {}", f.cert.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("certificate {}", f.cert.display()))?;
            if chain.is_empty() {
                anyhow::bail!("certificate {}: no CERTIFICATE in it", f.cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(&f.key)
                .with_context(|| format!("private key {}", f.key.display()))?;
            let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                anyhow!(
                    "certificate {} with key {}: {e}",
                    f.cert.display(),
                    f.key.display()
                )
            })?;
            certs.push(Arc::new(ck));
        }
        if certs.is_empty() {
            anyhow::bail!("tls.certs: no certificate");
        }
        Ok(CertSet { certs })
    }

    /// The certificate for the client's SNI name: the first valid for that name (DNS name or
    /// wildcard, as a client would check it), else the default. SNI never names an IP address
    /// (RFC 6066; rustls drops one a client sends): a client dialing an IP gets the default.
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = sni.and_then(|n| ServerName::try_from(n).ok()) {
            for ck in &self.certs {
                let valid = ck.end_entity_cert().ok().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                });
                if valid {
                    return ck.clone();
                }
            }
        }
        self.certs[0].clone()
    }
}

/// Picks a certificate per handshake from the set in force; the control thread swaps the set.
#[derive(Debug)]
pub struct Resolver {
    current: ArcSwap<CertSet>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()))
    }
}

/// A dialing router presents the first certificate of the set (peer links have one).
impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certs[0].clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Resolver {
    /// Loads `files` and a reloader that watches them.
    pub fn load(files: &[CertFiles]) -> anyhow::Result<(Arc<Resolver>, Reloader)> {
        let set = CertSet::load(files)?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(set),
        });
        let mtime = newest_mtime(files);
        let reloader = Reloader {
            racy: is_racy(mtime),
            mtime,
            read: contents(files),
            files: files.to_vec(),
            resolver: resolver.clone(),
            generation: 1,
            unreadable_polls: 0,
        };
        Ok((resolver, reloader))
    }
}

/// The first byte of a TLS connection: a handshake record.
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a connection on a TLS listener got no TLS stream.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Plain HTTP on the TLS port: answered `400 tls_required` and closed, as nginx answers
    /// "The plain HTTP request was sent to HTTPS port" (a TLS alert would read as garbage).
    PlainHttp,
    /// The TLS handshake failed.
    Failed(std::io::Error),
    /// Not complete within `limits.handshake_timeout_ms`.
    TimedOut,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::PlainHttp => f.write_str("plain HTTP on the TLS port (answered 400)"),
            Refused::Failed(e) => write!(f, "{e}"),
            Refused::TimedOut => f.write_str("not complete within limits.handshake_timeout_ms"),
        }
    }
}

/// The server handshake of a connection accepted on the api or internal listener with TLS,
/// within `limit` (`limits.handshake_timeout_ms`). A client whose first byte is an ASCII
/// capital (an HTTP method) where TLS starts with a handshake record gets
/// `400 tls_required` saying `hint`, within the same deadline, then a lingering close (at most
/// 1 s more, as every closing HTTP answer); any other first byte goes to rustls, which refuses
/// it.
///
/// The ClientHello is read first (`LazyConfigAcceptor`), then the handshake goes on with
/// `config`: a ClientHello that `config` refuses (ALPN `h2` only, no common cipher suite) is
/// answered with its alert (`no_application_protocol`, ...), written as the socket allows.
/// With `TlsAcceptor::accept` the client read a reset instead of that alert.
pub(crate) async fn accept(
    config: &Arc<ServerConfig>,
    mut tcp: glommio::net::TcpStream,
    limit: std::time::Duration,
    hint: &str,
) -> Result<crate::ws::stream::TlsStream, Refused> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use glommio::timer::timeout;
    let until = std::time::Instant::now() + limit;
    let left = || until.saturating_duration_since(std::time::Instant::now());
    let mut first = [0u8; 1];
    let peeked = timeout(limit, async { Ok(tcp.peek(&mut first).await) }).await;
    match peeked {
        Err(_) => return Err(Refused::TimedOut),
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
            // What the client sent is dropped; the lingering close reads the rest.
            let answer = crate::ws::handshake::error_response(400, "tls_required", hint);
            let answered = timeout(left(), async {
                // On the heap, not in every TLS connection's future.
                let mut chunk = vec![0u8; 4096];
                let _ = tcp.read(&mut chunk).await;
                Ok(tcp.write_all(answer.as_bytes()).await)
            })
            .await;
            if matches!(answered, Ok(Ok(()))) {
                crate::api::http::lingering_close(&mut tcp, crate::api::http::LINGER).await;
            }
            return Err(Refused::PlainHttp);
        }
        // Closed, an error, or a TLS record: rustls says which.
        Ok(_) => {}
    }
    timeout(left(), async {
        let start =
            futures_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        Ok(match start.await {
            Ok(start) => start.into_stream(config.clone()).await,
            Err(e) => Err(e),
        })
    })
    .await
    .map_err(|_| Refused::TimedOut)?
    .map_err(Refused::Failed)
}

/// The TLS server side of a router: the config every shard's acceptor shares, and what the
/// control thread needs to reload it.
pub struct ServerTls {
    /// Shared by every shard's acceptor (its session cache and ticket keys too, so a client
    /// resumes on any shard).
    pub config: Arc<ServerConfig>,
    /// Reloads the certificates; belongs on the control thread.
    pub reloader: Reloader,
}

impl ServerTls {
    /// Loads `cfg.certs` and builds the server config.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<ServerTls> {
        let (resolver, reloader) = Resolver::load(&cfg.certs)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c.session_storage = if cfg.session_cache > 0 {
            rustls::server::ServerSessionMemoryCache::new(cfg.session_cache)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        if cfg.tickets {
            c.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS ticket keys")?;
        }
        Ok(ServerTls {
            config: Arc::new(c),
            reloader,
        })
    }
}

/// Watches the certificate files and swaps the resolver's set when they change. Runs only on
/// the control thread.
pub struct Reloader {
    files: Vec<CertFiles>,
    resolver: Arc<Resolver>,
    mtime: Option<SystemTime>,
    /// `mtime` was less than `control::RACY` old when the files were read: a write in the same
    /// clock tick would not move it, so the next poll reads the files again.
    racy: bool,
    /// The files' bytes as last read (loaded or refused).
    read: Option<Vec<u8>>,
    generation: u64,
    /// Polls in a row that found a file unreadable (one being replaced is gone for an
    /// instant; one gone for [`UNREADABLE_WARN_POLLS`] is logged once).
    unreadable_polls: u32,
}

/// A certificate or key file unreadable at this many polls in a row is logged (once, until it
/// is back): the old certificates still serve, and the operator should know the files are not
/// what the router serves.
const UNREADABLE_WARN_POLLS: u32 = 3;

/// Every file's bytes, one after the other (None when one is unreadable).
fn contents(files: &[CertFiles]) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    for f in files {
        all.extend(std::fs::read(&f.cert).ok()?);
        all.extend(std::fs::read(&f.key).ok()?);
    }
    Some(all)
}

fn is_racy(mtime: Option<SystemTime>) -> bool {
    mtime.is_some_and(|m| m > SystemTime::now() - crate::control::RACY)
}

/// Newest modification time among `files` (None when one is unreadable: a file being replaced).
fn newest_mtime(files: &[CertFiles]) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut newest = SystemTime::UNIX_EPOCH;
    for f in files {
        newest = newest.max(m(&f.cert)?).max(m(&f.key)?);
    }
    Some(newest)
}

impl Reloader {
    /// Reloads when a file's mtime moved since the last look, or when the last look read files
    /// written less than `control::RACY` before (and they now differ). Files are often
    /// replaced in two steps (`fedbus keys cert` writes the key, then the certificate): a look
    /// between the two finds a pair that does not match, keeps the old set and is retried at
    /// the next change. When the second write lands in the same clock tick as the first, the
    /// mtime does not move; the racy look catches it (before, such a renewal was never
    /// loaded: 1 to 5 of 20 quick renewals in a probe).
    pub fn poll(&mut self) {
        let now = newest_mtime(&self.files);
        if now.is_none() {
            self.unreadable_polls = self.unreadable_polls.saturating_add(1);
            if self.unreadable_polls == UNREADABLE_WARN_POLLS {
                let files: Vec<String> = self
                    .files
                    .iter()
                    .flat_map(|f| [&f.cert, &f.key])
                    .filter(|p| std::fs::metadata(p).is_err())
                    .map(|p| p.display().to_string())
                    .collect();
                tracing::warn!(files = %files.join(", "), "TLS certificate files unreadable; the certificates loaded before still serve");
            }
            return;
        }
        if std::mem::take(&mut self.unreadable_polls) >= UNREADABLE_WARN_POLLS {
            tracing::info!("TLS certificate files readable again");
        }
        if now == self.mtime && !self.racy {
            return;
        }
        self.mtime = now;
        self.racy = is_racy(now);
        let read = contents(&self.files);
        if read.is_some() && read == self.read {
            return;
        }
        self.read = read;
        self.load("certificate files changed");
    }

    /// Reads the files and, if they are all good, swaps them in (SIGHUP).
    pub fn reload(&mut self, why: &str) {
        self.mtime = newest_mtime(&self.files);
        self.racy = is_racy(self.mtime);
        self.read = contents(&self.files);
        self.load(why);
    }

    fn load(&mut self, why: &str) {
        match CertSet::load(&self.files) {
            Ok(set) => {
                self.generation += 1;
                // One atomic store: a handshake sees the old set or the new one.
                self.resolver.current.store(Arc::new(set));
                tracing::info!(
                    why,
                    generation = self.generation,
                    "TLS certificates reloaded"
                );
            }
            Err(e) => {
                tracing::error!(why, error = %format!("{e:#}"), "TLS certificate reload failed; keeping the previous certificates")
            }
        }
    }

    /// Times the set was loaded (1 at start).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_util::TempDir;

    fn issue(dir: &Path, ca: &dev::Ca, name: &str, sans: &[&str]) -> CertFiles {
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        let (cert, key) = ca.issue(name, sans).expect("issue");
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        files
    }

    #[test]
    fn sni_picks_the_matching_certificate_and_falls_back_to_the_first() {
        let dir = TempDir::new("tls-sni");
        let ca = dev::Ca::generate().expect("ca");
        let a = issue(dir.path(), &ca, "a", &["a.example", "127.0.0.1"]);
        let b = issue(dir.path(), &ca, "b", &["b.example", "*.wild.example"]);
        let set = CertSet::load(&[a, b]).expect("load");
        let is = |sni: Option<&str>, want: usize| {
            let got = set.pick(sni);
            assert!(
                Arc::ptr_eq(&got, &set.certs[want]),
                "{sni:?} should pick cert {want}"
            );
        };
        is(Some("a.example"), 0);
        is(Some("b.example"), 1);
        is(Some("x.wild.example"), 1);
        is(Some("unknown.example"), 0);
        is(None, 0);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_and_a_bad_reload_keeps_the_old_set() {
        let dir = TempDir::new("tls-reload");
        let ca = dev::Ca::generate().expect("ca");
        let a = issue(dir.path(), &ca, "a", &["a.example"]);
        let b = issue(dir.path(), &ca, "b", &["b.example"]);
        let crossed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        assert!(CertSet::load(std::slice::from_ref(&crossed)).is_err());
        let cfg = TlsConfig {
            certs: vec![a.clone()],
            ..TlsConfig::default()
        };
        let mut tls = ServerTls::load(&cfg).expect("load");
        let before = tls.reloader.resolver.current.load_full();
        std::fs::write(&a.key, "not a key").expect("corrupt");
        tls.reloader.reload("test");
        assert_eq!(
            tls.reloader.generation(),
            1,
            "a broken pair must not be published"
        );
        assert!(Arc::ptr_eq(
            &before,
            &tls.reloader.resolver.current.load_full()
        ));
        let (cert, key) = ca.issue("a", &["a.example"]).expect("reissue");
        std::fs::write(&a.cert, cert).expect("cert");
        std::fs::write(&a.key, key).expect("key");
        tls.reloader.reload("test");
        assert_eq!(tls.reloader.generation(), 2);
        // A renewal whose key lands before its certificate, in one mtime: the poll between
        // the two writes fails, and the next poll (the mtime is the same) loads the pair.
        let (cert, key) = ca.issue("a", &["a.example"]).expect("renew");
        std::fs::write(&a.key, key).expect("key");
        let m = std::fs::metadata(&a.key)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::File::options()
            .write(true)
            .open(&a.cert)
            .and_then(|f| f.set_modified(m))
            .expect("cert mtime");
        tls.reloader.poll();
        assert_eq!(
            tls.reloader.generation(),
            2,
            "a key without its certificate"
        );
        std::fs::write(&a.cert, cert).expect("cert");
        for f in [&a.cert, &a.key] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .and_then(|f| f.set_modified(m))
                .expect("same mtime");
        }
        tls.reloader.poll();
        assert_eq!(tls.reloader.generation(), 3, "the pair, in the same mtime");
        // A look that finds the bytes it read does nothing.
        tls.reloader.racy = true;
        tls.reloader.poll();
        assert_eq!(tls.reloader.generation(), 3);
        assert!(!Arc::ptr_eq(
            &before,
            &tls.reloader.resolver.current.load_full()
        ));
    }
}
