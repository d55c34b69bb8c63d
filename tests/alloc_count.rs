//! Heap allocations per routed request.
//!
//! A counting `#[global_allocator]` wraps the system allocator. The pure per-request steps of
//! the router (HTTP parse, path parse, routing lookup, frame decode, frame head encode) are
//! counted on the test's own thread and must allocate nothing. A whole request through a real
//! router (started in this process, echo task as a child process) is counted over all threads
//! and printed, not asserted: it is the number to drive down.
//!
//! `cargo test --release --test alloc_count -- --nocapture` shows the numbers.

use bytes::{BufMut, BytesMut};
use fedbus_auth::{sign_client_jwt, ClientClaims, Keyring};
use fedbus_proto::{self as proto, put_meta, put_meta_u64, tag, Frame, Kind};
use fedbus_router::api::http::{parse_one, Parsed};
use fedbus_router::route::{build, parse_api_path, AppSpec, Lookup, Registration};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Counting;

static ALL_ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALL_BYTES: AtomicU64 = AtomicU64::new(0);
/// Allocations by size class: bucket k holds sizes in (2^(k-1), 2^k].
static BY_SIZE: [AtomicU64; 24] = [const { AtomicU64::new(0) }; 24];

thread_local! {
    // const-initialised, no destructor: safe to touch from inside the allocator.
    static MINE: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    ALL_ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALL_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    let k = (usize::BITS - size.saturating_sub(1).leading_zeros()) as usize;
    BY_SIZE[k.min(23)].fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to `System`; the counters do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests run one at a time: the whole-request count is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Allocations made by this thread while `f` runs.
fn allocs_of<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = MINE.with(Cell::get);
    let r = f();
    (MINE.with(Cell::get) - before, r)
}

const PATH: &str = "/api/local/dev/demo/echo/api/7/sys/echo";
const N: usize = 1000;

fn http_request(token: &str) -> Vec<u8> {
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 64\r\n\r\n{}",
        "x".repeat(64)
    )
    .into_bytes()
}

#[test]
fn parse_one_of_a_pipelined_buffer_allocates_nothing_per_request() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let one = http_request("header.payload.signature");
    let mut buf = BytesMut::with_capacity(one.len() * (N + 1));
    for _ in 0..=N {
        buf.put_slice(&one);
    }
    // The first split of a fresh read buffer turns it into a shared one (one allocation per
    // buffer, not per request); count from the second request on.
    let Parsed::Request(_) = parse_one(&mut buf, 16 * 1024, 1 << 20) else {
        panic!("first request")
    };
    let mut reqs = Vec::with_capacity(N);
    let (n, ()) = allocs_of(|| {
        for _ in 0..N {
            match parse_one(&mut buf, 16 * 1024, 1 << 20) {
                Parsed::Request(r) => reqs.push(r),
                _ => panic!("complete request expected"),
            }
        }
    });
    assert!(buf.is_empty());
    println!("parse_one: {n} allocations for {N} pipelined requests");
    assert_eq!(n, 0, "parse_one allocated");
}

#[test]
fn path_parse_and_lookup_allocate_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps = vec![AppSpec {
        name: "demo/echo".into(),
        partitions: 16,
        emergency_partition: Some(3),
    }];
    // 16 partitions x 4 tasks, partition 5 with none (served by the emergency partition).
    let regs: Vec<Registration> = (0..64u64)
        .filter(|i| i % 16 != 5)
        .map(|i| Registration {
            task: 1000 + i,
            app: "demo/echo".into(),
            role: "main".into(),
            partitions: vec![(i % 16) as u32],
        })
        .collect();
    let table = build(&apps, &regs, 1, 1);
    let (n, served) = allocs_of(|| {
        let mut served = 0u64;
        for i in 0..N as u64 {
            let p = parse_api_path(black_box(PATH)).expect("valid path");
            let part = table
                .partition_of(p.app_name, p.wsid + i)
                .expect("known app");
            if let Lookup::Served { tasks, .. } = table.lookup(p.app_name, "main", part) {
                served += tasks[0];
            }
            assert_eq!(table.lookup("demo/echo", "nope", 1), Lookup::UnknownRole);
        }
        served
    });
    assert!(served > 0);
    println!("parse_api_path + partition_of + lookup: {n} allocations for {N} requests");
    assert_eq!(n, 0, "path parse or lookup allocated");
}

