//! `fedbus bench`, end to end. Over TLS: the bench starts a router with an HTTPS listener and an
//! echo task, loads it over `https://`, `wss://` and with a new connection (a full handshake,
//! or a resumed one) per request, and reports the router's CPU per request. Under a CPU
//! affinity that leaves out core 0: the router, the task and the load go on the cores the
//! process may use. Each run is bounded (a short window, `timeout`-free: the bench ends by
//! itself and its setup is limited to 15 s).

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedbus");

/// Runs `fedbus bench ARGS --json FILE` and returns the json document.
fn bench(dir: &Path, name: &str, args: &[&str]) -> serde_json::Value {
    let json = dir.join(format!("{name}.json"));
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--duration", "700ms", "--warmup", "300ms", "--cores", "0"])
        .arg("--json")
        .arg(&json)
        .env("FEDBUS_HOME", dir)
        .output()
        .expect("run fedbus bench");
    assert!(
        out.status.success(),
        "fedbus bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("bench json");
    serde_json::from_str(&text).expect("bench json parses")
}

/// Every request answered 200, the run was what was asked, and the router's CPU was measured.
fn check(v: &serde_json::Value, protocol: &str, conn_per_request: bool) {
    assert!(v["ok"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["settings"]["protocol"], protocol, "{v}");
    assert_eq!(v["settings"]["tls"], true, "{v}");
    assert_eq!(v["settings"]["conn_per_request"], conn_per_request, "{v}");
    let us = v["server_cpu"]["us_per_request"].as_f64();
    assert!(us.is_some_and(|u| u > 0.0), "router CPU per request: {v}");
}

#[test]
fn bench_loads_a_router_over_https_wss_and_new_connections() {
    let dir = std::env::temp_dir().join(format!("fedbus-bench-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let keep = ["--tls", "--connections", "2", "--inflight", "4"];
    check(&bench(&dir, "https", &keep), "https", false);
    let wss = [&keep[..], &["--protocol", "ws"]].concat();
    check(&bench(&dir, "wss", &wss), "wss", false);
    let full = ["--tls", "--conn-per-request", "--connections", "2"];
    let v = bench(&dir, "full", &full);
    check(&v, "https", true);
    assert_eq!(v["settings"]["tls_resume"], false, "{v}");
    assert_eq!(v["settings"]["inflight"], 1, "{v}");
    // Every connection did a full handshake: the client kept no session to resume.
    assert_eq!(v["tls_handshakes"]["resumed"], 0, "{v}");
    assert!(v["tls_handshakes"]["full"].as_u64().unwrap_or(0) > 0, "{v}");
    // More connections than rustls's own client cache keeps tickets for (8 per server).
    let resume = [
        "--tls",
        "--conn-per-request",
        "--connections",
        "16",
        "--resume",
    ];
    let v = bench(&dir, "resume", &resume);
    check(&v, "https", true);
    // One shared ClientConfig: the router's tickets make later connections resume. Only the
    // first connection of each of the 16 finds no ticket yet.
    let resumed = v["tls_handshakes"]["resumed"].as_u64().unwrap_or(0);
    let full = v["tls_handshakes"]["full"].as_u64().unwrap_or(u64::MAX);
    assert!(resumed > 0 && full <= 16, "{v}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Under `taskset -c N` with N > 0 (as in a cpuset that leaves out core 0) the bench lays out
/// its router, echo task and load on core N. It used to number cores from 0: its router was
/// refused ("core 0 is not one this process may run on") and the bench failed.
#[test]
fn bench_uses_the_cores_of_its_cpu_affinity() {
    let cores = fedbus_router::config::placeable_cores();
    let last = *cores.last().expect("a core");
    let taskset = Command::new("taskset").arg("-V").output();
    if last == 0 || !taskset.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: needs `taskset` and a core other than 0 (allowed: {cores:?})");
        return;
    }
    let dir = std::env::temp_dir().join(format!("fedbus-bench-cores-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("cores.json");
    let out = Command::new("taskset")
        .arg("-c")
        .arg(last.to_string())
        .arg(BIN)
        .args(["bench", "--connections", "2", "--inflight", "2"])
        .args(["--duration", "500ms", "--warmup", "200ms", "--json"])
        .arg(&json)
        .env("FEDBUS_HOME", &dir)
        .output()
        .expect("run fedbus bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fedbus bench failed:\n{stderr}");
    let layout = format!(
        "core layout: router shards on [{last}], control thread and echo task on core {last}, load generator on cores [{last}]"
    );
    assert!(
        stderr.contains(&layout),
        "expected {layout:?} in:\n{stderr}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("bench json")).expect("json");
    assert!(v["ok"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["settings"]["cores"], serde_json::json!([last]), "{v}");
    // The shard shares its core with the load: it does not spin.
    assert_eq!(v["settings"]["router_spin_us"], 0, "{v}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
