//! The integration tests of the `fedbus` binary: real routers, tasks and clients on
//! 127.0.0.x, started and stopped by each test. One test binary with a module per file (run one
//! file with `cargo test --release -p fedbus --test integration lifecycle::`), so that a build
//! links one executable instead of one per file. `tests/alloc_count.rs` is a binary of its own:
//! its counting global allocator would count every other test too.

mod cors;
mod data_plane;
mod drain_edges;
mod federation;
mod federation_edges;
mod hostile_clients;
mod hostile_tasks;
mod http_edges;
mod lifecycle;
mod limits;
mod loadgen;
mod operator_edges;
mod peer_tls;
mod probe_takeover;
mod probe_unix_stop;
mod python_task;
mod reload;
mod seed_edges;
mod seed_rules;
mod sick_task;
mod task_tokens;
mod tls;
mod tls_edges;
mod unix_link;
mod ws_api;
mod ws_edges;
