//! `fedbus run` and `fedbus task echo` launched by hand on a config file the test wrote: for
//! routers on fixed addresses (restarted, killed, taken over) and for starts that must fail,
//! where [`crate::Router`] (port 0, one config shape) does not fit.
//!
//! ```ignore
//! let log = home.join("router-1.log");
//! let (run, rx) = spawn_run(home, &cfg, &[], &log);
//! let ready = wait_ready(&run, &rx, START_TIMEOUT);
//! run.sig("TERM");
//! ```

use crate::{bin, fedbus, parse_ready_line, signal, Ready};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A process started by hand (a router or a task), killed (SIGKILL) and reaped on drop; when
/// the test panics, its log is printed.
pub struct Run {
    child: Option<Child>,
    log: PathBuf,
    plain: bool,
}

impl Run {
    /// Wraps `child`, whose output goes to `log`. [`Run::log`] returns the log as written
    /// (ANSI colors included).
    pub fn new(child: Child, log: PathBuf) -> Run {
        Run {
            child: Some(child),
            log,
            plain: false,
        }
    }

    /// The same, but [`Run::log`] (and the log printed on a panic) is [`plain`]: without ANSI
    /// color sequences.
    pub fn plain_log(mut self) -> Run {
        self.plain = true;
        self
    }

    /// The process id; panics when the process was reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -<s>` to the process.
    pub fn sig(&self, s: &str) {
        signal(self.pid(), s);
    }

    /// SIGKILL and reap (nothing when already reaped).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `within` (polling every 5 ms) for the process to exit and reaps it; None
    /// when it still runs then (or was already reaped).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// The log so far ([`plain`] when made with [`Run::plain_log`]).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if self.plain {
            plain(&text)
        } else {
            text
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log());
        }
    }
}

/// `text` without ANSI color sequences (the router colors its log).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts `fedbus run --config <cfg> [args]` with `FEDBUS_HOME=home` and `FEDBUS_LOG=info`,
/// stderr to `log`; returns it (raw log) and its stdout lines, read by a thread that keeps
/// draining them (so the router never blocks on its stdout).
pub fn spawn_run(
    home: &Path,
    cfg: &Path,
    args: &[&str],
    log: &Path,
) -> (Run, mpsc::Receiver<String>) {
    let (child, rx) = spawn_run_child(home, cfg, args, &[], log);
    (Run::new(child, log.to_path_buf()), rx)
}

/// [`spawn_run`] with more environment `envs` (after `FEDBUS_LOG`), as a bare child.
pub(crate) fn spawn_run_child(
    home: &Path,
    cfg: &Path,
    args: &[&str],
    envs: &[(String, String)],
    log: &Path,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(bin())
        .args(["run", "--config", cfg.to_str().expect("utf-8")])
        .args(args)
        .env("FEDBUS_HOME", home)
        .env("FEDBUS_LOG", "info")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("router log"))
        .spawn()
        .expect("spawn fedbus run");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits (up to `within`) for the ready line of `run` on `rx` (from [`spawn_run`]); panics
/// with its log when none comes.
pub fn wait_ready(run: &Run, rx: &mpsc::Receiver<String>, within: Duration) -> Ready {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(r) = parse_ready_line(&line) {
                    return r;
                }
            }
            Err(_) => panic!("no ready line within {within:?}:\n{}", run.log()),
        }
    }
}

/// Starts `fedbus task echo --router <internal> --keyring <keys> [args]` with
/// `FEDBUS_HOME=home`, stderr to `log` (not waited for: it links when it can). `internal` is
/// `host:port` or `unix:<path>`.
pub fn spawn_echo_task(
    home: &Path,
    internal: impl std::fmt::Display,
    keys: &Path,
    args: &[&str],
    log: PathBuf,
) -> Run {
    let child = Command::new(bin())
        .args(["task", "echo", "--router", &internal.to_string()])
        .args(["--keyring", keys.to_str().expect("utf-8")])
        .args(args)
        .env("FEDBUS_HOME", home)
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("task log"))
        .spawn()
        .expect("spawn task");
    Run::new(child, log)
}

/// A client token from `fedbus token client --app <app> --sub <sub> --keyring <keys>`.
pub fn client_token(home: &Path, keys: &Path, app: &str, sub: &str) -> String {
    fedbus(
        home,
        &[
            "token",
            "client",
            "--app",
            app,
            "--sub",
            sub,
            "--keyring",
            keys.to_str().expect("utf-8"),
        ],
    )
    .trim()
    .to_string()
}

/// A service token for `app` valid one hour, from `fedbus token service --task-id <task_id>
/// --app <app> --keyring <keys> --ttl 1h` (role unset).
pub fn service_token(home: &Path, keys: &Path, app: &str, task_id: &str) -> String {
    let keys = keys.to_str().expect("utf-8");
    let args = [
        "token",
        "service",
        "--task-id",
        task_id,
        "--app",
        app,
        "--keyring",
        keys,
        "--ttl",
        "1h",
    ];
    fedbus(home, &args).trim().to_string()
}

/// Starts `fedbus run --config <cfg> [args]` with `FEDBUS_HOME=home` and `FEDBUS_LOG=info`,
/// stdout and stderr both into the file `out` (one file description: Rust's stdout is
/// line-buffered, so the ready line is there as soon as it is printed).
pub fn spawn_run_to_file(home: &Path, cfg: &Path, args: &[&str], out: &Path) -> Child {
    let f = std::fs::File::create(out).expect("out file");
    Command::new(bin())
        .args(["run", "--config", cfg.to_str().expect("utf-8")])
        .args(args)
        .env("FEDBUS_HOME", home)
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("clone"))
        .stderr(f)
        .spawn()
        .expect("spawn fedbus run")
}

/// Runs `fedbus run --config <cfg> [args]` (output in `out`, as [`spawn_run_to_file`])
/// expecting it to fail: (status, its output as written, time it took). Panics, with the
/// output, when it still runs after `within`.
pub fn run_expect_failure(
    home: &Path,
    cfg: &Path,
    args: &[&str],
    out: &Path,
    within: Duration,
) -> (ExitStatus, String, Duration) {
    let start = Instant::now();
    let mut child = spawn_run_to_file(home, cfg, args, out);
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`fedbus run` ({}) still running after {within:?} (expected a failure):\n{}",
                out.display(),
                std::fs::read_to_string(out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        st,
        std::fs::read_to_string(out).unwrap_or_default(),
        start.elapsed(),
    )
}

/// `net.ipv4.tcp_migrate_req` is 1 (set here when it can be: the tests run as root in CI), so
/// that connections queued on a listener that closes move to the rest of its SO_REUSEPORT
/// group instead of being reset (docs/FEDERATION.md, "Takeover").
pub fn migrate_req_on() {
    const P: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if std::fs::read_to_string(P).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    let _ = std::fs::write(P, "1");
    let now = std::fs::read_to_string(P).unwrap_or_default();
    assert_eq!(
        now.trim(),
        "1",
        "a takeover without {P} = 1 resets queued connections; run as root or sysctl -w net.ipv4.tcp_migrate_req=1"
    );
}
