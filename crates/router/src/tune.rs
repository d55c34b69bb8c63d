//! Host checks for `fedbus tune` and for `fedbus run` at start.
//!
//! Owns nothing and changes nothing on the host: it reads `/proc` and `/sys`, asks the kernel
//! for limits and makes one `io_uring_setup(2)` probe. A file that is missing or unreadable
//! means "unknown", never a failure, and nothing read here is trusted to parse. Runs before any
//! shard starts; never call it on a shard.
//!
//! Two checks are fatal because glommio cannot run without them: io_uring must be usable
//! (glommio panics otherwise) and `RLIMIT_MEMLOCK` must be at least 512 KiB (glommio refuses to
//! start an executor below that, even as root). Everything else is advice.

use std::fs;

/// The result of one host check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short name, e.g. `io_uring`, `memlock`, `somaxconn`.
    pub name: &'static str,
    /// The host passes (or the answer is unknown and there is nothing to fix).
    pub ok: bool,
    /// A failure of this check stops the router from starting.
    pub fatal: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it; empty when `ok`.
    pub fix: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            fatal: false,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            fatal: false,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            fatal: true,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    /// `ok`, `WARN` (failed, not fatal) or `FAIL` (failed, fatal).
    pub(crate) fn status(&self) -> &'static str {
        match (self.ok, self.fatal) {
            (true, _) => "ok",
            (false, false) => "WARN",
            (false, true) => "FAIL",
        }
    }
}

/// glommio's own floor: below this `RLIMIT_MEMLOCK` an executor does not start at all
/// (`ReactorErrorKind::MemLockLimit`), whoever runs it.
pub(crate) const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;

/// Locked memory of one executor's three rings beyond `io_memory` (an estimate).
pub(crate) const RING_OVERHEAD: u64 = 64 * 1024;

/// glommio rounds `io_memory` up to a page and to at least 64 KiB.
fn effective_io_memory(io_memory: usize) -> u64 {
    let page_aligned = (io_memory as u64).div_ceil(4096).saturating_mul(4096);
    page_aligned.max(64 * 1024)
}

/// Advised soft `RLIMIT_NOFILE` and `fs.file-max`.
pub(crate) const ADVISED_NOFILE: u64 = 65536;

/// Advised `net.core.somaxconn`.
pub(crate) const ADVISED_SOMAXCONN: u64 = 1024;

/// Cap on the size of a CPU list read from `/sys`, so a corrupt range cannot make us allocate.
const MAX_CPUS: usize = 1 << 16;

/// `io_uring_setup(2)` with 4 entries and zeroed `io_uring_params`; the fd is closed at once.
/// Returns the errno on failure.
fn probe_io_uring() -> Result<(), i32> {
    probe_io_uring_with(0)
}

/// `IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG` (Linux 5.19+).
const SETUP_COOP: u32 = (1 << 8) | (1 << 9);
/// `IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_TASKRUN_FLAG`
/// (Linux 6.1+): the shard's main ring (vendored glommio, `FEDBUS-PATCH.md` 10).
const SETUP_DEFER: u32 = (1 << 13) | (1 << 12) | (1 << 9);

/// [`probe_io_uring`] with `flags` in `io_uring_params.flags`.
fn probe_io_uring_with(flags: u32) -> Result<(), i32> {
    // struct io_uring_params is 120 bytes; u64 words keep it aligned for the kernel.
    let mut params = [0u64; 15];
    // `flags` is the third u32 of the struct (after sq_entries and cq_entries).
    // SAFETY: a u32 write at byte offset 8 inside the 120 bytes we own, 4-byte aligned.
    unsafe { (params.as_mut_ptr() as *mut u32).add(2).write(flags) };
    // SAFETY: the kernel reads and writes at most 120 bytes at `params`, which we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            4 as libc::c_long,
            params.as_mut_ptr(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL));
    }
    // SAFETY: `fd` is a descriptor we just got and nobody else holds.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Probes io_uring with a raw `io_uring_setup(2)`; says why it is blocked when it is.
pub(crate) fn check_io_uring() -> Check {
    let disabled = read_number("/proc/sys/kernel/io_uring_disabled");
    let seccomp = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_field(&s, "Seccomp:")?.parse::<u32>().ok());
    io_uring_verdict(probe_io_uring(), disabled, seccomp)
}

