#!/usr/bin/env python3
"""Turns a `perf record -g` of the fedbus router (and a `perf stat` beside it) into the short
text profile of `PROFILE=<file> benches/cpu-per-request.sh`: counts per request, the split by
shared object, samples grouped by what they do, and the top symbols.

Grouping: a user-space sample counts for its leaf symbol (the release build has no frame
pointers, so user-space callers are not reliable). A kernel sample whose leaf is generic glue
(a spin lock release, softirq entry) counts for the first caller up its kernel stack that
belongs to a group: a lock released inside `try_to_wake_up` is a wake-up, one released inside
`tcp_sendmsg` is the net stack.
"""
import json
import os
import re
import sys
from collections import defaultdict

# Leaves that say nothing about the work: walk up the kernel stack past them.
GLUE = re.compile(
    r"^(_raw_spin_|__raw_spin_|_raw_read_|_raw_write_|__pv_queued_spin|native_queued_spin|queued_spin|"
    r"__local_bh_enable|local_bh_enable|do_softirq|__do_softirq|handle_softirqs|irq_exit|"
    r"__irq_exit|preempt_|__rcu_read|rcu_read|lock_sock|release_sock|__release_sock|"
    r"mutex_|__mutex|up_read|down_read|refcount_|__check_object_size|check_heap_object|"
    r"__virt_addr_valid|fput|__fget|__fput|kvm_|pvclock|native_sched_clock|sched_clock|"
    r"native_write_msr|xas_load|xa_load|llist_)"
)

# Interrupt entries of IPIs: a sample under one is the IPI's cost (in a guest, VM exits).
IPI = re.compile(r"^(asm_sysvec_reschedule_ipi|asm_sysvec_call_function|sysvec_reschedule_ipi|"
                 r"sysvec_call_function)")

KERNEL_GROUPS = [
    ("memcpy and friends", r"^(memcpy|memmove|memset|__memcpy|__memmove|__memset|copy_user|_copy_to_iter|"
                           r"_copy_from_iter|rep_movs|copy_page|__copy_|csum_partial_copy|skb_copy_datagram_iter|"
                           r"simple_copy_to_iter|__skb_datagram_iter|copyout|copyin)"),
    ("wake-ups and scheduler", r"^(sock_def_readable|sock_def_write_space|try_to_wake_up|ttwu_|__wake_up|wake_up|autoremove_wake|ep_poll_callback|"
                               r"schedule|__schedule|finish_task_switch|pick_next|enqueue_|dequeue_|"
                               r"update_curr|update_load|update_cfs|psi_|select_task_rq|__smp_call|"
                               r"smp_call|send_call_function|native_send_call|x2apic_|default_send_IPI|"
                               r"__x2apic|sched_|set_next_entity|put_prev|activate_task|check_preempt|"
                               r"resched_curr|wakeup_preempt|__flush_smp_call|flush_smp_call|kick_process|"
                               r"io_schedule|schedule_hrtimeout|hrtimer_|__hrtimer|do_nanosleep|"
                               r"sysvec_call_function|asm_sysvec_call_function|__sysvec_call_function)"),
    ("syscall layer (entry/exit, fd lookup, msghdr copy)", r"^(fdget|fget|____sys_sendmsg|___sys_sendmsg|"
                                         r"__sys_sendmsg|__sys_recvfrom|__x64_sys_recvfrom|__x64_sys_sendmsg|"
                                         r"copy_msghdr|copy_iovec|iovec_from_user|__import_iovec|import_iovec|"
                                         r"_copy_from_user|entry_SYSCALL|do_syscall_64|syscall_exit|syscall_return|"
                                         r"irqentry_|exit_to_user_mode|arch_exit_to_user|"
                                         r"restore_fpregs|switch_fpu|fpregs_|asm_sysvec|sysvec_|"
                                         r"__sysvec|asm_common_interrupt|common_interrupt|"
                                         r"__x64_sys_|x64_sys_call|__do_sys_|ret_from_fork|"
                                         r"entry_SYSRETQ|error_entry|asm_exc|exc_)"),
    ("io_uring (incl. the signal-notify path that runs its task work)", r"^(io_|__io_|tctx_task_work|task_work_run|ctx_flush_and_put|get_signal|arch_do_signal_or_restart|__x64_sys_io_uring|__do_sys_io_uring|"
                 r"__arm64_sys_io_uring|io_uring)"),
    ("kernel net stack (tcp, ip, loopback, skb)",
     r"^(tcp_|__tcp|inet_|__inet|inet6_|ip_|__ip|ip4|ipv4|ip6|skb_|__skb|kfree_skb|consume_skb|"
     r"alloc_skb|__alloc_skb|napi_|__napi|sock_|__sock|sk_|__sk_|sk_stream|loopback_|__netif|"
     r"netif_|net_rx|process_backlog|__dev_queue|dev_hard|dev_queue|validate_xmit|bbr_|cubictcp|"
     r"__sys_send|__sys_recv|nf_|__nf|neigh_|__neigh|dst_|fib_|raw_local|sock_def|security_sock|"
     r"selinux_sock|apparmor_sock|bpf_|__cgroup_bpf|lock_sock_fast|tso_|__kfree_skb|"
     r"kmalloc_reserve|__build_skb|skb$|mem_cgroup_charge_skmem|__sk_mem|sk_mem|sk_forced|"
     r"__napi_poll|dev_|rps_|eth_|__copy_skb|pskb_|___pskb|__pskb|tcp4_|ktime_get_with|"
     r"__ksize|__put_user|release_sock|sk_reset_timer|__mod_timer|mod_timer|rb_first|rb_next|rb_erase|rb_insert)"),
    ("kernel memory (slab, pages)", r"^(kmem_cache|__kmem_cache|kmalloc|__kmalloc|kfree|__kfree|slab_|"
                                    r"___slab|__slab|page_frag|__page_frag|get_page|put_page|__free_pages|"
                                    r"free_unref|alloc_pages|__alloc_pages|get_page_from_freelist|"
                                    r"__folio|folio_|rmqueue|kvfree|kvmalloc|__kvmalloc|memcg_|"
                                    r"obj_cgroup|__mod_memcg|mod_objcg|refill_obj)"),
    ("time (clock reads)", r"^(ktime_get|read_tsc|native_read_tsc|kvm_clock|pvclock|__vdso|clock_gettime)"),
]

