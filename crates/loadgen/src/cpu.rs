//! CPU time of the server processes during the measurement window, from `/proc/PID/stat`
//! (user + system time of every thread of the process), so a report can say how much router
//! CPU one request costs.

/// User + system CPU seconds used so far by `pid` (all its threads), or None when the process
/// is gone or `/proc` is not readable.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|ticks| ticks as f64 / ticks_per_second())
}

/// The sum over `pids`; None if one cannot be read.
pub(crate) fn total(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// utime + stime (clock ticks) from one `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "1234 (fed bus) (x)) S 1 2 3 4 5 6 7 8 9 10 250 40 0 0 20 0 3 0";
        assert_eq!(parse_stat(line), Some(290));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (a) S 1 2"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = std::process::id();
        let a = cpu_seconds(me).expect("own /proc stat");
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = cpu_seconds(me).expect("own /proc stat");
        assert!(b > a, "{a} -> {b} ({x})");
        assert!(total(&[me, u32::MAX]).is_none());
    }
}
