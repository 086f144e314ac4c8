//! A test process that does not end is shown, not just killed: its threads' stacks, and the
//! processes it still waits on, go to stderr.
//!
//! - On SIGTERM (nextest's timeout sends it, then SIGKILL after the grace period): dumped at
//!   once, then the process dies of the SIGTERM as it would have.
//! - After the body: a test holds [`body()`]'s guard; once it drops (the body ended, the
//!   locals and the runtime are being torn down), a process still alive [`AFTER_BODY`] later
//!   dumps the same, once.
//!
//! The stacks come from gdb attached to this process (testbed.sh installs it); the kernel's
//! view of each thread (/proc/self/task: state and wait channel) comes with them, and so does
//! every child process with its state, since a `wait()` on a child that never exits is a
//! hang of its own.

use std::io::{Read, Write};
use std::sync::Once;
use std::time::Duration;

/// How long a test process may take to exit after its body ended.
pub const AFTER_BODY: Duration = Duration::from_secs(60);

/// Installs the SIGTERM dump (once per process, and only under nextest: a demo stopped with
/// SIGTERM just stops). Called by every bed's start.
pub fn install() {
    static ONCE: Once = Once::new();
    if std::env::var_os("NEXTEST").is_none() {
        return;
    }
    ONCE.call_once(|| {
        let mut fds = [0i32; 2];
        // SAFETY: a pipe whose ends no child inherits; the handler only write()s one byte to
        // it (async-signal-safe).
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_FD.store(fds[1], std::sync::atomic::Ordering::SeqCst);
        // SAFETY: installing a handler whose body is async-signal-safe; SA_RESTART so that no
        // system call of the test fails with EINTR because of it.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigterm as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
        }
        let read_fd = fds[0];
        let _ = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
            // SAFETY: our own pipe's read end, owned by this thread from here on.
            let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(read_fd) };
            let mut byte = [0u8; 1];
            if pipe.read(&mut byte).is_ok_and(|n| n == 1) {
                dump("SIGTERM (the test runner's timeout)");
                // Die of the signal, as without the handler.
                // SAFETY: restoring the default action and signalling ourselves.
                unsafe {
                    libc::signal(libc::SIGTERM, libc::SIG_DFL);
                    libc::raise(libc::SIGTERM);
                }
            }
        });
    });
}

static SIGNAL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_sigterm(_: libc::c_int) {
    let fd = SIGNAL_FD.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe.
        unsafe { libc::write(fd, b"t".as_ptr().cast(), 1) };
    }
}

/// Held for the length of a test's body: when it drops, a process that is still alive
/// [`AFTER_BODY`] later dumps its stacks.
#[must_use = "the guard marks the end of the body when it drops"]
pub struct Body {
    name: String,
}

/// The guard of a test's body; take it as the body's first local (locals drop in reverse
/// order, so it drops last).
pub fn body(name: &str) -> Body {
    install();
    Body { name: name.to_string() }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Only where each test is a process of its own (nextest): under `cargo test` other
        // tests of the process may still be running, and gdb would stop them.
        if std::env::var_os("NEXTEST").is_none() {
            return;
        }
        let name = std::mem::take(&mut self.name);
        let _ = std::thread::Builder::new().name("watchdog-after-body".into()).spawn(move || {
            std::thread::sleep(AFTER_BODY);
            dump(&format!("{name}: still running {AFTER_BODY:?} after its body ended"));
        });
    }
}

/// Prints the kernel's view of each thread and the children at once, then every thread's
/// stack as gdb prints it, straight to stderr (gdb stops this process's threads while it
/// prints: nothing of ours may have to read its output).
pub fn dump(why: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let pid = std::process::id();
        let mut out = format!("\n===== watchdog: {why}: pid {pid} =====\n");
        for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
            let p = task.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default().trim().to_string();
            let state = read("stat").rsplit_once(')').map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_default();
            out += &format!("thread {} {:?}: state {state}, waiting in {}\n", task.file_name().to_string_lossy(), read("comm"), read("wchan"));
        }
        for (child, cmd) in children(pid) {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_default();
            out += &format!("child {child} (state {state}): {cmd}\n");
        }
        out += "----- every thread's stack (gdb) -----\n";
        let _ = std::io::stderr().write_all(out.as_bytes());
        let gdb = std::process::Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-nx", "-q", "-ex", "set pagination off", "-ex", "thread apply all bt"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status();
        if let Err(e) = gdb {
            eprintln!("(gdb: {e})");
        }
        eprintln!("===== watchdog: end =====");
    });
}

/// This process's children: (pid, command line).
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for k in kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()) {
            let cmd = std::fs::read(format!("/proc/{k}/cmdline")).map(|c| String::from_utf8_lossy(&c).replace('\0', " ")).unwrap_or_default();
            out.push((k, cmd.trim().to_string()));
        }
    }
    out
}
