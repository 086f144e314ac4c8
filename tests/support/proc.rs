//! A process as /proc shows it: whether it has exited or stopped, its CPU and memory (for
//! the benchmarks).

use std::time::{Duration, Instant};

/// SIGSTOPs `pid` and returns once every thread of it is stopped. kill(2) only queues the
/// stop: each thread stops itself when it next leaves the kernel, and one in an
/// uninterruptible wait (a page fault on a busy disk) runs on until it does, so a request
/// sent right after the kill can still be answered (a busy run saw a "stalled" apiserver
/// answer). Panics if the process has not stopped within 10 s.
pub fn stop(pid: u32) {
    // SAFETY: the caller signals a child of its own.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let start = Instant::now();
    loop {
        let states = thread_states(pid);
        if !states.is_empty() && states.iter().all(|s| *s == 'T' || *s == 't') {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "process {pid} not stopped 10 s after SIGSTOP: thread states {states:?}");
        // Never long: a stop normally completes within microseconds.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the child `pid` (not reaped yet) has exited: a zombie, or gone.
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()).is_none_or(|c| c == 'Z' || c == 'X'),
        Err(_) => true,
    }
}

/// The state letter of each thread of `pid` (empty when the process is gone).
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
        .collect()
}

/// CPU seconds (user + system) the process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the ')'.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Resident set size in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The most the process has had resident since it started (its high-water mark), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// Average cores used by each process over `window`.
pub async fn cores_over(pids: &[u32], window: Duration) -> Vec<f64> {
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let start = Instant::now();
    tokio::time::sleep(window).await; // the measurement window itself
    let secs = start.elapsed().as_secs_f64();
    pids.iter().zip(before).map(|(p, b)| (cpu_seconds(*p) - b) / secs).collect()
}

/// CPU seconds of several processes, and of the whole machine, at one instant: the start of
/// a measurement window whose end is `cores_since`.
pub struct CpuMark {
    at: Instant,
    pids: Vec<u32>,
    used: Vec<f64>,
    machine: (f64, f64),
}

impl CpuMark {
    pub fn now(pids: &[u32]) -> CpuMark {
        CpuMark { at: Instant::now(), pids: pids.to_vec(), used: pids.iter().map(|p| cpu_seconds(*p)).collect(), machine: machine_busy_total() }
    }

    /// Average cores each process used since the mark, in the order given.
    pub fn cores_since(&self) -> Vec<f64> {
        let secs = self.at.elapsed().as_secs_f64().max(1e-9);
        self.pids.iter().zip(&self.used).map(|(p, b)| (cpu_seconds(*p) - b) / secs).collect()
    }

    /// Average cores the whole machine was busy since the mark (everything but idle and
    /// iowait in /proc/stat), whoever used them.
    pub fn machine_cores_since(&self) -> f64 {
        let (busy, total) = machine_busy_total();
        let (b0, t0) = self.machine;
        if total <= t0 {
            return 0.0;
        }
        (busy - b0) / (total - t0) * super::bench::cores() as f64
    }
}

/// (busy, total) jiffies of all CPUs from /proc/stat.
fn machine_busy_total() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0.0, 0.0) };
    let v: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest fields are already in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}