#[test]
fn frame_decode_and_head_encode_allocate_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::STATUS, b"200");
    put_meta(&mut meta, tag::CONTENT_TYPE, b"application/octet-stream");
    let one = proto::encode_frame(Kind::Response, 0, 0, 3, 9, &meta, &[b'y'; 64]);
    // Like the websocket reader: messages are frozen slices of one read buffer.
    let mut rd = BytesMut::with_capacity(one.len() * (N + 1));
    for _ in 0..=N {
        rd.put_slice(&one);
    }
    let first = rd.split_to(one.len()).freeze();
    Frame::decode(first).expect("frame");
    let (n, total) = allocs_of(|| {
        let mut total = 0;
        for _ in 0..N {
            let msg = rd.split_to(one.len()).freeze();
            let f = Frame::decode(msg).expect("frame");
            total += f.payload.len() + f.get_u64(tag::STATUS).unwrap_or(0) as usize;
        }
        total
    });
    assert_eq!(total, N * (64 + 200));
    println!("split_to + freeze + Frame::decode: {n} allocations for {N} frames");
    assert_eq!(n, 0, "frame decode allocated");

    // What routing::local::deliver writes for every request, into its reused scratch buffer,
    // with the same proto calls.
    let mut scratch = BytesMut::with_capacity(4096);
    let (n, ()) = allocs_of(|| {
        for i in 0..N as u64 {
            proto::begin_head(&mut scratch);
            put_meta(&mut scratch, tag::APP, b"demo/echo");
            put_meta(&mut scratch, tag::ROLE, b"main");
            put_meta(&mut scratch, tag::SERVICE, b"api");
            put_meta(&mut scratch, tag::MODULE, b"sys");
            put_meta(&mut scratch, tag::FUNCTION, b"echo");
            put_meta_u64(&mut scratch, tag::WSID, i);
            put_meta(&mut scratch, tag::METHOD, b"POST");
            put_meta(&mut scratch, tag::SUBJECT, b"fedbus-bench");
            proto::finish_head(&mut scratch, Kind::Request, 0, 0, 7, i, 64);
        }
    });
    println!(
        "begin_head + put_meta + finish_head into a reused BytesMut: {n} allocations for {N} heads"
    );
    assert_eq!(n, 0, "head encode allocated");
}

/// Kills the child on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one request and reads its whole answer into `resp` (no allocation on this side).
fn round_trip(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> u16 {
    s.write_all(req).expect("write");
    let mut got = 0;
    loop {
        let n = s.read(&mut resp[got..]).expect("read");
        assert!(n > 0, "router closed the connection");
        got += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = r.parse(&resp[..got]) {
            let cl = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            if got >= head + cl {
                assert_eq!(got, head + cl, "one answer per request");
                return r.code.unwrap_or(0);
            }
        }
    }
}

/// Writes `depth` requests at once and reads `depth` answers, all 200.
fn pipelined(s: &mut TcpStream, batch: &[u8], depth: usize, resp: &mut [u8]) {
    s.write_all(batch).expect("write");
    let (mut got, mut start, mut done) = (0usize, 0usize, 0usize);
    while done < depth {
        if got == resp.len() {
            resp.copy_within(start..got, 0);
            got -= start;
            start = 0;
        }
        let n = s.read(&mut resp[got..]).expect("read");
        assert!(n > 0, "router closed the connection");
        got += n;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = r.parse(&resp[start..got]) else {
                break;
            };
            let cl = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            if got - start < head + cl {
                break;
            }
            assert_eq!(r.code, Some(200));
            start += head + cl;
            done += 1;
        }
    }
    assert_eq!(start, got, "no bytes beyond the answers");
}

