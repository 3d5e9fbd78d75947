//! What the proxies of one resource report, summed up for its status: how many are connected
//! and run the current version, which rejected it and why, and each listener's pool and
//! counters summed over them. A [`Summary`] is additive, so the summaries of several operator
//! replicas (each serves the proxies that reached it) merge into the resource's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::conditions::Decided;

/// Most rejecting proxies a summary names (the others are counted).
pub const MAX_NAMED_REJECTIONS: usize = 3;
/// The condition type for "the proxies run the current config".
pub const PROGRAMMED: &str = "Programmed";

/// One connected proxy, as the config service knows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyView {
    /// Its identity (`namespace/pod`, or a host name).
    pub name: String,
    /// The version it last applied.
    pub applied: Option<String>,
    /// The version it last rejected, and why.
    pub rejected: Option<(String, String)>,
    /// Its last stats report, if recent.
    pub listeners: Vec<ListenerTotals>,
}

/// One listener's numbers, summed over proxies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTotals {
    pub name: String,
    pub size: u64,
    pub max_size: u64,
    pub expired_count: u64,
    /// Σ size × average age: the mean age weighted by size is `age_weight / size`.
    pub age_weight: f64,
    pub active: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl ListenerTotals {
    fn add(&mut self, other: &ListenerTotals) {
        self.size += other.size;
        self.max_size += other.max_size;
        self.expired_count += other.expired_count;
        self.age_weight += other.age_weight;
        self.active += other.active;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
    }

    /// The size-weighted mean age of the listener's connections or sessions.
    pub fn average_age_seconds(&self) -> f64 {
        if self.size == 0 { 0.0 } else { self.age_weight / self.size as f64 }
    }
}

/// The proxies of one resource (or the part of them one replica serves).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub connected: u32,
    /// Connected proxies running `version`.
    pub in_sync: u32,
    /// The version `in_sync` and `rejections` are about.
    pub version: Option<String>,
    /// Proxies that rejected `version`: up to [`MAX_NAMED_REJECTIONS`] named with their reason.
    pub rejections: Vec<(String, String)>,
    pub rejected_count: u32,
    /// Per listener, in name order.
    pub listeners: Vec<ListenerTotals>,
}

