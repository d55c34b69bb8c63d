//! Fault injection, for the integration tests only: compiled in with the `fault-injection`
//! feature, which only the `fedbus` package's dev-dependency turns on. Workspace resolver 2
//! keeps dev-dependency features out of `cargo build` and `cargo install`, so a binary built
//! for use has none of this; the `fedbus` binary that `cargo test` builds for the integration
//! tests (which also lands in target/release/fedbus after the tests) has it, inert unless its
//! environment sets `FEDBUS_FAULT_PANIC_SHARD`, and it logs a warning when armed.
//!
//! It exists because "a shard that dies takes the router to not-ready, visibly" must be shown
//! on a running router, and no input may make a shard die (that is the point of the
//! hardening): the test needs a way to kill one on purpose.
//!
//! `FEDBUS_FAULT_PANIC_SHARD=N:PATH`: shard `N` panics (in a task of its executor, as a bug in
//! a connection's task would) once the file `PATH` exists. Polled every 20 ms.
//!
//! `FEDBUS_FAULT_STALL_CONTROL=PATH`: the control thread stops in its loop while the file
//! `PATH` exists (as a read of a keyring file that hangs would stop it), to show that
//! `/readyz` sees the stall.

use std::path::PathBuf;
use std::time::Duration;

/// The environment variable read at shard start.
const PANIC_SHARD: &str = "FEDBUS_FAULT_PANIC_SHARD";

/// The environment variable read by the control thread at each pass of its loop.
const STALL_CONTROL: &str = "FEDBUS_FAULT_STALL_CONTROL";

/// Run by the control thread at each pass: waits while the file `FEDBUS_FAULT_STALL_CONTROL`
/// names exists.
pub(crate) fn stall_control() {
    let Some(trigger) = std::env::var_os(STALL_CONTROL).map(PathBuf::from) else {
        return;
    };
    if trigger.exists() {
        tracing::warn!(trigger = %trigger.display(), "fault injection: the control thread stalls while the trigger file exists");
        while trigger.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(shard, trigger file)` of `N:PATH`; None when it does not parse.
fn parse(spec: &str) -> Option<(usize, PathBuf)> {
    let (n, path) = spec.split_once(':')?;
    Some((n.trim().parse().ok()?, PathBuf::from(path)))
}

/// Run by each shard once it serves: arms its panic when `FEDBUS_FAULT_PANIC_SHARD` names it.
pub(crate) fn arm(shard: usize) {
    let Some((n, trigger)) = std::env::var(PANIC_SHARD).ok().as_deref().and_then(parse) else {
        return;
    };
    if n != shard {
        return;
    }
    tracing::warn!(shard, trigger = %trigger.display(), "fault injection armed: this shard panics once the trigger file exists");
    glommio::spawn_local(async move {
        while !trigger.exists() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        panic!("fault injection: shard {shard} panics on purpose ({PANIC_SHARD})");
    })
    .detach();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_spec_names_a_shard_and_a_file() {
        assert_eq!(
            super::parse("1:/tmp/x"),
            Some((1, std::path::PathBuf::from("/tmp/x")))
        );
        assert_eq!(super::parse("x:/tmp/x"), None);
        assert_eq!(super::parse("1"), None);
    }
}
