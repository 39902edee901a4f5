//! CPU time and resident memory of a process, from `/proc` (Linux).

use std::time::Instant;

/// Ticks per second of `/proc/<pid>/stat`'s times: the kernel's `USER_HZ`, which is 100 on
/// every Linux architecture this runs on (it is part of the ABI, unlike `HZ`).
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    cpu_s: f64,
}

impl Sample {
    /// CPU seconds so far.
    pub fn cpu_s(&self) -> f64 {
        self.cpu_s
    }
}

/// Memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    /// Resident now.
    pub rss_kib: u64,
    /// Highest resident so far.
    pub peak_kib: u64,
}

/// User + system CPU seconds of `pid` (`"self"` for this process) so far.
pub fn sample(pid: &str) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(Sample {
        at: Instant::now(),
        cpu_s: (utime + stime) / USER_HZ,
    })
}

/// Share of one core used between two samples, in percent.
pub fn cpu_percent(a: Sample, b: Sample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    100.0 * (b.cpu_s - a.cpu_s) / wall
}

/// Resident and peak resident memory of `pid`.
pub fn memory(pid: &str) -> Memory {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Memory::default();
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let a = super::sample("self").expect("stat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let b = super::sample("self").expect("stat");
        assert!(super::cpu_percent(a, b) >= 0.0);
        let m = super::memory("self");
        assert!(m.rss_kib > 0 && m.peak_kib >= m.rss_kib);
    }
}
