//! An echo task on fedbus-sdk: answers every request with its body and content type.
//!
//! ```sh
//! TOKEN=$(fedbus token service --task-id echo-1 --app demo/echo)
//! cargo run -p fedbus-sdk --example echo -- --router 127.0.0.1:8900 --app demo/echo \
//!     --partitions 0-15 --token "$TOKEN"
//! ```
//!
//! Every flag has an environment variable: `FEDBUS_ROUTER` (comma-separated: shard 0 of each
//! router), `FEDBUS_APP`, `FEDBUS_PARTITIONS`, `FEDBUS_ROLE`, `FEDBUS_TASK_TOKEN`,
//! `FEDBUS_TASK_TOKEN_FILE`, `FEDBUS_TASK_TOKEN_COMMAND`, `FEDBUS_TASK_TLS_CA`. With a token
//! file or command the token is renewed before it expires; a token refused for good exits with
//! status 1. With `--tls-ca CA.pem` the links dial `wss://` (routers with
//! `[listen] internal_tls = true`), trusting only that CA. Logs go to stderr, filtered by
//! `RUST_LOG` (default `info`).

#[path = "support/echo.rs"]
mod support;

use fedbus_sdk::{Partitions, TaskOptions};

fn usage() -> ! {
    eprintln!(
        "usage: echo [--router HOST:PORT]... [--app OWNER/APP] [--partitions 0-15] [--role main] \
         (--token TOKEN | --token-file PATH | --token-command CMD) [--tls-ca CA.pem]"
    );
    std::process::exit(2)
}

fn options() -> Result<TaskOptions, fedbus_sdk::Error> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut routers: Vec<String> = Vec::new();
    let mut app = env("FEDBUS_APP").unwrap_or_else(|| "demo/echo".into());
    let mut partitions = env("FEDBUS_PARTITIONS").unwrap_or_else(|| "0-15".into());
    let mut role = env("FEDBUS_ROLE").unwrap_or_else(|| "main".into());
    let mut token = env("FEDBUS_TASK_TOKEN");
    let mut token_file = env("FEDBUS_TASK_TOKEN_FILE");
    let mut token_command = env("FEDBUS_TASK_TOKEN_COMMAND");
    let mut tls_ca = env("FEDBUS_TASK_TLS_CA");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--router" => routers.push(value),
            "--app" => app = value,
            "--partitions" => partitions = value,
            "--role" => role = value,
            "--token" => token = Some(value),
            "--token-file" => token_file = Some(value),
            "--token-command" => token_command = Some(value),
            "--tls-ca" => tls_ca = Some(value),
            _ => usage(),
        }
    }
    if routers.is_empty() {
        routers = env("FEDBUS_ROUTER")
            .unwrap_or_else(|| "127.0.0.1:8900".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
    }
    let partitions: Partitions = partitions.parse()?;
    let opts = TaskOptions::new(routers, app, partitions, token.clone().unwrap_or_default());
    let opts = match (token, token_file, token_command) {
        (_, Some(f), _) => opts.token_file(f),
        (_, None, Some(c)) => opts.token_command(c),
        (Some(_), None, None) => opts,
        (None, None, None) => usage(),
    };
    let opts = match tls_ca {
        Some(ca) => opts.tls_ca(ca),
        None => opts,
    };
    Ok(opts.role(role))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("echo: {e}");
            std::process::exit(2)
        }
    };
    eprintln!(
        "echo task: app {} role {} {} partitions -> routers {:?}",
        opts.app,
        opts.role,
        opts.partitions.len(),
        opts.routers
    );
    match fedbus_sdk::serve(opts, support::echo).await {
        Err(e @ fedbus_sdk::Error::Refused(_)) => {
            eprintln!("echo: {e}");
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("echo: {e}");
            std::process::exit(2)
        }
        Ok(()) => {}
    }
}
