//! Named crash points for the crash-safety tests: with `DEEPRANK_CRASH_AT=NAME` (or `NAME:N`, the
//! N-th time the point is passed) the process kills itself with SIGKILL there, as `kill -9` would:
//! no destructor runs and nothing buffered is flushed. Unset, a point costs one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

fn target() -> &'static Option<(String, usize)> {
    static T: OnceLock<Option<(String, usize)>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var("DEEPRANK_CRASH_AT").ok()?;
        match v.rsplit_once(':') {
            Some((name, n)) if n.parse::<usize>().is_ok() => {
                Some((name.to_string(), n.parse().unwrap_or(1)))
            }
            _ => Some((v, 1)),
        }
    })
}

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Dies here when `DEEPRANK_CRASH_AT` names this point (and this is its N-th pass).
pub fn point(name: &str) {
    if let Some((t, n)) = target()
        && t == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        kill_self();
    }
}

/// Whether `DEEPRANK_CRASH_AT` names this point (for points that first leave a torn write).
pub fn armed(name: &str) -> bool {
    matches!(target(), Some((t, n)) if t == name && HITS.load(Ordering::SeqCst) + 1 == *n)
}

fn kill_self() -> ! {
    // SAFETY: plain libc calls; SIGKILL cannot be caught, the process ends here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
