//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`. A plain thread with
//! blocking sockets: it is never on the request path and serves one scrape at a time.

use super::Registry;
use crate::control::Snapshots;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Binds and serves in a background thread; returns the bound address.
pub(crate) fn start(
    addr: SocketAddr,
    reg: Registry,
    snaps: Snapshots,
) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("admin listener {addr}: {e}"))?;
    let bound = l.local_addr()?;
    std::thread::Builder::new()
        .name("fedbus-admin".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = serve(s, &reg, &snaps);
            }
        })?;
    Ok(bound)
}

fn serve(mut s: TcpStream, reg: &Registry, snaps: &Snapshots) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let r = s.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let path = match req.parse(&buf[..n]) {
        Ok(_) => req.path.unwrap_or("/"),
        Err(_) => "",
    };
    let (status, ctype, body) = match path {
        "/metrics" => {
            let table = snaps.routes.load();
            let keys = snaps.keys.load();
            let extra = format!(
                "# HELP fedbus_routing_generation Generation of the published routing snapshot.\n# TYPE fedbus_routing_generation gauge\nfedbus_routing_generation {}\n# HELP fedbus_keyring_generation Generation of the published keyring.\n# TYPE fedbus_keyring_generation gauge\nfedbus_keyring_generation {}\n",
                table.generation, keys.generation
            );
            (200, "text/plain; version=0.0.4", super::render(reg, &extra))
        }
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" => (200, "text/plain", "ready\n".to_string()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::proto::http::reason(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}