/// Turns the probe's result into a check. `disabled` is `kernel.io_uring_disabled`, `seccomp`
/// the `Seccomp:` mode of `/proc/self/status` (2 = filter); `None` = unknown.
fn io_uring_verdict(probe: Result<(), i32>, disabled: Option<u64>, seccomp: Option<u32>) -> Check {
    const NAME: &str = "io_uring";
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let errno = match probe {
        Ok(()) => return Check::pass(NAME, format!("io_uring_setup works (kernel {kernel})")),
        Err(e) => e,
    };
    let seccomp_fix = "run the container with --security-opt seccomp=unconfined, or with a \
                       seccomp profile that allows io_uring_setup, io_uring_enter and \
                       io_uring_register";
    let sysctl_fix = "sysctl -w kernel.io_uring_disabled=0 (and persist it in /etc/sysctl.d/)";
    match errno {
        libc::ENOSYS => Check::fail(
            NAME,
            format!("io_uring_setup: ENOSYS: kernel {kernel} has no io_uring (or a seccomp profile answers ENOSYS)"),
            format!("run on a Linux kernel with io_uring (5.8 or newer); if the kernel has it, {seccomp_fix}"),
        ),
        libc::EPERM | libc::EACCES => {
            let name = if errno == libc::EPERM { "EPERM" } else { "EACCES" };
            match (disabled, seccomp) {
                (Some(2), _) => Check::fail(
                    NAME,
                    format!("io_uring_setup: {name}: disabled by sysctl kernel.io_uring_disabled=2"),
                    sysctl_fix,
                ),
                (Some(1), _) => Check::fail(
                    NAME,
                    format!(
                        "io_uring_setup: {name}: sysctl kernel.io_uring_disabled=1 allows io_uring \
                         only to the group kernel.io_uring_group and to CAP_SYS_ADMIN"
                    ),
                    format!("{sysctl_fix}, or run fedbus in the group named by kernel.io_uring_group"),
                ),
                (_, Some(2)) => Check::fail(
                    NAME,
                    format!(
                        "io_uring_setup: {name}: blocked by a seccomp filter (Docker's default \
                         profile blocks io_uring)"
                    ),
                    seccomp_fix,
                ),
                _ => Check::fail(
                    NAME,
                    format!("io_uring_setup: {name}: blocked by seccomp or by sysctl kernel.io_uring_disabled"),
                    format!("{seccomp_fix}; or {sysctl_fix}"),
                ),
            }
        }
        libc::ENOMEM => Check::fail(
            NAME,
            "io_uring_setup: ENOMEM: kernels before 5.12 count ring memory as locked memory",
            "raise the locked-memory limit: ulimit -l unlimited, or systemd LimitMEMLOCK=infinity",
        ),
        e => Check::fail(
            NAME,
            format!("io_uring_setup failed: {} (kernel {kernel})", std::io::Error::from_raw_os_error(e)),
            "run on a Linux kernel with io_uring (5.8 or newer)",
        ),
    }
}

/// Locked memory for `shards` executors of `io_memory` bytes each.
pub(crate) fn check_memlock(shards: usize, io_memory: usize) -> Check {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit that we own.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } == 0 {
        Some(rl.rlim_cur)
    } else {
        None
    };
    memlock_verdict(limit, privileged(), shards, io_memory)
}

/// Effective uid 0, or `CAP_IPC_LOCK` in `CapEff`: io_uring then does not count registered
/// buffers against `RLIMIT_MEMLOCK`.
fn privileged() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .is_some_and(has_cap_ipc_lock)
}

