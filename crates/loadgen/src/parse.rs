//! Parsing of bench flags that clap cannot type by itself: sizes, durations, targets.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// `64B`, `4KiB`, `1MiB` (also `4KB`/`1MB` as binary units, and a bare number of bytes).
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?}: expected <n>B, <n>KiB or <n>MiB"));
    }
    let n: usize = num
        .parse()
        .map_err(|_| format!("size {s:?}: number out of range"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => {
            return Err(format!(
                "size {s:?}: unknown unit {unit:?} (use B, KiB or MiB)"
            ))
        }
    };
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    // fedbus frames carry 32-bit payload lengths and the router caps bodies far below that.
    if v > 1 << 30 {
        return Err(format!("size {s:?} is over 1 GiB"));
    }
    Ok(v)
}

/// `10s`, `500ms`, `2m`, `0s`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s or m)"))?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("duration {s:?} has no number"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: number out of range"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

/// `0`, `0,2`, `1-3`, `0,2-3`.
pub(crate) fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("cores {s:?}: expected a list such as 0,2-3");
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a > b || b - a > 4096 {
                return Err(bad());
            }
            v.extend(a..=b);
        } else {
            v.push(part.parse().map_err(|_| bad())?);
        }
    }
    if v.is_empty() {
        return Err(format!("cores {s:?}: no core listed"));
    }
    let mut d = v.clone();
    d.sort_unstable();
    d.dedup();
    if d.len() != v.len() {
        return Err(format!("cores {s:?}: a core is listed twice"));
    }
    Ok(v)
}

/// What the load is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A running fedbus router's api listener: `http://`, `https://` (`tls`), `ws://` or
    /// `wss://` (`ws`: the websocket endpoint).
    Router {
        host: String,
        addr: SocketAddr,
        tls: bool,
        ws: bool,
    },
    /// A nats-server.
    Nats { host: String, addr: SocketAddr },
}

/// `http://`, `https://`, `ws://`, `wss://` or `nats://` `HOST:PORT` (a trailing `/` is
/// allowed).
pub(crate) fn parse_target(s: &str) -> Result<Target, String> {
    let (scheme, rest) = s.split_once("://").ok_or_else(|| {
        format!("target {s:?}: expected SCHEME://HOST:PORT (http, https, ws, wss, nats)")
    })?;
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return Err(format!(
            "target {s:?}: expected SCHEME://HOST:PORT (http, https, ws, wss, nats)"
        ));
    }
    let default_port = match scheme {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        "nats" => 4222,
        _ => {
            return Err(format!(
                "target {s:?}: scheme must be http, https, ws, wss or nats"
            ))
        }
    };
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("target {s:?}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("target {s:?}: resolves to no address"))?;
    let host = hostport.to_string();
    Ok(match scheme {
        "nats" => Target::Nats { host, addr },
        _ => Target::Router {
            host,
            addr,
            tls: scheme == "https" || scheme == "wss",
            ws: scheme == "ws" || scheme == "wss",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64B"), Ok(64));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert_eq!(parse_size("0B"), Ok(0));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("4GiB").is_err());
        assert!(parse_size("2048MiB").is_err());
        assert!(parse_size("-1B").is_err());
        assert!(parse_size("99999999999999999999B").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn cores() {
        assert_eq!(parse_cores("0"), Ok(vec![0]));
        assert_eq!(parse_cores("0,2-4"), Ok(vec![0, 2, 3, 4]));
        assert!(parse_cores("1,1").is_err());
        assert!(parse_cores("a").is_err());
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("").is_err());
    }

    #[test]
    fn targets() {
        let t = parse_target("http://127.0.0.1:8800").unwrap();
        assert_eq!(
            t,
            Target::Router {
                host: "127.0.0.1:8800".into(),
                addr: "127.0.0.1:8800".parse().unwrap(),
                tls: false,
                ws: false,
            }
        );
        let t = parse_target("https://127.0.0.1").unwrap();
        assert!(
            matches!(t, Target::Router { addr, tls: true, ws: false, .. } if addr.port() == 443)
        );
        let t = parse_target("wss://127.0.0.1:8443").unwrap();
        assert!(matches!(
            t,
            Target::Router {
                tls: true,
                ws: true,
                ..
            }
        ));
        let t = parse_target("ws://127.0.0.1:8800").unwrap();
        assert!(matches!(
            t,
            Target::Router {
                tls: false,
                ws: true,
                ..
            }
        ));
        let t = parse_target("nats://127.0.0.1/").unwrap();
        assert!(matches!(t, Target::Nats { addr, .. } if addr.port() == 4222));
        assert!(parse_target("ftp://x:1").is_err());
        assert!(parse_target("127.0.0.1:80").is_err());
        assert!(parse_target("http://h:1/path").is_err());
    }
}
