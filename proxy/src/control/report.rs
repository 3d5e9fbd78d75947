//! What a `StatsReport` says: [`Proxy::stats`] in the protocol's terms.

use super::proto::{ListenerReport, PoolStats, StatsReport};
use crate::{Proxy, server::stats::ListenerStats};

/// The proxy's listeners now (cumulative counters), and the version it serves.
pub fn stats_report(proxy: &Proxy, applied_version: String) -> StatsReport {
    let listeners = proxy.stats().listeners.into_iter().map(listener_report).collect();
    StatsReport { applied_version, listeners }
}

fn listener_report(listener: ListenerStats) -> ListenerReport {
    let pool = &listener.pool_stats;
    ListenerReport {
        pool_stats: Some(PoolStats {
            size: pool.size as u64,
            max_size: pool.max_size as u64,
            expired_count: pool.expired_count,
            average_age_seconds: pool.average_age_seconds,
        }),
        active: listener.active as u64,
        accepted: listener.accepted,
        rejected: listener.rejected,
        bytes_received: listener.bytes_received,
        bytes_sent: listener.bytes_sent,
        name: listener.name,
    }
}