/// `limit`: soft `RLIMIT_MEMLOCK` in bytes (`RLIM_INFINITY` for none), `None` if unknown.
fn memlock_verdict(limit: Option<u64>, privileged: bool, shards: usize, io_memory: usize) -> Check {
    const NAME: &str = "memlock";
    let fix = "ulimit -l unlimited, or systemd LimitMEMLOCK=infinity, or lower tuning.io_memory";
    let need = (shards as u64)
        .saturating_mul(effective_io_memory(io_memory).saturating_add(RING_OVERHEAD));
    let Some(limit) = limit else {
        return Check::pass(NAME, "RLIMIT_MEMLOCK unknown (getrlimit failed)");
    };
    if limit == libc::RLIM_INFINITY {
        return Check::pass(NAME, "RLIMIT_MEMLOCK unlimited");
    }
    if limit < GLOMMIO_MIN_MEMLOCK {
        return Check::fail(
            NAME,
            format!(
                "RLIMIT_MEMLOCK {} is below glommio's floor of {}: executors will not start",
                bytes(limit),
                bytes(GLOMMIO_MIN_MEMLOCK)
            ),
            "ulimit -l unlimited, or systemd LimitMEMLOCK=infinity",
        );
    }
    let detail = format!(
        "RLIMIT_MEMLOCK {}, {shards} shard(s) need about {} (io_memory {} + {} rings each)",
        bytes(limit),
        bytes(need),
        bytes(effective_io_memory(io_memory)),
        bytes(RING_OVERHEAD)
    );
    if limit >= need {
        Check::pass(NAME, detail)
    } else if privileged {
        Check::pass(
            NAME,
            format!("{detail}; root or CAP_IPC_LOCK, so the limit does not apply"),
        )
    } else {
        Check::warn(
            NAME,
            format!("{detail}; shards will skip registered buffers (glommio warns ENOMEM) and file I/O is slower"),
            fix,
        )
    }
}

/// Which rings the shards get: glommio's setup flags that decide how a completion posted from
/// another CPU reaches the shard (docs/ARCHITECTURE.md, "Deferred task work"). Deferred task
/// work is on unless `FEDBUS_IO_URING_DEFER=0` ([`glommio::DEFER_TASKRUN_ENV`]).
fn check_ring_setup() -> Check {
    ring_verdict(
        glommio::defer_taskrun_requested(),
        probe_io_uring_with(SETUP_DEFER),
        probe_io_uring_with(SETUP_COOP),
    )
}

fn ring_verdict(defer_wanted: bool, defer: Result<(), i32>, coop: Result<(), i32>) -> Check {
    const NAME: &str = "rings";
    match (defer_wanted, defer, coop) {
        (true, Ok(()), _) => Check::pass(
            NAME,
            "DEFER_TASKRUN: a shard collects completions from other CPUs in batches",
        ),
        (false, _, Ok(())) => Check::pass(
            NAME,
            "COOP_TASKRUN (FEDBUS_IO_URING_DEFER=0): completions from other CPUs run on the way \
             out of the shard's system calls",
        ),
        // Only EINVAL says the kernel lacks a flag.
        (true, Err(libc::EINVAL), Ok(())) => Check::warn(
            NAME,
            "kernel before 6.1 (no DEFER_TASKRUN): completions from other CPUs run one or two at \
             a time, on the way out of the shard's system calls (COOP_TASKRUN)",
            "run on Linux 6.1 or newer",
        ),
        (_, Err(libc::EINVAL), Err(libc::EINVAL)) | (false, _, Err(libc::EINVAL)) => Check::warn(
            NAME,
            "kernel before 5.19 (no COOP_TASKRUN): each completion from another CPU interrupts \
             the running shard (an inter-processor interrupt; in a VM, an exit on both sides)",
            "run on Linux 5.19 or newer",
        ),
        // Any other error is io_uring itself being unusable: the `io_uring` check says why.
        (w, d, c) => {
            let e = match (w, d, c) {
                (false, _, Err(x)) | (true, Err(libc::EINVAL), Err(x)) => x,
                (_, Err(x), _) => x,
                _ => libc::EIO,
            };
            Check::pass(
                NAME,
                format!(
                    "unknown: io_uring_setup failed ({}); see the io_uring check",
                    std::io::Error::from_raw_os_error(e)
                ),
            )
        }
    }
}

/// Non-fatal advice on the host: backlog, open files, CPU governor, cores, SMT siblings.
pub(crate) fn advisory_checks(shard_cores: &[usize], control_core: usize) -> Vec<Check> {
    let mut out = vec![check_somaxconn(), check_nofile(), check_file_max()];
    let mut cores: Vec<usize> = shard_cores.to_vec();
    cores.push(control_core);
    cores.sort_unstable();
    cores.dedup();
    out.push(check_governor(&cores));
    out.push(check_cores_online(&cores));
    out.push(check_siblings(shard_cores, control_core, read_siblings));
    out.push(check_ktls());
    out.push(check_ring_setup());
    out.push(migrate_verdict(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .ok()
            .as_deref(),
    ));
    out
}

