//! Process metrics of the gateway itself, read from /proc at scrape time (Linux).

use super::{Family, Value, PROCESS_CPU, PROCESS_FDS, PROCESS_RSS, PROCESS_START};

/// Kernel clock ticks per second (USER_HZ): 100 on the Linux ABIs this runs on; reading it
/// through sysconf would need libc and unsafe code for no gain.
const CLOCK_TICKS: f64 = 100.0;

/// CPU seconds, resident memory, open descriptors and start time; empty where /proc is absent.
pub fn families() -> Vec<Family> {
    let mut out = Vec::new();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces) start at `state`.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
        // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
        if let (Some(utime), Some(stime)) = (field(11), field(12)) {
            let mut cpu = Family::new(PROCESS_CPU, "CPU time used by the gateway (user + system).");
            cpu.push(
                Vec::new(),
                Value::CounterSeconds((utime + stime) / CLOCK_TICKS),
            );
            out.push(cpu);
        }
        if let (Some(start), Some(boot)) = (field(19), boot_time()) {
            let mut started =
                Family::new(PROCESS_START, "Start time of the gateway, Unix seconds.");
            started.push(Vec::new(), Value::Gauge(boot + start / CLOCK_TICKS));
            out.push(started);
        }
    }
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
    {
        let mut family = Family::new(PROCESS_RSS, "Resident memory of the gateway.");
        family.push(Vec::new(), Value::Gauge(rss * 1024.0));
        out.push(family);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let mut family = Family::new(PROCESS_FDS, "Open file descriptors of the gateway.");
        family.push(Vec::new(), Value::Gauge(fds.count() as f64));
        out.push(family);
    }
    out
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}
