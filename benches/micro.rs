//! Micro benchmarks of the router's per-request steps, each with its baseline beside it.
//!
//! `cargo bench -p fedbus-router --features bench --bench micro` prints a markdown report (machine at the top) on stdout. No
//! criterion, to keep the build light: each case is warmed up, then timed for N iterations,
//! best of 5 rounds, and reported in ns per operation. Only ratios of rows measured in the
//! same run mean anything on a shared machine.

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use fedbus_router::api::http::{parse_one, Parsed};
use fedbus_router::auth::{sign_client_jwt, verify_client_jwt, ClientClaims, Keyring};
use fedbus_router::proto::{self, put_meta, put_meta_u64, tag, Frame, Kind};
use fedbus_router::route::{build, AppSpec, Lookup, Registration, RoutingTable};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const ROUNDS: usize = 5;

/// Best-of-5 nanoseconds per call of `f`, after a warm-up of `iters / 10` calls.
fn time<R>(iters: u64, mut f: impl FnMut(u64) -> R) -> f64 {
    for i in 0..iters / 10 {
        black_box(f(i));
    }
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..iters {
            black_box(f(i));
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    best
}

struct Table {
    rows: Vec<(String, String, f64)>,
}

impl Table {
    fn add(&mut self, group: &str, case: &str, ns: f64) {
        eprintln!("{group:>16} | {case:<60} {ns:>10.1} ns/op");
        self.rows.push((group.into(), case.into(), ns));
    }
}

fn machine() -> String {
    let sh = |c: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "- cores (`nproc`): {}\n- CPU: {}\n- memory: {}\n- kernel: {}\n- {}\n- built with `cargo bench` (the release profile: fat LTO, one codegen unit)\n",
        sh("nproc"),
        sh("lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1"),
        sh("free -h | awk '/^Mem:/{print $2}'"),
        sh("uname -r"),
        sh("rustc -V"),
    )
}

fn request_frame(payload: usize) -> Bytes {
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::APP, b"demo/echo");
    put_meta(&mut meta, tag::ROLE, b"main");
    put_meta(&mut meta, tag::SERVICE, b"api");
    put_meta(&mut meta, tag::MODULE, b"sys");
    put_meta(&mut meta, tag::FUNCTION, b"echo");
    put_meta_u64(&mut meta, tag::WSID, 42);
    put_meta(&mut meta, tag::METHOD, b"POST");
    put_meta(&mut meta, tag::SUBJECT, b"fedbus-bench");
    let body = vec![b'x'; payload];
    // Like the websocket reader: a message is a frozen slice of a larger read buffer.
    let mut rd = BytesMut::with_capacity(64 * 1024);
    rd.put(proto::encode_frame(
        Kind::Request,
        0,
        0,
        10,
        7,
        &meta,
        &body,
    ));
    let n = rd.len();
    rd.split_to(n).freeze()
}