/// `net.ipv4.tcp_migrate_req`: with 1, connections waiting in the accept queue of a listener
/// that closes move to another listener of its SO_REUSEPORT group (Linux 5.14+). A takeover
/// (`listen.takeover`) loses none of them then; with 0 the kernel resets them.
fn migrate_verdict(value: Option<&str>) -> Check {
    const NAME: &str = "migrate";
    match value.map(str::trim) {
        Some("1") => Check::pass(
            NAME,
            "tcp_migrate_req 1: a takeover moves queued connections to the new router",
        ),
        Some(v) => Check::warn(
            NAME,
            format!("tcp_migrate_req {v}: during a takeover (fedbus run --takeover) connections queued on the old router's listeners when it closes them are reset"),
            "sysctl -w net.ipv4.tcp_migrate_req=1 (and net.ipv4.tcp_migrate_req = 1 in /etc/sysctl.d/)",
        ),
        None => Check::pass(
            NAME,
            "no tcp_migrate_req (kernel before 5.14): a takeover may reset connections queued on the old router",
        ),
    }
}

/// Kernel TLS: whether the host offers the `tls` upper-layer protocol. Informational: fedbus
/// keeps the TLS record layer in rustls on every host (the kernel hand-off after the
/// handshake is not built; see docs/ARCHITECTURE.md, "TLS"), so either answer passes.
fn check_ktls() -> Check {
    ktls_verdict(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .ok()
            .as_deref(),
    )
}

fn ktls_verdict(ulps: Option<&str>) -> Check {
    const NAME: &str = "ktls";
    match ulps {
        None => Check::pass(
            NAME,
            "kernel TLS unknown (no tcp_available_ulp); TLS records in rustls",
        ),
        Some(u) if u.split_whitespace().any(|x| x == "tls") => Check::pass(
            NAME,
            "kernel TLS available (tls ULP); fedbus does not use it yet: TLS records in rustls",
        ),
        Some(u) => Check::pass(
            NAME,
            format!(
                "no kernel TLS (ULPs: {}): TLS records in rustls",
                if u.trim().is_empty() {
                    "none"
                } else {
                    u.trim()
                }
            ),
        ),
    }
}

fn check_somaxconn() -> Check {
    const NAME: &str = "somaxconn";
    match read_number("/proc/sys/net/core/somaxconn") {
        None => Check::pass(NAME, "net.core.somaxconn unknown"),
        Some(v) if v >= ADVISED_SOMAXCONN => Check::pass(NAME, format!("net.core.somaxconn {v}")),
        Some(v) => Check::warn(
            NAME,
            format!(
                "net.core.somaxconn {v} < {ADVISED_SOMAXCONN}: bursts of new connections overflow \
                 the accept queue and clients retry after a timeout"
            ),
            "sysctl -w net.core.somaxconn=4096 (and persist it in /etc/sysctl.d/)",
        ),
    }
}

fn check_nofile() -> Check {
    const NAME: &str = "nofile";
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Check::pass(NAME, "RLIMIT_NOFILE unknown");
    }
    let cur = rl.rlim_cur;
    if cur == libc::RLIM_INFINITY || cur >= ADVISED_NOFILE {
        return Check::pass(NAME, format!("RLIMIT_NOFILE {}", limit_text(cur)));
    }
    Check::warn(
        NAME,
        format!(
            "RLIMIT_NOFILE {cur} < {ADVISED_NOFILE} (hard {}): every client connection and task \
             link is a descriptor; accept fails with EMFILE past the limit",
            limit_text(rl.rlim_max)
        ),
        "ulimit -n 65536, or systemd LimitNOFILE=65536",
    )
}

fn check_file_max() -> Check {
    const NAME: &str = "file-max";
    match read_number("/proc/sys/fs/file-max") {
        None => Check::pass(NAME, "fs.file-max unknown"),
        Some(v) if v >= ADVISED_NOFILE => Check::pass(NAME, format!("fs.file-max {v}")),
        Some(v) => Check::warn(
            NAME,
            format!("fs.file-max {v} < {ADVISED_NOFILE}: the whole host runs out of descriptors"),
            "sysctl -w fs.file-max=1048576 (and persist it in /etc/sysctl.d/)",
        ),
    }
}

