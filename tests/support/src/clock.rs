//! Wall-clock deadlines for the synchronous start/stop paths.
//!
//! The workspace bans `std::time::Instant::now` and `std::thread::sleep` because they break
//! tokio's paused-time tests and stall runtime workers. Starting and stopping real processes
//! is neither: it must measure real time (a paused tokio clock would never reach a deadline
//! while we wait on another process) and it runs outside any runtime's scheduling. The two
//! exceptions are confined to this module.

use std::time::{Duration, Instant};

/// How often the synchronous waits re-check their condition.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A point in real time after which a wait gives up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Self {
        Deadline { at: now() + timeout, timeout }
    }

    /// The timeout this deadline was created with, for error messages.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn expired(&self) -> bool {
        now() >= self.at
    }
}

/// Real time, deliberately not tokio's (possibly paused) clock: we wait on other processes.
#[allow(clippy::disallowed_methods, reason = "measures real processes; tokio's paused clock must not apply")]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// Sleeps between polls of a condition that has its own deadline (never as synchronisation).
///
/// Only called from the synchronous start/stop paths, which block their caller anyway.
#[allow(clippy::disallowed_methods, reason = "poll interval of a deadline-bounded wait in a blocking helper")]
pub(crate) fn pause() {
    std::thread::sleep(POLL_INTERVAL);
}