fn codec(t: &mut Table) {
    for size in [64usize, 4096] {
        let msg = request_frame(size);
        let g = "frame codec";
        t.add(
            g,
            &format!("Frame::decode, {size} B payload ({} B frame)", msg.len()),
            time(2_000_000, |_| {
                Frame::decode(black_box(&msg).clone()).is_ok()
            }),
        );
        t.add(
            g,
            &format!("baseline: copy the same {} B into a Vec", msg.len()),
            time(2_000_000, |_| black_box(&msg[..]).to_vec()),
        );
    }
    // What RFC 6455 masking costs a client frame (peer links, the built-in task runner): a copy
    // of the payload into the outbox and an XOR pass, and a key from a pool refilled by one
    // getrandom per 256 frames. The server side sends payloads as they are.
    let rng = ring::rand::SystemRandom::new();
    let mut pool = [0u8; 1024];
    t.add(
        "ws masking",
        "fresh key: 1 KiB getrandom / 256",
        time(20_000, |_| {
            ring::rand::SecureRandom::fill(&rng, &mut pool).is_ok()
        }) / 256.0,
    );
    for size in [1024usize, 65536] {
        let payload = Bytes::from(vec![7u8; size]);
        let mut arena = BytesMut::with_capacity(size + 16);
        t.add(
            "ws masking",
            &format!("copy + mask a {size} B payload into the outbox arena"),
            time(200_000, |i| {
                arena.clear();
                arena.extend_from_slice(&payload);
                fedbus_router::ws::frame::unmask(&mut arena, (i as u32 | 1).to_ne_bytes(), 0);
                arena.len()
            }),
        );
        t.add(
            "ws masking",
            &format!("baseline: key 0, the {size} B payload queued as it is"),
            time(200_000, |_| black_box(&payload).clone().len()),
        );
    }
    let mut out = BytesMut::with_capacity(4096);
    t.add(
        "frame codec",
        "begin_head + 8 put_meta + finish_head into a reused BytesMut",
        time(2_000_000, |i| {
            proto::begin_head(&mut out);
            put_meta(&mut out, tag::APP, b"demo/echo");
            put_meta(&mut out, tag::ROLE, b"main");
            put_meta(&mut out, tag::SERVICE, b"api");
            put_meta(&mut out, tag::MODULE, b"sys");
            put_meta(&mut out, tag::FUNCTION, b"echo");
            put_meta_u64(&mut out, tag::WSID, i);
            put_meta(&mut out, tag::METHOD, b"POST");
            put_meta(&mut out, tag::SUBJECT, b"fedbus-bench");
            proto::finish_head(&mut out, Kind::Request, 0, 1, 10, 123_456_789, 64);
            out.len()
        }),
    );
}

fn keyring_and_token() -> (std::path::PathBuf, Keyring, String) {
    let dir = std::env::temp_dir().join(format!("fedbus-micro-{}", std::process::id()));
    let now = fedbus_router::auth::now_unix();
    Keyring::init(&dir, &["demo/echo"], now).expect("init keyring");
    let kr = Keyring::load(&dir).expect("load keyring");
    let secret = kr.signing_app_secret("demo/echo").expect("secret");
    let claims = ClientClaims {
        sub: "fedbus-bench".into(),
        app: "demo/echo".into(),
        iat: now,
        exp: now + 3600,
        nbf: None,
    };
    let token = sign_client_jwt(secret, &claims).expect("sign");
    (dir, kr, token)
}

fn http(t: &mut Table, token: &str) {
    let req = format!(
        "POST /api/local/dev/demo/echo/api/7/sys/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 64\r\n\r\n{}",
        "x".repeat(64)
    );
    let req = req.as_bytes();
    let g = "HTTP parse";
    let mut buf = BytesMut::with_capacity(16 * 1024);
    t.add(
        g,
        &format!("parse_one, 64 B POST with JWT ({} B request)", req.len()),
        time(1_000_000, |_| {
            buf.extend_from_slice(req);
            match parse_one(&mut buf, 16 * 1024, 1 << 20) {
                Parsed::Request(r) => r.body().len(),
                _ => unreachable!("the request is complete"),
            }
        }),
    );
    let mut buf = BytesMut::with_capacity(16 * 1024);
    t.add(
        g,
        "baseline: bare httparse::Request::parse (same copy-in)",
        time(1_000_000, |_| {
            buf.extend_from_slice(req);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Request::new(&mut headers);
            let n = matches!(r.parse(&buf), Ok(httparse::Status::Complete(_)));
            buf.clear();
            n
        }),
    );
    t.add(
        g,
        "fedbus_router::route::parse_api_path of that path",
        time(2_000_000, |_| {
            fedbus_router::route::parse_api_path(black_box(
                "/api/local/dev/demo/echo/api/7/sys/echo",
            ))
            .is_ok()
        }),
    );
}

fn jwt(t: &mut Table, kr: &Keyring, token: &str) {
    let now = fedbus_router::auth::now_unix();
    let g = "JWT";
    t.add(
        g,
        &format!("verify_client_jwt (HS256, {} B token)", token.len()),
        time(50_000, |_| {
            verify_client_jwt(kr, "demo/echo", black_box(token), now, 3600).is_ok()
        }),
    );
    let cached = token.as_bytes().to_vec();
    t.add(
        g,
        "baseline: per-connection cache hit (token bytes == cached bytes)",
        time(5_000_000, |_| {
            black_box(token.as_bytes()) == black_box(cached.as_slice())
        }),
    );
}