USER_GROUPS = [
    ("memcpy and friends", r"^(__memmove|__memcpy|__memset|memcpy|memmove|memset|__memcmp|memcmp|bcmp|"
                           r"__bcmp|__mempcpy|__strlen|__memchr|memchr)"),
    ("allocation (malloc/free)", r"^(malloc|free|cfree|realloc|calloc|_int_malloc|_int_free|_int_realloc|"
                                 r"__libc_malloc|__libc_free|__libc_realloc|malloc_consolidate|tcache|"
                                 r"unlink_chunk|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_|"
                                 r"alloc::alloc::|alloc::raw_vec::|_int_free_merge|_int_free_create|"
                                 r"_int_free_maybe|arena_get|__GI___libc)"),
    ("time (clock reads)", r"^(__vdso_clock_gettime|clock_gettime|__clock_gettime|std::time::|"
                           r"std::sys::pal::unix::time|std::sys::.*time)"),
    ("glommio executor", r"^glommio::"),
    ("fedbus: HTTP parse", r"^(fedbus[a-z_]*::api::http|httparse::|fedbus[a-z_]*::route::path|"
                           r"fedbus[a-z_]*::api::allowed_header|fedbus[a-z_]*::api::[a-z_]*parse|"
                           r"fedbus_proto::http)"),
    ("fedbus: route, dispatch, task link", r"^(fedbus[a-z_]*::(shard|routing|route|task|ws|proto)|fedbus_proto::)"),
    ("TLS record layer (rustls, futures-rustls)", r"^(rustls::|futures_rustls::|rustls_pki_types::)"),
    ("crypto (ring: AES-GCM of TLS records, JWT checks)", r"^(ring::|ring_core_)"),
    ("fedbus: auth (token cache, JWT)", r"^(fedbus[a-z_]*::(auth|api::auth)|fedbus_auth::)"),
    ("fedbus: metrics", r"^fedbus[a-z_]*::metrics"),
    ("fedbus: other", r"^fedbus"),
    ("futures, bytes, core/std glue", r"^(futures|bytes::|core::|std::|alloc::|hashbrown::|smallvec::|"
                                      r"slab::|async_task|concurrent_queue|crossbeam|tracing|"
                                      r"nix::|libc::|socket2::|scoped_tls|ahash::|rustc_hash::|foldhash::)"),
]


def compile_groups(groups):
    return [(name, re.compile(rx)) for name, rx in groups]


KG = compile_groups(KERNEL_GROUPS)
UG = compile_groups(USER_GROUPS)


def bare(sym):
    """Symbol without its offset and the leading `<` of a trait impl."""
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
    return sym.lstrip("<")


def classify(frames):
    """Group of one sample from its (symbol, dso) frames, leaf first."""
    if not frames:
        return "unknown"
    sym, dso = frames[0]
    if "kernel" not in dso:
        s = bare(sym)
        for name, rx in UG:
            if rx.search(s):
                return name
        return "other user space" if s not in ("[unknown]", "") else "unknown user space"
    for sym, _ in frames[:4]:
        if IPI.search(bare(sym)):
            return "IPIs received (reschedule / call-function interrupt and its return)"
    for sym, dso in frames:
        if "kernel" not in dso:
            break
        s = bare(sym)
        if GLUE.search(s):
            continue
        for name, rx in KG:
            if rx.search(s):
                return name
        return "kernel other"
    return "kernel other"


