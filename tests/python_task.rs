//! docs/PROTOCOL.md is complete enough to write a task from: `tests/python/echo_task.py` was
//! written from it alone, and this test runs it against a real two-shard router. The worked
//! example's hex dumps in the doc are checked against `fedbus_proto::encode_frame`.

use bytes::BytesMut;
use fedbus_proto::{encode_frame, put_meta, tag, Kind};
use fedbus_testkit::attack::BackToBack;
use fedbus_testkit::{ReadRetrying, Req};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fedbus");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
const TASK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/python/echo_task.py"
);

// ---------------------------------------------------------------------------------------------
// The worked example of docs/PROTOCOL.md section 9.

/// The text of the doc between `<!-- NAME -->` and `<!-- /NAME -->`.
fn doc_between(name: &str) -> String {
    let doc = std::fs::read_to_string(DOC).expect("read docs/PROTOCOL.md");
    let open = format!("<!-- {name} -->");
    let close = format!("<!-- /{name} -->");
    let start = doc
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in the doc"))
        + open.len();
    let end = start
        + doc[start..]
            .find(&close)
            .unwrap_or_else(|| panic!("no {close} in the doc"));
    doc[start..end].to_string()
}

/// Bytes of the hex block between `<!-- NAME -->` and `<!-- /NAME -->`: per line, the hex
/// pairs before the `|` annotation; fence lines are skipped.
fn doc_hex(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in doc_between(name).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("```") {
            continue;
        }
        let hex = line.split('|').next().unwrap_or("");
        for t in hex.split_whitespace() {
            let b = u8::from_str_radix(t, 16)
                .unwrap_or_else(|_| panic!("{name}: {t:?} is not a hex byte in line {line:?}"));
            out.push(b);
        }
    }
    assert!(!out.is_empty(), "{name}: empty hex block");
    out
}

/// The lines of the fenced block between `<!-- NAME -->` and `<!-- /NAME -->`.
fn doc_block(name: &str) -> Vec<String> {
    let lines: Vec<String> = doc_between(name)
        .trim()
        .lines()
        .filter(|l| !l.starts_with("```"))
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "{name}: empty block");
    lines
}

#[test]
fn worked_example_in_doc_matches_encoder() {
    // What dispatch writes for POST /api/local/dev/demo/echo/shop/42/cart/add, sub alice.
    let mut m = BytesMut::new();
    put_meta(&mut m, tag::APP, b"demo/echo");
    put_meta(&mut m, tag::ROLE, b"main");
    put_meta(&mut m, tag::SERVICE, b"shop");
    put_meta(&mut m, tag::MODULE, b"cart");
    put_meta(&mut m, tag::FUNCTION, b"add");
    fedbus_proto::put_meta_u64(&mut m, tag::WSID, 42);
    put_meta(&mut m, tag::METHOD, b"POST");
    put_meta(&mut m, tag::SUBJECT, b"alice");
    put_meta(&mut m, tag::CONTENT_TYPE, b"text/plain");
    let req = encode_frame(Kind::Request, 0, 0, 42 % 16, 1, &m, b"hello");
    assert_eq!(
        doc_hex("example-request"),
        &req[..],
        "docs/PROTOCOL.md example-request"
    );
    assert_eq!(req.len(), 101);

    let mut m = BytesMut::new();
    put_meta(&mut m, tag::STATUS, b"200");
    put_meta(&mut m, tag::HEADER, b"python-task: yes");
    put_meta(&mut m, tag::CONTENT_TYPE, b"text/plain");
    let resp = encode_frame(Kind::Response, 0, 0, 10, 1, &m, b"hello");
    assert_eq!(
        doc_hex("example-response"),
        &resp[..],
        "docs/PROTOCOL.md example-response"
    );
    let f = fedbus_proto::Frame::decode(resp.freeze()).expect("decodes");
    assert_eq!(f.get_u64(tag::STATUS), Some(200));
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// Child processes, killed on drop (also when an assertion fails).
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("fedbus-pytask-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Python 3 that has `websockets`; the test fails (does not skip) without one.
pub(crate) fn python() -> String {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import websockets"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return py.to_string();
        }
    }
    panic!(
        "`python3 -c 'import websockets'` fails: install python3-websockets \
         (apt-get install -y python3-websockets, or pip install websockets); CI installs it"
    );
}