fn table(generation: u64) -> RoutingTable {
    let apps = vec![AppSpec {
        name: "demo/echo".into(),
        partitions: 16,
        emergency_partition: None,
    }];
    let regs: Vec<Registration> = (0..64u64)
        .map(|i| Registration {
            task: 1000 + i,
            app: "demo/echo".into(),
            role: "main".into(),
            partitions: vec![(i % 16) as u32],
        })
        .collect();
    build(&apps, &regs, generation, 1)
}

fn served(l: Lookup<'_>) -> u64 {
    match l {
        Lookup::Served { tasks, .. } => tasks[0],
        _ => unreachable!("every partition is live"),
    }
}

fn routing(t: &mut Table) {
    let g = "routing";
    let tbl = table(1);
    t.add(
        g,
        "RoutingTable::lookup (16 partitions x 4 tasks)",
        time(5_000_000, |i| {
            served(tbl.lookup(black_box("demo/echo"), black_box("main"), (i % 16) as u32))
        }),
    );
    let mut map: HashMap<String, Vec<u64>> = HashMap::new();
    map.insert("demo/echo".into(), vec![1, 2, 3, 4]);
    t.add(
        g,
        "baseline: HashMap<String, Vec<u64>>::get (one hash + probe)",
        time(5_000_000, |_| {
            map.get(black_box("demo/echo")).map_or(0, |v| v[0])
        }),
    );

    let swap = Arc::new(ArcSwap::from_pointee(table(1)));
    let reader = |swap: &ArcSwap<RoutingTable>, full: bool| {
        if full {
            // What shard::dispatch does today: an owned Arc for the whole request.
            time(5_000_000, |i| {
                let s = swap.load_full();
                served(s.lookup("demo/echo", "main", (i % 16) as u32))
            })
        } else {
            time(5_000_000, |i| {
                let s = swap.load();
                served(s.lookup("demo/echo", "main", (i % 16) as u32))
            })
        }
    };
    t.add(
        g,
        "ArcSwap load() + lookup, no publisher",
        reader(&swap, false),
    );
    t.add(
        g,
        "ArcSwap load_full() + lookup, no publisher",
        reader(&swap, true),
    );
    // What a shard does: its own handle, a pointer compare per load.
    let local = fedbus_router::shard::snapshot::Local::new(&swap);
    t.add(
        g,
        "shard::snapshot::Local load() + lookup, no publisher",
        time(5_000_000, |i| {
            let s = local.load();
            served(s.lookup("demo/echo", "main", (i % 16) as u32))
        }),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (swap, stop, published) = (swap.clone(), stop.clone(), published.clone());
        std::thread::spawn(move || {
            // The control thread's worst case: a new snapshot back to back, built each time.
            let mut generation = 2;
            while !stop.load(Ordering::Relaxed) {
                swap.store(Arc::new(table(generation)));
                generation += 1;
                published.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let t0 = Instant::now();
    let with = reader(&swap, false);
    let with_full = reader(&swap, true);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.join();
    let rate = published.load(Ordering::Relaxed) as f64 / secs;
    t.add(
        g,
        &format!("ArcSwap load() + lookup, publisher storing {rate:.0} snapshots/s"),
        with,
    );
    t.add(
        g,
        &format!("ArcSwap load_full() + lookup, publisher storing {rate:.0} snapshots/s"),
        with_full,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: both run it all.
    let mut t = Table { rows: Vec::new() };
    let (dir, kr, token) = keyring_and_token();
    codec(&mut t);
    http(&mut t, &token);
    jwt(&mut t, &kr, &token);
    routing(&mut t);
    let _ = std::fs::remove_dir_all(&dir);

    let host = std::process::Command::new("hostname")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("# fedbus micro benchmarks on {host}\n");
    println!("Made by `cargo bench -p fedbus-router --features bench --bench micro`: warm-up, then best of {ROUNDS} rounds of N iterations; ns per operation.\n");
    println!("## Machine\n\n{}", machine());
    println!("## Results\n\n| group | case | ns/op |\n|---|---|---:|");
    for (g, c, ns) in &t.rows {
        println!("| {g} | {c} | {ns:.1} |");
    }
}