fn check_governor(cores: &[usize]) -> Check {
    const NAME: &str = "governor";
    let mut slow = Vec::new();
    let mut known = 0;
    for c in cores {
        let path = format!("/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor");
        if let Ok(g) = fs::read_to_string(path) {
            known += 1;
            let g = g.trim();
            if g != "performance" {
                slow.push(format!("cpu{c}={g}"));
            }
        }
    }
    if known == 0 {
        return Check::pass(
            NAME,
            "CPU frequency governor unknown (no cpufreq: a VM, or no driver)",
        );
    }
    if slow.is_empty() {
        return Check::pass(NAME, "governor performance on every configured core");
    }
    Check::warn(
        NAME,
        format!(
            "{}: cores clock down between bursts and the first requests after a pause are slow",
            slow.join(" ")
        ),
        "cpupower frequency-set -g performance (or write performance to \
         /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor)",
    )
}

fn check_cores_online(cores: &[usize]) -> Check {
    const NAME: &str = "cores";
    let online = fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(&s));
    let allowed = crate::config::affinity();
    let mut missing = Vec::new();
    for c in cores {
        if let Some(on) = &online {
            if !on.contains(c) {
                missing.push(format!("core {c} is not online"));
                continue;
            }
        }
        if let Some(al) = &allowed {
            if !al.contains(c) {
                missing.push(format!("core {c} is outside this process's CPU affinity"));
            }
        }
    }
    if !missing.is_empty() {
        return Check::warn(
            NAME,
            missing.join("; "),
            "list only online cores that the process may run on in tuning.shard_cores and \
             tuning.control_core (see `taskset -pc $$`, the container's cpuset, and \
             /sys/devices/system/cpu/online)",
        );
    }
    match (online, allowed) {
        (None, None) => Check::pass(NAME, "online cores unknown"),
        _ => Check::pass(
            NAME,
            format!("configured cores {cores:?} are online and allowed"),
        ),
    }
}

/// Hyperthread siblings of `core` (itself included), `None` if unknown.
fn read_siblings(core: usize) -> Option<Vec<usize>> {
    let path = format!("/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list");
    fs::read_to_string(path)
        .ok()
        .and_then(|s| parse_cpu_list(&s))
}

/// Warns when a shard shares a physical core with the control thread or with another shard.
fn check_siblings(
    shard_cores: &[usize],
    control_core: usize,
    siblings: impl Fn(usize) -> Option<Vec<usize>>,
) -> Check {
    const NAME: &str = "smt";
    let mut clashes = Vec::new();
    let mut known = false;
    if shard_cores.contains(&control_core) {
        clashes.push(format!("control core {control_core} is also a shard core"));
    }
    for (i, s) in shard_cores.iter().enumerate() {
        let Some(sib) = siblings(*s) else { continue };
        known = true;
        if *s != control_core && sib.contains(&control_core) {
            clashes.push(format!(
                "shard core {s} and control core {control_core} are SMT siblings"
            ));
        }
        for other in &shard_cores[i + 1..] {
            if other != s && sib.contains(other) {
                clashes.push(format!("shard cores {s} and {other} are SMT siblings"));
            }
        }
    }
    if !clashes.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "{}: siblings share one core's execution units and caches",
                clashes.join("; ")
            ),
            "give each shard its own physical core and keep the control thread off the shards' \
             siblings (see /sys/devices/system/cpu/cpuN/topology/thread_siblings_list), or turn \
             SMT off (echo off > /sys/devices/system/cpu/smt/control)",
        );
    }
    if known {
        Check::pass(
            NAME,
            "no shard shares a physical core with the control thread or another shard",
        )
    } else {
        Check::pass(NAME, "SMT topology unknown")
    }
}

/// Every check, in the order `fedbus tune` prints them. `fedbus run` logs the failed ones and
/// exits if one is fatal.
pub fn checks(cfg: &crate::config::Config) -> Vec<Check> {
    let shard_cores = cfg.shard_cores();
    let mut out = vec![
        check_io_uring(),
        check_memlock(shard_cores.len(), cfg.tuning.io_memory),
    ];
    out.extend(advisory_checks(&shard_cores, cfg.tuning.control_core));
    out.push(check_link_outbox(&cfg.limits));
    out
}

