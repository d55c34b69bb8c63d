//! The system under test as child processes: a router and an echo task for the default
//! `fedbus bench` (no `--target`), echo tasks for `--direct`. Everything started here is killed
//! when the guard drops: at the end, on error, and after Ctrl-C (the bench turns SIGINT into an
//! orderly stop). Children also get SIGTERM if the bench itself dies (PR_SET_PDEATHSIG).

use anyhow::Context as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Child processes and their scratch directory; both go away on drop.
pub(crate) struct Guard {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Guard {
    /// Creates a fresh scratch directory under the system temp dir.
    pub(crate) fn new() -> anyhow::Result<Guard> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("fedbus-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Guard {
            children: Vec::new(),
            dir,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `bin args...` (under `taskset -c core` when asked and available), with
    /// `FEDBUS_HOME` set to the scratch dir and output to `<name>.log` there.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        bin: &Path,
        args: &[String],
        core: Option<usize>,
    ) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match core.filter(|_| have_taskset()) {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.args(args)
            .env("FEDBUS_HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({} {})", bin.display(), args.join(" ")))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Process id of the child started as `name` (the program itself when it was started
    /// without `taskset`).
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Fails if a child has exited, with the tail of its log.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.dir.join(format!("{name}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!(
                    "{name} exited ({status}); its log ends:\n{}",
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `N` ports that were free a moment ago on 127.0.0.1, all different: each is held until
/// every one is found (one at a time, the kernel may hand out a port just released again, and
/// a router with its api and api_tls on one port refuses to start).
pub(crate) fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for p in &mut ports {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
        *p = l.local_addr()?.port();
        held.push(l);
    }
    Ok(ports)
}

/// The certificates of `fedbus bench --tls`: a fresh CA and a router certificate for
/// `127.0.0.1` and `localhost` issued from it.
#[derive(Debug, Clone)]
pub(crate) struct BenchCerts {
    /// The CA certificate the load generator trusts.
    pub(crate) ca: PathBuf,
    /// The router's certificate.
    pub(crate) cert: PathBuf,
    /// Its key.
    pub(crate) key: PathBuf,
}

/// Makes [`BenchCerts`] in `dir/tls`.
pub(crate) fn bench_certs(dir: &Path) -> anyhow::Result<BenchCerts> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).with_context(|| format!("create {}", tls.display()))?;
    let ca = fedbus_router::tls::dev::Ca::generate().context("make the bench CA")?;
    let (cert, key) = ca
        .issue("fedbus bench", &["127.0.0.1", "localhost"])
        .context("issue the bench router certificate")?;
    let files = BenchCerts {
        ca: tls.join("ca.pem"),
        cert: tls.join("router.pem"),
        key: tls.join("router.key"),
    };
    for (path, text) in [
        (&files.ca, ca.cert_pem()),
        (&files.cert, cert.as_str()),
        (&files.key, key.as_str()),
    ] {
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(files)
}

/// Where the default bench's router runs, from the cores this process may use (ascending, at
/// least one): `(shard cores, control core)`, the shard on the second core and the control
/// thread (and the echo task) on the first; both on the only one.
pub(crate) fn router_cores(usable: &[usize]) -> (Vec<usize>, usize) {
    match usable {
        [first, second, ..] => (vec![*second], *first),
        [only] => (vec![*only], *only),
        [] => (vec![0], 0),
    }
}

/// The router config of the default bench (TOML for `fedbus run --config`); with `api_tls`,
/// an HTTPS listener on that address with that certificate.
pub(crate) fn router_config(
    api: SocketAddr,
    internal: SocketAddr,
    keyring: &Path,
    app: &str,
    shard_cores: &[usize],
    control_core: usize,
    api_tls: Option<(SocketAddr, &BenchCerts)>,
) -> String {
    let cores: Vec<String> = shard_cores.iter().map(usize::to_string).collect();
    let (tls_listen, tls_certs) = match api_tls {
        None => (String::new(), String::new()),
        Some((addr, c)) => (
            format!("api_tls = \"{addr}\"\n"),
            format!(
                "\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
                c.cert.display().to_string(),
                c.key.display().to_string()
            ),
        ),
    };
    format!(
        "# written by fedbus bench\nregion = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n\n[listen]\napi = \"{api}\"\n{tls_listen}internal = \"{internal}\"\nadmin_enabled = false\n\n[tuning]\nshard_cores = [{}]\ncontrol_core = {control_core}\n\n[[apps]]\nname = {app:?}\npartitions = 16\n{tls_certs}",
        keyring.display().to_string(),
        cores.join(", ")
    )
}

/// `config` (from [`router_config`]) with `tuning.spin_before_park_us = us`.
pub(crate) fn with_spin(config: &str, us: u64) -> String {
    debug_assert!(
        config.contains("[tuning]\n"),
        "router_config writes a [tuning] table"
    );
    config.replacen(
        "[tuning]\n",
        &format!("[tuning]\nspin_before_park_us = {us}\n"),
        1,
    )
}

/// One blocking request; the status code, or why there is none.
pub(crate) fn probe(addr: SocketAddr, path: &str, token: &str) -> Result<u16, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nping"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return Ok(resp.code.unwrap_or(0)),
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {}
            _ => return Err("malformed answer".into()),
        }
    }
}