impl Summary {
    /// The proxies of a resource whose current config has `version`.
    pub fn of<'a>(version: Option<&str>, proxies: impl IntoIterator<Item = &'a ProxyView>) -> Self {
        let mut summary = Summary { version: version.map(str::to_owned), ..Default::default() };
        let mut listeners: BTreeMap<String, ListenerTotals> = BTreeMap::new();
        for proxy in proxies {
            summary.connected += 1;
            if version.is_some() && proxy.applied.as_deref() == version {
                summary.in_sync += 1;
            }
            if let Some((rejected, why)) = &proxy.rejected
                && version == Some(rejected.as_str())
            {
                summary.rejected_count += 1;
                if summary.rejections.len() < MAX_NAMED_REJECTIONS {
                    summary.rejections.push((proxy.name.clone(), why.clone()));
                }
            }
            for listener in &proxy.listeners {
                let totals = listeners
                    .entry(listener.name.clone())
                    .or_insert_with(|| ListenerTotals { name: listener.name.clone(), ..Default::default() });
                totals.add(listener);
            }
        }
        summary.rejections.sort();
        summary.listeners = listeners.into_values().collect();
        summary
    }

    /// This summary as it stands against `version`, the resource's current config: proxies
    /// counted as in sync with an older version are not in sync with this one.
    pub fn against(mut self, version: Option<&str>) -> Summary {
        if self.version.as_deref() != version {
            self.version = version.map(str::to_owned);
            self.in_sync = 0;
            self.rejections.clear();
            self.rejected_count = 0;
        }
        self
    }

    /// Adds another replica's part. Parts about another version than `self`'s (a replica that
    /// has not seen the newest config yet) add their proxies as connected, not in sync.
    pub fn merge(&mut self, other: &Summary) {
        self.connected += other.connected;
        if other.version == self.version {
            self.in_sync += other.in_sync;
            self.rejected_count += other.rejected_count;
            self.rejections.extend(other.rejections.iter().cloned());
            self.rejections.sort();
            self.rejections.truncate(MAX_NAMED_REJECTIONS);
        }
        let mut listeners: BTreeMap<String, ListenerTotals> =
            self.listeners.drain(..).map(|l| (l.name.clone(), l)).collect();
        for listener in &other.listeners {
            listeners
                .entry(listener.name.clone())
                .or_insert_with(|| ListenerTotals { name: listener.name.clone(), ..Default::default() })
                .add(listener);
        }
        self.listeners = listeners.into_values().collect();
    }

    /// The `Programmed` condition: True when every connected proxy runs the current version,
    /// False naming those that rejected it (or counting those still applying it), Unknown with
    /// no proxy connected.
    pub fn programmed(&self) -> Decided {
        let Some(version) = &self.version else {
            return Decided::unknown(PROGRAMMED, "NoConfig", "there is no valid config to push yet");
        };
        if self.connected == 0 {
            return Decided::unknown(PROGRAMMED, "NoProxies", "no proxy is connected to the operator");
        }
        if self.in_sync == self.connected {
            return Decided::new(
                PROGRAMMED,
                true,
                "Applied",
                format!("{} of {} proxies run version {version}", self.in_sync, self.connected),
            );
        }
        if self.rejected_count > 0 {
            let named: Vec<String> = self.rejections.iter().map(|(proxy, why)| format!("{proxy}: {why}")).collect();
            let more = self.rejected_count as usize - self.rejections.len();
            let more = if more > 0 { format!("; and {more} more") } else { String::new() };
            return Decided::new(
                PROGRAMMED,
                false,
                "Rejected",
                format!(
                    "{} of {} proxies rejected version {version}: {}{more}",
                    self.rejected_count,
                    self.connected,
                    named.join("; ")
                ),
            );
        }
        Decided::new(
            PROGRAMMED,
            false,
            "Applying",
            format!("{} of {} proxies run version {version}", self.in_sync, self.connected),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(name: &str, applied: Option<&str>, rejected: Option<(&str, &str)>, size: u64, age: f64) -> ProxyView {
        ProxyView {
            name: name.into(),
            applied: applied.map(Into::into),
            rejected: rejected.map(|(v, why)| (v.into(), why.into())),
            listeners: vec![ListenerTotals {
                name: "web".into(),
                size,
                max_size: 100,
                age_weight: size as f64 * age,
                accepted: 10,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn proxies_running_the_current_version_make_it_programmed() {
        let proxies = [proxy("a", Some("v2"), None, 1, 1.0), proxy("b", Some("v2"), None, 3, 5.0)];
        let summary = Summary::of(Some("v2"), &proxies);
        assert_eq!((summary.connected, summary.in_sync), (2, 2));
        let web = &summary.listeners[0];
        assert_eq!((web.size, web.max_size, web.accepted), (4, 200, 20));
        assert!((web.average_age_seconds() - 4.0).abs() < 1e-9, "size-weighted: (1×1 + 3×5) / 4");
        let condition = summary.programmed();
        assert_eq!((condition.status, condition.reason), ("True", "Applied"));
    }

    #[test]
    fn a_rejection_is_named_with_its_reason_while_the_others_apply() {
        let proxies = [
            proxy("shop/web-1", Some("v2"), None, 0, 0.0),
            proxy("shop/web-2", Some("v1"), Some(("v2", "127.0.0.1:80: address in use")), 0, 0.0),
        ];
        let condition = Summary::of(Some("v2"), &proxies).programmed();
        assert_eq!((condition.status, condition.reason), ("False", "Rejected"));
        assert!(condition.message.contains("shop/web-2: 127.0.0.1:80: address in use"), "{}", condition.message);
        assert!(condition.message.starts_with("1 of 2 proxies rejected"), "{}", condition.message);
    }

    #[test]
    fn many_rejections_name_a_few_and_count_the_rest() {
        let proxies: Vec<_> = (0..5).map(|i| proxy(&format!("p{i}"), None, Some(("v2", "bad")), 0, 0.0)).collect();
        let summary = Summary::of(Some("v2"), &proxies);
        assert_eq!(summary.rejections.len(), MAX_NAMED_REJECTIONS);
        assert!(summary.programmed().message.ends_with("and 2 more"), "{}", summary.programmed().message);
    }

    #[test]
    fn no_proxy_connected_is_unknown_and_a_pending_one_is_applying() {
        assert_eq!(Summary::of(Some("v1"), &[]).programmed().status, "Unknown");
        assert_eq!(Summary::of(None, &[proxy("a", None, None, 0, 0.0)]).programmed().status, "Unknown");
        let pending = Summary::of(Some("v2"), &[proxy("a", Some("v1"), None, 0, 0.0)]).programmed();
        assert_eq!((pending.status, pending.reason), ("False", "Applying"));
    }

    #[test]
    fn a_summary_of_an_older_version_has_none_in_sync_with_the_new_one() {
        let summary = Summary::of(Some("v1"), &[proxy("a", Some("v1"), None, 0, 0.0)]);
        let against = summary.clone().against(Some("v2"));
        assert_eq!((against.connected, against.in_sync), (1, 0));
        assert_eq!(summary.clone().against(Some("v1")), summary);
        assert_eq!(Summary::default().against(Some("v1")).programmed().reason, "NoProxies");
    }

    #[test]
    fn replica_summaries_merge_into_the_resources() {
        let mut leader = Summary::of(Some("v2"), &[proxy("a", Some("v2"), None, 2, 2.0)]);
        let follower = Summary::of(Some("v2"), &[proxy("b", Some("v2"), None, 2, 4.0)]);
        let stale = Summary::of(Some("v1"), &[proxy("c", Some("v1"), None, 0, 0.0)]);
        leader.merge(&follower);
        leader.merge(&stale);
        assert_eq!((leader.connected, leader.in_sync), (3, 2));
        assert_eq!(leader.listeners[0].size, 4);
        assert!((leader.listeners[0].average_age_seconds() - 3.0).abs() < 1e-9);
    }
}
