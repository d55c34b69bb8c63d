//! fedbus-sdk against real `fedbus run` routers (build them first: `cargo build --release -p
//! fedbus`): one test binary with a module per file, so a build links one executable, not one
//! per file.

mod edges;
mod router;
mod tls;
mod tokens;