/// Retries `probe` until it answers 200, for up to `limit`.
pub(crate) fn wait_ready(
    guard: &mut Guard,
    addr: SocketAddr,
    path: &str,
    token: &str,
    limit: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    let mut last = String::from("no attempt");
    while Instant::now() < until {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        guard.check_alive()?;
        match probe(addr, path, token) {
            Ok(200) => return Ok(()),
            Ok(s) => last = format!("status {s}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "the router at {addr} did not answer {path} with 200 within {}s (last: {last}); logs in {}",
        limit.as_secs(),
        guard.dir().display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_for_the_router() {
        let text = router_config(
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
            Path::new("/tmp/x/keys"),
            "demo/echo",
            &[0],
            0,
            None,
        );
        let c = fedbus_router::config::Config::parse(&text, "bench").unwrap();
        assert_eq!(c.listen.api.port(), 9001);
        assert_eq!(c.listen.internal.port(), 9002);
        assert!(!c.listen.admin_enabled);
        assert_eq!(c.tuning.shard_cores, vec![0]);
        assert_eq!(c.keyring_dir(), PathBuf::from("/tmp/x/keys"));
        assert_eq!(c.app_names(), vec!["demo/echo"]);
        assert!(c.listen.api_tls.is_none());
        assert_eq!(c.tuning.spin_before_park_us, 0);
        let spun = fedbus_router::config::Config::parse(&with_spin(&text, 100), "bench").unwrap();
        assert_eq!(spun.tuning.spin_before_park_us, 100);
        assert_eq!(spun.tuning.shard_cores, vec![0]);
    }

    /// The router follows the cores the bench may use, not core numbers from 0.
    #[test]
    fn router_cores_follow_the_usable_cores() {
        assert_eq!(router_cores(&[0, 1]), (vec![1], 0));
        assert_eq!(router_cores(&[4, 5, 6, 7]), (vec![5], 4));
        assert_eq!(router_cores(&[3]), (vec![3], 3));
    }

    #[test]
    fn tls_config_names_the_bench_certificates() {
        let g = Guard::new().unwrap();
        let certs = bench_certs(g.dir()).unwrap();
        let text = router_config(
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
            Path::new("/tmp/x/keys"),
            "demo/echo",
            &[1],
            0,
            Some(("127.0.0.1:9003".parse().unwrap(), &certs)),
        );
        let c = fedbus_router::config::Config::parse(&text, "bench").unwrap();
        assert_eq!(c.listen.api_tls.map(|a| a.port()), Some(9003));
        assert_eq!(c.tls.certs.len(), 1);
        assert_eq!(c.tls.certs[0].cert, certs.cert);
        fedbus_router::tls::ServerTls::load(&c.tls).expect("the certificate and key match");
    }

    #[test]
    fn guard_kills_children_and_removes_its_dir() {
        let mut g = Guard::new().unwrap();
        g.spawn("sleeper", Path::new("sleep"), &["30".into()], None)
            .unwrap();
        g.check_alive().unwrap();
        let dir = g.dir().to_path_buf();
        let start = Instant::now();
        drop(g);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(!dir.exists());
    }
}