#[test]
fn whole_routed_request_through_a_real_router() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("fedbus-alloc-{}", std::process::id()));
    let keys = dir.join("keys");
    let now = fedbus_auth::now_unix();
    Keyring::init(&keys, &["demo/echo"], now).expect("keyring");
    let kr = Keyring::load(&keys).expect("load keyring");
    let token = sign_client_jwt(
        kr.signing_app_secret("demo/echo").expect("secret"),
        &ClientClaims {
            sub: "alloc-count".into(),
            app: "demo/echo".into(),
            iat: now,
            exp: now + 3600,
            nbf: None,
        },
    )
    .expect("sign");
    let shard_core = usize::from(fedbus_router::config::online_cores() >= 2);
    let cfg = format!(
        "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin_enabled = false\n\n[tuning]\nshard_cores = [{shard_core}]\ncontrol_core = 0\n\n[[apps]]\nname = \"demo/echo\"\npartitions = 16\n",
        keys.display().to_string()
    );
    let cfg = fedbus_router::config::Config::parse(&cfg, "alloc_count").expect("config");
    let router = fedbus_router::shard::listen::start(cfg, kr).expect("start router");
    let _task = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_fedbus"))
            .args(["task", "echo", "--router"])
            .arg(router.internal[0].to_string())
            .args(["--app", "demo/echo"])
            .env("FEDBUS_HOME", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start echo task"),
    );
    let req = http_request(&token);
    let mut resp = vec![0u8; 64 * 1024];
    let until = Instant::now() + Duration::from_secs(15);
    let mut s = loop {
        let mut s = TcpStream::connect(router.api).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        if round_trip(&mut s, &req, &mut resp) == 200 {
            break s;
        }
        assert!(Instant::now() < until, "the router never answered 200");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Warm up: the per-connection token cache, the pending table and the buffers grow here.
    for _ in 0..2000 {
        assert_eq!(round_trip(&mut s, &req, &mut resp), 200);
    }
    let (a0, b0) = (
        ALL_ALLOCS.load(Ordering::SeqCst),
        ALL_BYTES.load(Ordering::SeqCst),
    );
    let sizes0: Vec<u64> = BY_SIZE.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let t0 = Instant::now();
    let requests = 10_000u64;
    for _ in 0..requests {
        assert_eq!(round_trip(&mut s, &req, &mut resp), 200);
    }
    let busy = t0.elapsed();
    let (a1, b1) = (
        ALL_ALLOCS.load(Ordering::SeqCst),
        ALL_BYTES.load(Ordering::SeqCst),
    );
    let sizes: Vec<String> = BY_SIZE
        .iter()
        .zip(&sizes0)
        .enumerate()
        .map(|(k, (a, b))| (k, a.load(Ordering::SeqCst) - b))
        .filter(|&(_, n)| n > 0)
        .map(|(k, n)| format!("<={} B: {:.2}", 1u64 << k, n as f64 / requests as f64))
        .collect();
    println!("allocations per request by size: {}", sizes.join(", "));
    // The same time with no traffic: what timers and the control thread allocate anyway.
    std::thread::sleep(busy);
    let a2 = ALL_ALLOCS.load(Ordering::SeqCst);
    let per_req = (a1 - a0) as f64 / requests as f64;
    println!(
        "whole routed request (HTTP keep-alive, 1 in flight, 64 B, echo task out of process): \
         {per_req:.2} allocations and {:.0} bytes per request over {requests} requests; \
         {} allocations in the same time idle",
        (b1 - b0) as f64 / requests as f64,
        a2 - a1
    );
    // Under load: 32 pipelined requests per write, the shard never parks between them.
    const DEPTH: usize = 32;
    let batch = req.repeat(DEPTH);
    for _ in 0..100 {
        pipelined(&mut s, &batch, DEPTH, &mut resp);
    }
    let a3 = ALL_ALLOCS.load(Ordering::SeqCst);
    let rounds = 300;
    for _ in 0..rounds {
        pipelined(&mut s, &batch, DEPTH, &mut resp);
    }
    let n = (rounds * DEPTH) as f64;
    println!(
        "whole routed request (HTTP keep-alive, {DEPTH} pipelined, 64 B): {:.2} allocations per request over {n} requests",
        (ALL_ALLOCS.load(Ordering::SeqCst) - a3) as f64 / n
    );
    drop(s);
    router.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
