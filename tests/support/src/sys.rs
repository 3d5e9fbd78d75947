//! The crate's only `unsafe` code: thin wrappers over libc calls that std does not expose.
//!
//! Keeping them together makes the safety arguments easy to review; everything else in the
//! crate is safe Rust.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child get SIGKILL when the *thread* that forks it exits.
///
/// Linux ties `PR_SET_PDEATHSIG` to the forking thread, not to the process, so callers must
/// spawn from a thread that lives as long as the process (see `process::spawner`). If the
/// parent already died between `fork` and `prctl`, the child fails to start instead of
/// running unsupervised.
///
/// SIGKILL rather than SIGTERM: this is the fallback for a test process that died without
/// running its exit handler, and then etcd and kube-apiserver get the signal at the same time.
/// On SIGTERM kube-apiserver's graceful shutdown keeps retrying the vanished etcd and was seen
/// still running minutes later; the state is throwaway, so nothing is lost by killing outright.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe operations are allowed. It calls prctl(2) and getppid(2), which are
    // async-signal-safe, and builds io::Errors from raw errno values, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Starts the child in a new session so it outlives the command that started it and is not
/// hit by signals aimed at the caller's terminal or process group.
pub(crate) fn new_session(cmd: &mut Command) {
    // SAFETY: setsid(2) is async-signal-safe and io::Error::last_os_error only reads errno, so
    // the closure is sound to run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the single process `pid`.
///
/// Refuses pid 0 and values that do not fit a positive `pid_t`: kill(2) would interpret them
/// as "my process group" or "every process I may signal".
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("refusing to signal pid {pid}")))?;
    // SAFETY: kill(2) has no memory-safety preconditions; pid is a single positive process id.
    if unsafe { libc::kill(pid, signal) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers `handler` to run when the process exits through `exit(3)` (which is how both
/// `std::process::exit` and returning from `main` end a Rust program, test harness included).
pub(crate) fn at_exit(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: atexit(3) only stores the function pointer; `handler` is a plain `extern "C" fn`
    // with no captured state, valid for the whole life of the process.
    if unsafe { libc::atexit(handler) } != 0 {
        return Err(io::Error::other("atexit(3) failed to register the handler"));
    }
    Ok(())
}