fn fedbus_out(home: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("FEDBUS_HOME", home)
        .stdin(Stdio::null())
        .output()
        .expect("run fedbus");
    assert!(
        out.status.success(),
        "fedbus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

struct Router {
    api: String,
    internal: Vec<String>,
    admin: String,
}

/// Starts `fedbus run` with two shards on ephemeral ports and reads its listener lines.
fn start_router(procs: &mut Procs, dir: &Path, keyring: &Path) -> Router {
    let cfg = dir.join("router.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"region = "local"
cluster = "dev"
router = "r0"
keyring = "{}"

[listen]
api = "127.0.0.1:0"
internal = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tuning]
shard_cores = [0, 1]
pin = false

[[apps]]
name = "demo/echo"
partitions = 16
"#,
            keyring.display()
        ),
    )
    .expect("write config");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("FEDBUS_HOME", dir)
        .env("FEDBUS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start fedbus run");
    let stdout = child.stdout.take().expect("stdout");
    procs.0.push(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Reads to the end even once nobody waits on the lines: a pipe closed early would
        // hand the router EPIPE on its next banner line.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let (mut api, mut internal, mut admin) = (None, Vec::new(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("router did not print its listeners in 30 s");
        let mut w = line.split_whitespace();
        match w.next() {
            // `  api       http://127.0.0.1:PORT  (HTTP/1.1, websocket /api/ws)`
            Some("api") => {
                api = w
                    .next()
                    .map(|a| a.trim_start_matches("http://").to_string())
            }
            // `  admin     http://127.0.0.1:PORT/metrics`
            Some("admin") => {
                admin = w.next().map(|a| {
                    a.trim_start_matches("http://")
                        .trim_end_matches("/metrics")
                        .to_string()
                })
            }
            // `  internal  127.0.0.1:PORT  shard K on core C`
            Some("internal") => internal.push(w.next().expect("internal addr").to_string()),
            Some("keyring") => break,
            _ => {}
        }
    }
    let api = api.expect("api line");
    assert_eq!(internal.len(), 2, "two shards: {internal:?}");
    let admin = admin.expect("admin line");
    Router {
        api,
        internal,
        admin,
    }
}

// ---------------------------------------------------------------------------------------------
// A small blocking HTTP/1.1 client.

struct HttpResp {
    /// The head as received, status line to the blank line.
    head: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_response(s: &mut TcpStream) -> std::io::Result<HttpResp> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read_retrying(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read_retrying(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(HttpResp {
        head,
        status,
        headers,
        body,
    })
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.set_nodelay(true);
    s
}

fn post(s: &mut TcpStream, path: &str, jwt: &str, body: &[u8]) -> std::io::Result<HttpResp> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: fedbus\r\nAuthorization: Bearer {jwt}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    read_response(s)
}

fn path(wsid: u64) -> String {
    format!("/api/local/dev/demo/echo/svc/{wsid}/mod/echo")
}

// ---------------------------------------------------------------------------------------------

#[test]
fn python_task_written_from_the_doc_serves_requests() {
    let py = python();
    let tmp = TempDir::new();
    let keyring = tmp.0.join("keys");
    let ks = keyring.to_str().expect("utf-8 path");
    let mut procs = Procs::default();

    // The keyring the router then loads (a token command does not make one at a path it is
    // given: a typo would mint tokens no router knows).
    fedbus_out(
        &tmp.0,
        &["keys", "init", "--keyring", ks, "--app", "demo/echo"],
    );
    let token = fedbus_out(
        &tmp.0,
        &[
            "token",
            "service",
            "--task-id",
            "py",
            "--app",
            "demo/echo",
            "--keyring",
            ks,
        ],
    );
    assert!(token.starts_with("fbs1."), "service token: {token}");
    let jwt = fedbus_out(
        &tmp.0,
        &[
            "token",
            "client",
            "--app",
            "demo/echo",
            "--sub",
            "py-test",
            "--keyring",
            ks,
        ],
    );
    let router = start_router(&mut procs, &tmp.0, &keyring);

    // Section 3: no token, no upgrade: 401 with the JSON body the doc shows.
    {
        let mut s = connect(&router.internal[1]);
        s.write_all(
            b"GET /link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        let r = read_response(&mut s).expect("401 answer");
        assert_eq!(r.status, 401);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            r#"{"error":"missing_token","message":"service token required","status":401}"#
        );
    }

    procs.0.push(spawn_task(&py, &router, &token));

    // Wait until both shards answer 200 (the task links to shard 0, then to shard 1).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ready = BTreeSet::new();
    let mut last = String::new();
    while ready.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the python task did not serve both shards within 10 s (shards ready: {ready:?}; last answer: {last})"
        );
        let mut s = connect(&router.api);
        match post(&mut s, &path(1), &jwt, b"ping") {
            Ok(r) if r.status == 200 => {
                ready.insert(r.header("fedbus-shard").unwrap_or("?").to_string());
            }
            Ok(r) => last = format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Bodies round-trip byte-identical over several connections, both shards.
    let mut big = vec![0u8; 1 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i * 31 + i / 251) as u8;
    }
    let bodies: [&[u8]; 4] = [b"", b"hello", &big[..64 * 1024], &big];
    let mut shards = BTreeSet::new();
    for conn in 0..16u64 {
        let mut s = connect(&router.api);
        for (k, body) in bodies.iter().enumerate() {
            let wsid = conn * 4 + k as u64;
            let r = post(&mut s, &path(wsid), &jwt, body)
                .unwrap_or_else(|e| panic!("connection {conn}, body {}: {e}", body.len()));
            assert_eq!(
                r.status,
                200,
                "body {} B: {}",
                body.len(),
                String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
            );
            assert_eq!(r.header("python-task"), Some("yes"), "{:?}", r.headers);
            assert_eq!(
                r.header("fedbus-partition"),
                Some((wsid % 16).to_string().as_str())
            );
            assert_eq!(r.header("fedbus-hops"), Some("0"));
            assert_eq!(
                r.header("content-type"),
                Some("application/octet-stream"),
                "the task echoes CONTENT_TYPE"
            );
            assert!(
                r.body == *body,
                "body of {} B did not round-trip (got {} B)",
                body.len(),
                r.body.len()
            );
            shards.insert(r.header("fedbus-shard").unwrap_or("?").to_string());
        }
    }
    let want: BTreeSet<String> = ["0", "1"].iter().map(|s| s.to_string()).collect();
    assert_eq!(shards, want, "requests were served by both shards");

