//! Pid records of detached control planes (`DIR/pids`), so a later `down` can find and stop
//! processes that no longer have a parent to stop them.
//!
//! Each record carries the process's start time from `/proc/PID/stat` next to the pid: a pid
//! alone may have been reused by an unrelated process since `up`, and `down` must never signal
//! that one.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::clock::{self, Deadline};
use crate::sys;

/// File name of the record inside a control plane's directory.
pub const PIDS_FILE: &str = "pids";

/// How long `stop` waits for a process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One recorded component: `name pid start-time` in the pids file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedProcess {
    pub name: String,
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
}

/// What [`stop`] did to one recorded process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Exited on SIGTERM within the grace period.
    Terminated,
    /// Needed SIGKILL.
    Killed,
    /// Was not running (or its pid now belongs to another process).
    NotRunning,
}

impl RecordedProcess {
    /// Whether the recorded process still runs: same pid, same start time, not a zombie.
    pub fn is_running(&self) -> bool {
        proc_stat(self.pid).is_some_and(|stat| stat.start_time == self.start_time && !stat.is_dead())
    }
}

/// Records `pids` (name, pid) in `DIR/pids`, replacing the file atomically.
pub(crate) fn write(dir: &Path, pids: &[(&str, u32)]) -> Result<()> {
    let mut text = String::new();
    for (name, pid) in pids {
        let stat = proc_stat(*pid).with_context(|| format!("{name} (pid {pid}) vanished right after start"))?;
        text.push_str(&format!("{name} {pid} {}\n", stat.start_time));
    }
    let path = dir.join(PIDS_FILE);
    let tmp = dir.join(format!("{PIDS_FILE}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Removes the record (after a stop); a missing record is fine.
pub(crate) fn forget(dir: &Path) -> Result<()> {
    match fs::remove_file(dir.join(PIDS_FILE)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err).context("removing the pids file"),
        _ => Ok(()),
    }
}

/// The processes recorded in `DIR/pids`, in start order; empty if there is no record.
pub fn read(dir: &Path) -> Result<Vec<RecordedProcess>> {
    let path = dir.join(PIDS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| parse_line(line).with_context(|| format!("{}: bad line {line:?}", path.display())))
        .collect()
}

fn parse_line(line: &str) -> Result<RecordedProcess> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, pid, start_time] = fields.as_slice() else {
        bail!("expected `name pid start-time`");
    };
    Ok(RecordedProcess { name: name.to_string(), pid: pid.parse()?, start_time: start_time.parse()? })
}

/// Stops every recorded process that still runs, last started first (kube-apiserver before
/// etcd), each with SIGTERM and then SIGKILL after `grace`, and removes the record.
pub fn stop(dir: &Path, grace: Duration) -> Result<Vec<(RecordedProcess, StopOutcome)>> {
    let mut outcomes = Vec::new();
    for process in read(dir)?.into_iter().rev() {
        let outcome = stop_one(&process, grace)?;
        outcomes.push((process, outcome));
    }
    forget(dir)?;
    Ok(outcomes)
}

fn stop_one(process: &RecordedProcess, grace: Duration) -> Result<StopOutcome> {
    if !signal_if_running(process, libc::SIGTERM)? {
        return Ok(StopOutcome::NotRunning);
    }
    if wait_gone(process, grace) {
        return Ok(StopOutcome::Terminated);
    }
    signal_if_running(process, libc::SIGKILL)?;
    if wait_gone(process, KILL_WAIT) {
        return Ok(StopOutcome::Killed);
    }
    bail!("{} (pid {}) still runs {KILL_WAIT:?} after SIGKILL", process.name, process.pid)
}

/// Sends `signal` if the process still runs; false if it was already gone.
fn signal_if_running(process: &RecordedProcess, signal: libc::c_int) -> Result<bool> {
    if !process.is_running() {
        return Ok(false);
    }
    match sys::send_signal(process.pid, signal) {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(err) => Err(err).with_context(|| format!("signalling {} (pid {})", process.name, process.pid)),
    }
}

/// Polls until the process is gone or `timeout` passes; true if it is gone.
fn wait_gone(process: &RecordedProcess, timeout: Duration) -> bool {
    let deadline = Deadline::after(timeout);
    loop {
        if !process.is_running() {
            return true;
        }
        if deadline.expired() {
            return false;
        }
        clock::pause();
    }
}

/// The two fields of `/proc/PID/stat` we need.
struct ProcStat {
    state: char,
    start_time: u64,
}

impl ProcStat {
    /// Zombies count as gone: they have exited and only wait for their (new) parent to reap them.
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`: state is field 3, start time field 22.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat { state: fields.first()?.chars().next()?, start_time: fields.get(19)?.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let stat = "42 (kube) apiserver)) S 1 42 42 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 12 0 987654 1000 200";
        let parsed = parse_stat(stat).unwrap();
        assert_eq!(parsed.state, 'S');
        assert_eq!(parsed.start_time, 987654);
    }

    #[test]
    fn own_process_is_running_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let start_time = proc_stat(pid).unwrap().start_time;
        let me = RecordedProcess { name: "me".into(), pid, start_time };
        assert!(me.is_running());
        assert!(!RecordedProcess { start_time: start_time + 1, ..me }.is_running());
    }

    #[test]
    fn parses_records() {
        let process = parse_line("etcd 123 456").unwrap();
        assert_eq!(process, RecordedProcess { name: "etcd".into(), pid: 123, start_time: 456 });
        assert!(parse_line("etcd 123").is_err());
    }
}