/// Warns when a link's outbox cannot hold the largest request a link may carry: a request
/// larger than `limits.max_link_outbox_bytes` gets `503 task_busy` (or `peer_busy`) however
/// idle the link is, on every retry. A warning, not an error: a small outbox is a way to test
/// a full one.
fn check_link_outbox(l: &crate::config::Limits) -> Check {
    const NAME: &str = "outbox";
    let largest = l.max_message_bytes();
    if l.max_link_outbox_bytes < largest {
        return Check::warn(
            NAME,
            format!(
                "limits.max_link_outbox_bytes ({}) is below the largest request a link carries \
                 (limits.max_body_bytes + 64 KiB = {largest}): larger requests always get 503 \
                 task_busy or peer_busy",
                l.max_link_outbox_bytes
            ),
            format!(
                "raise limits.max_link_outbox_bytes to at least {largest}, or lower \
                 limits.max_body_bytes"
            ),
        );
    }
    Check::pass(
        NAME,
        format!(
            "limits.max_link_outbox_bytes ({}) holds the largest request ({largest})",
            l.max_link_outbox_bytes
        ),
    )
}

/// Runs every check for `fedbus tune`, prints one line per check (and its fix when it fails),
/// and returns false if a fatal check failed.
pub fn report(cfg: &crate::config::Config) -> bool {
    let all = checks(cfg);
    println!(
        "fedbus tune: control core {}, shard cores {:?}, io_memory {}",
        cfg.tuning.control_core,
        cfg.shard_cores(),
        bytes(cfg.tuning.io_memory as u64)
    );
    for c in &all {
        println!("{:<4} {:<10} {}", c.status(), c.name, c.detail);
        if !c.ok {
            println!("{:<15} fix: {}", "", c.fix);
        }
    }
    let fatal = all.iter().any(|c| c.fatal && !c.ok);
    if fatal {
        println!("fedbus cannot run on this host until the FAIL lines are fixed");
    }
    !fatal
}

/// The value of a `Name:\tvalue` line of `/proc/self/status`.
fn parse_status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
}