def read_samples(path):
    """(period, frames) of every sample of `perf script` output."""
    samples, frames, period = [], [], 0
    head = re.compile(r"^\S.*?\s(\d+)\s+\S+:\s*$|^\S.*?\s(\d+)\s+[\w:-]+:")
    for line in open(path, errors="replace"):
        if not line.strip():
            if frames or period:
                samples.append((period or 1, frames))
            frames, period = [], 0
            continue
        if not line[0].isspace():
            m = head.search(line)
            period = int(next(g for g in m.groups() if g)) if m else 1
            frames = []
            continue
        m = re.match(r"\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if m:
            frames.append((m.group(1), m.group(2)))
    if frames or period:
        samples.append((period or 1, frames))
    return samples


# What part of a request's journey a sample belongs to, from the user-space frames of its stack
# (`perf record --call-graph dwarf`: the release build has no frame pointers, so only a dwarf
# unwind sees them). First match wins, so a sendmsg made by the task link's writer counts there
# and not as a socket write in general. (label, substrings of a frame's symbol)
PATHS = [
    ("task link: send requests (writer task, sendmsg)", ("ws::conn::write_loop",)),
    ("task link: receive answers (read, decode, complete slots)", ("task::link::read_loop",)),
    # Plain TCP's `Stream::write_parts`; over TLS the write runs in `tls_write_parts`.
    ("client socket: send answers (sendmsg)", ("Stream>::write_parts", "ws::stream::tls_write_parts")),
    ("client socket: receive requests (recv)", ("api::http::fill",)),
    ("request handling (HTTP parse, routing, answer head, in-flight slots)", ("fedbus_router::",)),
]
IDLE_PATH = "glommio reactor, timers, sleep and wake-up (no fedbus frame)"


def path_of(frames):
    """The PATHS label of one sample (its frames leaf first)."""
    for label, keys in PATHS:
        if any(k in sym for sym, _ in frames for k in keys):
            return label
    return IDLE_PATH


def by_path(script, us):
    """Lines of the by-path table from a dwarf `perf script`: share, us/request, the part in the
    kernel and the part that is waking a peer or the scheduler (`classify`)."""
    samples = read_samples(script)
    total = sum(p for p, _ in samples) or 1
    share, kern, wake = defaultdict(int), defaultdict(int), defaultdict(int)
    for p, f in samples:
        label = path_of(f)
        share[label] += p
        if f and "kernel" in f[0][1]:
            kern[label] += p
            if classify(f) == "wake-ups and scheduler":
                wake[label] += p
    o = [f"  {'share':>6s}  {'us/req':>6s}  {'kernel':>6s}  {'wake-ups':>8s}  path"]
    for label in [l for l, _ in PATHS] + [IDLE_PATH]:
        p = share[label] or 1
        o.append(f"  {100 * share[label] / total:5.1f}%  {us * share[label] / total:6.2f}  "
                 f"{100 * kern[label] / p:5.0f}%  {100 * wake[label] / p:7.0f}%  {label}")
    return [f"({len(samples)} samples)", ""] + o


def read_stat(path):
    """Event name -> count (task-clock in ms) from a `perf stat -o` file."""
    out = {}
    for line in open(path):
        m = re.match(r"^\s*([\d,.]+)\s+(msec\s+)?(\S+)", line)
        if m and not line.strip().startswith("#") and m.group(3) != "seconds":
            try:
                out[m.group(3)] = float(m.group(1).replace(",", ""))
            except ValueError:
                pass
    return out


def main():
    (script, stat, stat_wrk, rec_wrk, dso, sym, model, kernel, perfv, load, conns, size,
     dur, ipis) = sys.argv[1:15]
    # The dwarf record of a third run of the load, for the by-path table (optional).
    paths_script = sys.argv[15] if len(sys.argv) > 15 else None
    w = json.load(open(stat_wrk))
    rw = json.load(open(rec_wrk))
    st = read_stat(stat)
    reqs = w["requests"]
    # PROFILE_TLS=1 benches/cpu-per-request.sh profiles the HTTPS listener instead.
    tls = os.environ.get("PROFILE_TLS") == "1"
    scheme, port, what = ("https", "$API_TLS", "HTTPS") if tls else ("http", "$API", "HTTP")
    # PROFILE_WS=1: /api/ws in the PIPE shape (it sets PROFILE_PIPE=1 too).
    ws = os.environ.get("PROFILE_WS") == "1"
    what += " /api/ws" if ws else ""
    # PROFILE_PIPE=1: `fedbus bench` in the PIPE shape (pipelined) instead of wrk.
    pipe = os.environ.get("PIPE", "8x8") if os.environ.get("PROFILE_PIPE") == "1" else ""
    shape = f"{pipe} (connections x requests in flight, pipelined)" if pipe else "1 request in flight per connection"
    env = ("PROFILE_TLS=1 " if tls else "") + ("PROFILE_WS=1 " if ws else "PROFILE_PIPE=1 " if pipe else "")
    if pipe:
        c, i = pipe.split("x")
        load_cmd = (f"#   taskset -c 0 fedbus bench --target {scheme}://127.0.0.1:{port}{' --protocol ws' if ws else ''} "
                    f"--connections {c} --inflight {i} --size {size}B --cores 0 --duration {dur}s")
    else:
        load_cmd = f"#   taskset -c 0 wrk -t1 -c{conns} -d{dur}s -s post.lua {scheme}://127.0.0.1:{port}  (1 in flight per connection)"
    # PROFILE_NGINX=1: nginx answering alone (the one-hop floor) under the same load and perf runs.
    nginx = os.environ.get("PROFILE_NGINX") == "1"
    server, pid = ("nginx answering alone (the floor)", "<nginx worker pid>") if nginx else ("the fedbus router", "<router pid>")
    if nginx:
        env, load_cmd = "PROFILE_NGINX=1 ", load_cmd.replace("$API", "$NGINX_ALONE")
        layout = ["# layout: nginx (master + 1 worker, `return 200` with SIZE bytes) core 1; load generator on core 0",
                  "#   taskset -c 1 nginx -c alone.conf"]
    else:
        layout = ["# layout: router shard core 1, control thread core 0; echo task and load generator on core 0",
                  "#   fedbus run --config router.toml   (shard_cores = [1], control_core = 0)",
                  "#   taskset -c 0 fedbus task echo --router 127.0.0.1:$INTERNAL --app demo/echo"]
    o = [f"# perf profile of {server} at {shape}, {what}, "
         f"{size} B", f"# machine: {model}, kernel {kernel}, {perfv}", f"# load (uptime) at the end: {load}",
         layout[0],
         f"# command: {env}PROFILE=<this file> benches/cpu-per-request.sh, which runs:",
         *layout[1:],
         load_cmd,
         f"#   perf stat -e <events below> -p {pid}             (over one run of the load)",
         f"#   perf record -F 999 -g -p {pid} -- sleep {int(dur) - 2}  (during a second run)",
         "# no hardware PMU in this guest: perf samples on cpu-clock (a timer), so time spent with",
         "# interrupts off is charged to where they come back on (_raw_spin_unlock_irqrestore,",
         "# irqentry_exit_to_user_mode); the grouping below walks past such glue to its caller.", ""]
    o += [f"## Counts per request (perf stat, {reqs} requests, {w['requests'] / (w['duration_us'] / 1e6):.0f} req/s, "
          f"p99 {w['p99_us']} us, errors {w['errors']})", ""]
    for k, v in st.items():
        if k == "task-clock":
            o.append(f"  {'server CPU (task-clock)':36s} {v * 1000 / reqs:8.2f} us/request")
        else:
            o.append(f"  {k:36s} {v / reqs:8.2f} /request")
    o.append(f"  {'IPIs received by core 1 (RES + CAL)':36s} {int(ipis) / reqs:8.2f} /request  (/proc/interrupts)")
    o.append("")
    o += [f"## By shared object (perf record, {rw['requests']} requests during the run)", ""]
    o += [l.rstrip() for l in open(dso)] + [""]
    samples = read_samples(script)
    total = sum(p for p, _ in samples) or 1
    groups = defaultdict(int)
    for p, f in samples:
        groups[classify(f)] += p
    us = st.get("task-clock", 0) * 1000 / reqs if reqs else 0
    o += [f"## Grouped ({len(samples)} samples; us/request = share x server CPU {us:.2f} us/request "
          "from perf stat)", ""]
    for name, p in sorted(groups.items(), key=lambda x: -x[1]):
        o.append(f"  {100 * p / total:5.1f}%  {us * p / total:6.2f} us  {name}")
    if paths_script:
        o += ["", "## By path: which step of the request the CPU goes to",
              f"# perf record -F 499 --call-graph dwarf,16384 -p <router pid> -- sleep {int(dur) - 2}"
              "  (during a third run)",
              "# a sample counts for the first step below whose code is on its stack; 'kernel' is",
              "# the part of that step's samples whose leaf is in the kernel, 'wake-ups' the part",
              "# grouped as 'wake-ups and scheduler' above (waking the peer that reads, sleeping);",
              "# a stack the unwinder cut short (16 KiB of it) has no fedbus frame: last row", ""]
        o += by_path(paths_script, us)
    o += ["", "## Top symbols (self time)", ""]
    o += [l.rstrip() for l in open(sym)] + [""]
    print("\n".join(o))


if __name__ == "__main__":
    main()
