//! Crash points for fault-injection tests: with `PODLEASE_FAILPOINT=<name>` set, the process
//! aborts (as a SIGKILL would end it) the first time it reaches that point. Unset, a point
//! costs one load of a cached value.

use std::sync::OnceLock;

pub fn hit(name: &str) {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    if POINT.get_or_init(|| std::env::var("PODLEASE_FAILPOINT").ok()).as_deref() == Some(name) {
        eprintln!("podlease: failpoint {name} reached; aborting");
        std::process::abort();
    }
}

/// True the first time `name` is reached with `PODLEASE_FAILPOINT=<name>` set: the caller
/// then fails in its own way (a panic in a task, say) instead of aborting the process.
pub fn once(name: &str) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRED: AtomicBool = AtomicBool::new(false);
    std::env::var("PODLEASE_FAILPOINT").ok().as_deref() == Some(name) && !FIRED.swap(true, Ordering::Relaxed)
}
