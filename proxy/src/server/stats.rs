//! The `/stats` document: per listener, its counters, pool and backends.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use super::Proxy;
use crate::{
    config::Protocol,
    connection::{CloseReason, PoolStats},
    control::ControlPlaneStats,
};

impl Proxy {
    /// Per-listener counters, gauges and backend health.
    pub fn stats(&self) -> Stats {
        let state = self.lock_state();
        let listeners = state
            .listeners
            .iter()
            .map(|running| {
                let settings = running.manager.settings();
                let m = &settings.metrics;
                if let Some(total) = running.manager.receive_drops() {
                    m.follow_receive_drops(total);
                }
                let udp = (settings.config.protocol == Protocol::Udp).then(|| UdpStats {
                    datagrams_received: m.datagrams_received.get(),
                    datagrams_sent: m.datagrams_sent.get(),
                    dropped: m.drop_counts().collect(),
                    kernel_drops: m.receive_drops(),
                });
                let pool_stats = running.manager.pool_stats();
                ListenerStats {
                    name: settings.name.to_string(),
                    protocol: settings.config.protocol,
                    address: running.local,
                    active: pool_stats.size,
                    max_connections: pool_stats.max_size,
                    accepted: m.accepted.get(),
                    rejected: m.rejected_limit.get(),
                    closed: CloseReason::ALL.iter().map(|&r| (r.label(), m.closed(r).get())).collect(),
                    bytes_received: m.bytes_received.get(),
                    bytes_sent: m.bytes_sent.get(),
                    pool_stats,
                    udp,
                    backends: settings
                        .backend_sets()
                        .flat_map(|set| set.backends())
                        .map(|b| BackendStats {
                            address: b.state.address().to_string(),
                            resolved: b.state.resolved().to_vec(),
                            weight: b.weight,
                            active: b.state.active(),
                            ejected: b.state.is_ejected(),
                            consecutive_failures: b.state.consecutive_failures(),
                        })
                        .collect(),
                }
            })
            .collect();
        drop(state);
        Stats {
            ready: self.is_ready(),
            open_connections: self.connections.len(),
            control_plane: self.control.as_ref().map(|c| c.stats()),
            listeners,
        }
    }
}

/// `/stats` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub ready: bool,
    pub open_connections: usize,
    /// With `--control-plane`: the stream's state, the version in force, the last rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneStats>,
    pub listeners: Vec<ListenerStats>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStats {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub active: usize,
    pub max_connections: usize,
    pub accepted: u64,
    pub rejected: u64,
    pub closed: BTreeMap<&'static str, u64>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// TCP: open connections as pool entries; UDP: the session pool.
    pub pool_stats: PoolStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpStats>,
    pub backends: Vec<BackendStats>,
}

/// UDP listener counters.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UdpStats {
    pub datagrams_received: u64,
    pub datagrams_sent: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    /// Datagrams the kernel dropped before the proxy read them (its receive buffer was full).
    pub kernel_drops: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStats {
    pub address: String,
    pub resolved: Vec<SocketAddr>,
    pub weight: u32,
    pub active: usize,
    pub ejected: bool,
    pub consecutive_failures: u32,
}