    // Section 9: the worked example's HTTP answer, header for header and in order (only the
    // value of fedbus-shard depends on the shard that took the connection).
    let mut s = connect(&router.api);
    let head = format!(
        "POST /api/local/dev/demo/echo/shop/42/cart/add HTTP/1.1\r\nHost: fedbus\r\n\
         Authorization: Bearer {jwt}\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("worked example answer");
    let shard = r.header("fedbus-shard").unwrap_or("?").to_string();
    let got = format!("{}{}", r.head, String::from_utf8_lossy(&r.body))
        .replace(&format!("fedbus-shard: {shard}\r\n"), "fedbus-shard: 0\r\n");
    let want = doc_block("example-http").join("\r\n");
    assert_eq!(
        got, want,
        "docs/PROTOCOL.md section 9: the client's answer (got it from shard {shard})"
    );

    // Section 4, "Stopping": a second task joins, then the first stops on SIGTERM while four
    // clients send back to back; it sends `draining`, answers what arrives until the router's
    // `drained`, closes and exits 0, and no client sees a failure.
    procs.0.push(spawn_task(&py, &router, &token));
    let deadline = Instant::now() + Duration::from_secs(10);
    while task_links(&router.admin) < 4 {
        assert!(
            Instant::now() < deadline,
            "the second python task did not link both shards within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let api: std::net::SocketAddr = router.api.parse().expect("api address");
    let load = BackToBack::start(api, 4, |c| {
        Req::post(&path(c as u64)).token(&jwt).body(b"stop").bytes()
    });
    // Both tasks under load a while before the stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.answered() < 200 {
        assert!(
            Instant::now() < deadline,
            "the clients got fewer than 200 answers in 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = &mut procs.0[1];
    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "SIGTERM to the python task");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(st) = first.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the python task did not exit 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = load.stop();
    println!("answers while the first python task stopped: {seen:?}; it exited {exit:?}");
    assert!(exit.success(), "{exit:?}");
    assert!(seen.get("200").is_some_and(|n| *n > 20), "{seen:?}");
    assert_eq!(
        seen.len(),
        1,
        "a request failed while the task stopped: {seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while task_links(&router.admin) != 2 {
        assert!(
            Instant::now() < deadline,
            "the stopped task's links not closed, or the second task's gone: {} links",
            task_links(&router.admin)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `echo_task.py` for all partitions of demo/echo, linked to `router`'s shard 0.
fn spawn_task(py: &str, router: &Router, token: &str) -> Child {
    spawn_echo(py, &router.internal[0], token, Stdio::inherit())
}

/// `echo_task.py` for all partitions of demo/echo, linked to `internal`, its log (stderr; it
/// writes nothing to stdout) to `stderr`.
pub(crate) fn spawn_echo(py: &str, internal: &str, token: &str, stderr: impl Into<Stdio>) -> Child {
    Command::new(py)
        .arg(TASK)
        .args(["--router", internal, "--token", token])
        .args(["--app", "demo/echo", "--partitions", "0-15"])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(stderr)
        .spawn()
        .expect("start python3 echo_task.py")
}

/// `fedbus_task_links` summed over the shards, from the router's admin listener.
fn task_links(admin: &str) -> u64 {
    let mut s = connect(admin);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("GET /metrics");
    let r = read_response(&mut s).expect("metrics");
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            let name = name.split('{').next()?;
            (name == "fedbus_task_links").then(|| value.trim().parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}