/// `CapEff` from `/proc/self/status` text (hex).
fn parse_cap_eff(status: &str) -> Option<u64> {
    parse_status_field(status, "CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// `CAP_IPC_LOCK` is capability 14.
fn has_cap_ipc_lock(cap_eff: u64) -> bool {
    cap_eff & (1 << 14) != 0
}

/// A kernel CPU list (`0`, `0,8`, `0-3,8-11`, empty) as sorted CPU numbers; `None` if malformed.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().ok()?,
                b.trim().parse::<usize>().ok()?,
            ),
            None => {
                let v = part.trim().parse::<usize>().ok()?;
                (v, v)
            }
        };
        if lo > hi || hi >= MAX_CPUS || out.len() + (hi - lo) >= MAX_CPUS {
            return None;
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// The first whitespace-separated number of a `/proc/sys` file.
fn read_number(path: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
}

fn limit_text(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

fn bytes(v: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if v >= MIB && v.is_multiple_of(MIB) {
        format!("{} MiB", v / MIB)
    } else if v >= KIB && v.is_multiple_of(KIB) {
        format!("{} KiB", v / KIB)
    } else {
        format!("{v} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{online_cores, Config};

    #[test]
    fn cap_eff_is_parsed_and_bit_14_is_ipc_lock() {
        let status = "Name:\tfedbus\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_eq!(eff, 0x1fffeffffff);
        assert!(has_cap_ipc_lock(eff));
        assert!(has_cap_ipc_lock(1 << 14));
        assert!(!has_cap_ipc_lock(0));
        assert!(!has_cap_ipc_lock(!(1 << 14)));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn cpu_lists_are_parsed() {
        assert_eq!(parse_cpu_list("0,8\n"), Some(vec![0, 8]));
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        assert_eq!(
            parse_cpu_list("0-3,8-11"),
            Some(vec![0, 1, 2, 3, 8, 9, 10, 11])
        );
        assert_eq!(parse_cpu_list("8,0"), Some(vec![0, 8]));
        assert_eq!(parse_cpu_list("\n"), Some(vec![]));
        assert_eq!(parse_cpu_list("1-0"), None);
        assert_eq!(parse_cpu_list("a"), None);
        assert_eq!(parse_cpu_list("0-"), None);
        assert_eq!(parse_cpu_list("0-18446744073709551615"), None);
    }

    #[test]
    fn seccomp_field_is_read() {
        let s = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(parse_status_field(s, "Seccomp:"), Some("2"));
    }

    #[test]
    fn io_uring_errors_name_their_fix() {
        assert!(io_uring_verdict(Ok(()), None, None).ok);
        let c = io_uring_verdict(Err(libc::ENOSYS), None, None);
        assert!(!c.ok && c.fatal && c.detail.contains("ENOSYS"), "{c:?}");
        let c = io_uring_verdict(Err(libc::EPERM), Some(0), Some(2));
        assert!(
            c.fatal && c.detail.contains("seccomp") && c.fix.contains("seccomp=unconfined"),
            "{c:?}"
        );
        let c = io_uring_verdict(Err(libc::EPERM), Some(2), Some(0));
        assert!(
            c.detail.contains("io_uring_disabled=2") && c.fix.contains("io_uring_disabled=0"),
            "{c:?}"
        );
        let c = io_uring_verdict(Err(libc::EACCES), None, None);
        assert!(
            c.fix.contains("seccomp") && c.fix.contains("io_uring_disabled=0"),
            "{c:?}"
        );
    }

    #[test]
    fn memlock_verdicts() {
        let mib = 1 << 20;
        // Unlimited, unknown and enough pass.
        assert!(memlock_verdict(Some(libc::RLIM_INFINITY), false, 15, mib).ok);
        assert!(memlock_verdict(None, false, 15, mib).ok);
        assert!(memlock_verdict(Some(64 << 20), false, 15, mib).ok);
        // Below glommio's floor is fatal even for root.
        let c = memlock_verdict(Some(256 * 1024), true, 1, mib);
        assert!(!c.ok && c.fatal, "{c:?}");
        // 8 MiB is not enough for 15 shards of 1 MiB: a warning, or fine when privileged.
        let c = memlock_verdict(Some(8 << 20), false, 15, mib);
        assert!(
            !c.ok && !c.fatal && c.fix.contains("ulimit -l unlimited"),
            "{c:?}"
        );
        assert!(c.fix.contains("LimitMEMLOCK=infinity") && c.fix.contains("tuning.io_memory"));
        assert!(memlock_verdict(Some(8 << 20), true, 15, mib).ok);
        // glommio rounds io_memory up to 64 KiB at least.
        assert_eq!(effective_io_memory(0), 64 * 1024);
        assert_eq!(effective_io_memory(mib), mib as u64);
        assert_eq!(effective_io_memory(mib + 1), mib as u64 + 4096);
    }

    #[test]
    fn smt_siblings_are_flagged() {
        // 4 cores, 2 threads each: 0,4 1,5 2,6 3,7.
        let topo = |c: usize| Some(vec![c % 4, c % 4 + 4]);
        assert!(check_siblings(&[1, 2, 3], 0, topo).ok);
        let c = check_siblings(&[1, 2, 3, 4], 0, topo);
        assert!(
            !c.ok && c.detail.contains("shard core 4 and control core 0"),
            "{c:?}"
        );
        let c = check_siblings(&[1, 5], 0, topo);
        assert!(!c.ok && c.detail.contains("shard cores 1 and 5"), "{c:?}");
        let c = check_siblings(&[0], 0, |_| None);
        assert!(!c.ok && c.detail.contains("also a shard core"), "{c:?}");
        assert!(check_siblings(&[1], 0, |_| None).ok);
    }

    #[test]
    fn kernel_tls_is_reported_either_way() {
        let with = ktls_verdict(Some("mptcp tls\n"));
        assert!(with.ok && with.detail.contains("available"), "{with:?}");
        let without = ktls_verdict(Some("mptcp\n"));
        assert!(without.ok && without.detail.contains("no kernel TLS (ULPs: mptcp)"));
        assert!(ktls_verdict(None).ok);
        assert!(checks(&Config::default()).iter().any(|c| c.name == "ktls"));
        assert!(checks(&Config::default()).iter().any(|c| c.name == "rings"));
    }

    #[test]
    fn migrate_req_is_advised_for_takeovers() {
        assert!(migrate_verdict(Some("1\n")).ok);
        let off = migrate_verdict(Some("0\n"));
        assert!(!off.ok && !off.fatal && off.fix.contains("tcp_migrate_req=1"));
        assert!(migrate_verdict(None).ok);
    }

    #[test]
    fn rings_say_which_setup_the_kernel_gives() {
        // The default: deferred task work.
        let c = ring_verdict(true, Ok(()), Ok(()));
        assert!(c.ok && c.detail.starts_with("DEFER_TASKRUN"), "{c:?}");
        let c = ring_verdict(true, Err(libc::EINVAL), Ok(()));
        assert!(
            !c.ok && !c.fatal && c.detail.contains("before 6.1") && c.fix.contains("6.1"),
            "{c:?}"
        );
        // FEDBUS_IO_URING_DEFER=0: COOP_TASKRUN, whatever the kernel says of DEFER_TASKRUN.
        for d in [Ok(()), Err(libc::EINVAL)] {
            let c = ring_verdict(false, d, Ok(()));
            assert!(c.ok && c.detail.starts_with("COOP_TASKRUN"), "{c:?}");
        }
        for w in [true, false] {
            let c = ring_verdict(w, Err(libc::EINVAL), Err(libc::EINVAL));
            assert!(
                !c.ok && !c.fatal && c.detail.contains("before 5.19") && c.fix.contains("5.19"),
                "{c:?}"
            );
        }
        // io_uring blocked (seccomp, sysctl): not a kernel too old; the io_uring check says why.
        for w in [true, false] {
            let c = ring_verdict(w, Err(libc::EPERM), Err(libc::EPERM));
            assert!(c.ok && c.detail.contains("unknown"), "{c:?}");
            let c = ring_verdict(w, Err(libc::EINVAL), Err(libc::ENOSYS));
            assert!(c.ok && c.detail.contains("unknown"), "{c:?}");
        }
    }

    /// The probe's flags reach the kernel: flags no kernel knows are refused with EINVAL.
    #[test]
    fn the_ring_probe_passes_its_flags() {
        if probe_io_uring().is_ok() {
            assert_eq!(probe_io_uring_with(1 << 31), Err(libc::EINVAL));
        }
    }

    #[test]
    fn a_link_outbox_below_the_largest_request_is_warned() {
        let mut l = crate::config::Limits::default();
        assert!(
            check_link_outbox(&l).ok,
            "the defaults hold a whole request"
        );
        l.max_link_outbox_bytes = 100_000;
        let c = check_link_outbox(&l);
        assert!(!c.ok && !c.fatal, "{}", c.detail);
        assert!(c.detail.contains("503 task_busy"), "{}", c.detail);
        l.max_body_bytes = 1000;
        assert!(check_link_outbox(&l).ok);
    }

    #[test]
    fn checks_never_panic_on_this_host() {
        let all = checks(&Config::default());
        assert!(all.iter().any(|c| c.name == "io_uring"));
        assert!(all.iter().all(|c| c.ok || !c.fix.is_empty()), "{all:?}");
        let fatal = all.iter().any(|c| c.fatal && !c.ok);
        assert_eq!(report(&Config::default()), !fatal);
    }

    /// The example configs in tuning/, with the cores each one is written for.
    const EXAMPLES: [(&str, &str, usize); 3] = [
        (
            "tuning/2-core.toml",
            include_str!("../../../tuning/2-core.toml"),
            2,
        ),
        (
            "tuning/8-core.toml",
            include_str!("../../../tuning/8-core.toml"),
            8,
        ),
        (
            "tuning/16-core.toml",
            include_str!("../../../tuning/16-core.toml"),
            16,
        ),
    ];

    /// `Config::validate` checks cores against this host, so a 16-core example cannot pass it on
    /// a 2-core machine. Where the host is big enough, the file must pass `Config::parse`
    /// whole; elsewhere every field is still checked (unknown fields included) and the cores
    /// are checked against the size the file is written for.
    #[test]
    fn tuning_examples_parse() {
        for (path, text, cores) in EXAMPLES {
            if online_cores() >= cores {
                Config::parse(text, path).unwrap_or_else(|e| panic!("{e}"));
            }
            let cfg: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"));
            let t = &cfg.tuning;
            assert!(t.control_core < cores, "{path}");
            assert!(
                !t.shard_cores.is_empty(),
                "{path}: list the shard cores explicitly"
            );
            assert!(t.shard_cores.iter().all(|c| *c < cores), "{path}");
            assert!(!t.shard_cores.contains(&t.control_core), "{path}");
            let mut host_sized = cfg.clone();
            host_sized.tuning.shard_cores.clear();
            host_sized.tuning.control_core = 0;
            host_sized
                .validate()
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
}
