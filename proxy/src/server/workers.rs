//! The data-plane threads: one single-threaded tokio runtime per worker. Each listener has one
//! `SO_REUSEPORT` socket per worker ([`super::bind::tcp_group`], [`super::bind::udp_group`]);
//! the kernel spreads new connections (and UDP clients, by address) over them, and a worker
//! accepts or reads from its own socket and serves those connections and sessions to their end
//! on its own thread. So their events never wake another thread, and nothing on their path
//! crosses threads (tokio's multi-thread scheduler, which the rest of the proxy runs on: admin,
//! control plane, reloads, re-resolution; hands tasks between workers and wakes parked ones
//! to steal them, which cost a `futex` wake-up and a context switch per hand-off).

use std::{io, sync::mpsc};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The worker runtimes; their threads end when this is dropped (tasks still on them are
/// dropped with their runtime, which closes their sockets).
pub(super) struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let (handle_tx, handle_rx) = mpsc::sync_channel(1);
            let stopped = stop.clone();
            std::thread::Builder::new().name(format!("l4proxy-worker-{i}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => return drop(handle_tx.send(Err(error))),
                };
                if handle_tx.send(Ok(runtime.handle().clone())).is_ok() {
                    runtime.block_on(stopped.cancelled());
                }
            })?;
            let handle = handle_rx.recv().map_err(|_| io::Error::other("a worker thread ended at start"))??;
            handles.push(handle);
        }
        Ok(Self { handles, stop })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_tasks_on_a_thread_of_its_own_and_stops_with_the_workers() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = mpsc::channel();
                handle.spawn(async move { tx.send(std::thread::current().name().unwrap().to_owned()).unwrap() });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(names, ["l4proxy-worker-0", "l4proxy-worker-1"]);
        let handle = workers.handles()[0].clone();
        drop(workers);
        // Once its thread's block_on returns the runtime shuts down, and a task spawned on it
        // is cancelled instead of run.
        let waiter = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        waiter.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while handle.spawn(async {}).await.is_ok() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the worker runtime shut down");
        });
    }
}
