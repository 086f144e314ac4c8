//! Hands memory the allocator keeps after a burst back to the system. An initial sync of
//! 150,000 pods frees hundreds of MiB of transient buffers (list pages, requests, answers)
//! in the middle of glibc's heaps, where it stays resident unless trimmed: measured at
//! 50,000 pods, a trim took the steady RSS from 323 to 268 MiB.

/// Trims the allocator's free memory, off the async workers (a trim walks every heap).
/// Only glibc keeps such memory this way and has the call; elsewhere, and outside a tokio
/// runtime, this does nothing.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(|| {
            unsafe extern "C" {
                fn malloc_trim(pad: usize) -> std::ffi::c_int;
            }
            // SAFETY: malloc_trim takes no pointer and locks each arena it trims.
            unsafe { malloc_trim(0) };
        });
    }
}
