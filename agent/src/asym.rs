//! Asymmetric locking: a hot path that takes a lock with plain stores, and a rare path that
//! pays for both with a process-wide barrier (decisions 0087 and 0088).
//!
//! The hot side marks itself busy with a plain store and then reads the rare side's flag; the
//! rare side sets its flag, then runs `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes
//! every running thread of this process execute a full memory barrier, and then reads the hot
//! side's mark. So at least one of them sees the other (the store-load order a hot-side fence
//! would give, paid for by the rare side), without a locked instruction on the hot path.
//! Where the call is missing (not Linux, an old kernel, a seccomp filter), [`asymmetric`] is
//! false and callers use their ordinary lock on both sides.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not tried yet, 1: expedited private membarriers registered for this process, 2: not
/// available.
static ASYMMETRIC: AtomicU8 = AtomicU8::new(0);

/// Registers the process for expedited private membarriers once. Called before the first
/// structure that uses the protocol exists (`Aggregator::new`, `Table::new`), so every
/// participant of one structure agrees on the protocol: the flag goes from 0 to 1 or 2 once
/// and never changes again.
pub(crate) fn init_asymmetric() {
    if ASYMMETRIC.load(Ordering::Acquire) != 0 {
        return;
    }
    let ok = membarrier::register();
    let _ = ASYMMETRIC.compare_exchange(
        0,
        if ok { 1 } else { 2 },
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

/// Whether the hot side may take its lock with plain stores.
#[inline(always)]
pub(crate) fn asymmetric() -> bool {
    ASYMMETRIC.load(Ordering::Relaxed) == 1
}

#[cfg(target_os = "linux")]
pub(crate) mod membarrier {
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn call(cmd: libc::c_long) -> bool {
        // SAFETY: membarrier takes integers and touches no memory of ours; an unknown command
        // or an unsupported kernel returns -1 (ENOSYS, EINVAL, EPERM). Exercised by every test
        // of the aggregator and the entitlement table.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            ) == 0
        }
    }

    /// Whether expedited private barriers are available (and now registered).
    pub(crate) fn register() -> bool {
        call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) && call(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
    }

    /// A full memory barrier on every running thread of this process. It cannot fail once
    /// registered; if it ever did, the process stops rather than let two sides in at once.
    pub(crate) fn barrier() {
        if !call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
            tracing::error!("membarrier failed after its registration succeeded");
            std::process::abort();
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) mod membarrier {
    /// Not available: callers use their ordinary lock.
    pub(crate) fn register() -> bool {
        false
    }
    /// Never called ([`super::asymmetric`] is false).
    pub(crate) fn barrier() {}
}
