//! A bounded connection pool on DashMap, with idle and max-age expiry and [`PoolStats`].
//!
//! Bounds: at most `max_size` entries; an insert at capacity fails with
//! [`ConnectionError::LimitExceeded`] (live sessions are never evicted to make room). Expiry
//! keeps a min-heap of candidate deadlines, so a sweep does work in proportion to the entries
//! that came due, never a scan of the whole pool; touching an entry on the per-packet path is
//! one atomic store.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    hash::Hash,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::connection::ConnectionError;

/// A pool key names the client it belongs to, for errors.
pub trait PoolKey: Eq + Hash + Clone + Ord {
    fn source(&self) -> SocketAddr;
}

/// The key of a UDP session: the client, and the local address it sent to.
pub type SessionKey = (SocketAddr, SocketAddr);

impl PoolKey for SessionKey {
    fn source(&self) -> SocketAddr {
        self.0
    }
}

impl PoolKey for SocketAddr {
    fn source(&self) -> SocketAddr {
        *self
    }
}

/// A keyed, bounded pool of live connections or sessions.
pub trait ConnectionPool<K, V> {
    /// Adds an entry; fails at capacity, or if the key is present.
    fn insert(&self, key: K, value: V) -> Result<(), ConnectionError>;
    /// The value for `key` (not expired), marking it used now.
    fn get(&self, key: &K) -> Option<V>;
    /// Removes an entry, counting it as an eviction.
    fn remove(&self, key: &K) -> Option<V>;
    /// Removes every entry, counting them as evictions.
    fn clear(&self);
    fn size(&self) -> usize;
    fn max_size(&self) -> usize;
    /// Marks `key` used now; false if absent.
    fn touch(&self, key: &K) -> bool;
    /// Removes and returns the entries idle (or older) past their limit at `now`.
    fn expire(&self, now: Instant) -> Vec<(K, V)>;
    fn stats(&self) -> PoolStats;
}

/// A pooled value with its age and last use.
#[derive(Debug)]
pub struct PoolEntry<V> {
    pub value: V,
    /// Milliseconds since the pool's epoch.
    created: u64,
    last_used: AtomicU64,
}

impl<V> PoolEntry<V> {
    fn new(value: V, now: u64) -> Self {
        Self { value, created: now, last_used: AtomicU64::new(now) }
    }
}

/// A snapshot of a pool. Serialised camelCase: it travels to the operator and into `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStats {
    pub size: usize,
    pub max_size: usize,
    /// Entries removed because they were idle (or older) past their limit.
    pub expired_count: u64,
    /// Mean age of the current entries.
    pub average_age_seconds: f64,
    /// Inserts refused at capacity.
    pub rejected_inserts: u64,
    /// Entries removed by their owner (closed, or their backend went away).
    pub evictions: u64,
}

/// Expiry limits of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub idle: Duration,
    pub max_age: Option<Duration>,
}

/// [`ConnectionPool`] on a [`DashMap`].
pub struct DashMapConnectionPool<K: Eq + Hash, V> {
    /// The listener the pool belongs to, for errors.
    name: Arc<str>,
    entries: DashMap<K, PoolEntry<V>>,
    /// Limits, changeable by a reload while entries stay.
    max_size: AtomicUsize,
    idle_ms: AtomicU64,
    /// 0: no max age.
    max_age_ms: AtomicU64,
    epoch: Instant,
    /// Reserved or occupied places; admission is decided on it, so concurrent inserts can
    /// never overshoot `max_size`.
    occupied: AtomicUsize,
    /// Sum of the current entries' creation times, for the average age in O(1).
    created_sum: AtomicU64,
    /// Candidate deadlines: (deadline ms, key). A deadline may be stale (the entry was used
    /// since, or removed); a sweep checks the entry and re-queues or drops the candidate.
    deadlines: Mutex<BinaryHeap<Reverse<(u64, K)>>>,
    expired: AtomicU64,
    rejected: AtomicU64,
    evicted: AtomicU64,
}

impl<K: PoolKey, V: Clone> DashMapConnectionPool<K, V> {
    pub fn new(name: Arc<str>, max_size: usize, expiry: Expiry) -> Self {
        Self {
            name,
            entries: DashMap::new(),
            max_size: AtomicUsize::new(max_size),
            idle_ms: AtomicU64::new(expiry.idle.as_millis() as u64),
            max_age_ms: AtomicU64::new(expiry.max_age.map_or(0, |a| a.as_millis().max(1) as u64)),
            epoch: Instant::now(),
            occupied: AtomicUsize::new(0),
            created_sum: AtomicU64::new(0),
            deadlines: Mutex::new(BinaryHeap::new()),
            expired: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// Changes the limits for a reload. Entries stay; a lower `max_size` only refuses new
    /// inserts until enough entries have gone.
    pub fn set_limits(&self, max_size: usize, expiry: Expiry) {
        self.max_size.store(max_size, Ordering::Release);
        self.idle_ms.store(expiry.idle.as_millis() as u64, Ordering::Relaxed);
        self.max_age_ms.store(expiry.max_age.map_or(0, |a| a.as_millis().max(1) as u64), Ordering::Relaxed);
    }

    fn first_deadline(&self, now: u64) -> u64 {
        let idle = now + self.idle_ms.load(Ordering::Relaxed);
        match self.max_age_ms.load(Ordering::Relaxed) {
            0 => idle,
            max_age => idle.min(now + max_age),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn deadline_of(&self, entry: &PoolEntry<V>) -> u64 {
        let idle = entry.last_used.load(Ordering::Relaxed) + self.idle_ms.load(Ordering::Relaxed);
        match self.max_age_ms.load(Ordering::Relaxed) {
            0 => idle,
            max_age => idle.min(entry.created + max_age),
        }
    }

    fn lock_deadlines(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<(u64, K)>>> {
        // The heap holds only candidates; a panic mid-push leaves it usable.
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn schedule(&self, key: K, deadline: u64) {
        let mut heap = self.lock_deadlines();
        heap.push(Reverse((deadline, key)));
        // Removed entries leave stale candidates behind; rebuild when they dominate, so the
        // heap stays within twice the pool's bound (amortised O(1) per operation).
        if heap.len() > 2 * self.max_size.load(Ordering::Relaxed).max(16) {
            let live: Vec<_> =
                self.entries.iter().map(|e| Reverse((self.deadline_of(e.value()), e.key().clone()))).collect();
            *heap = BinaryHeap::from(live);
        }
    }

    fn forget(&self, entry: &PoolEntry<V>) {
        self.occupied.fetch_sub(1, Ordering::AcqRel);
        self.created_sum.fetch_sub(entry.created, Ordering::Relaxed);
    }

    /// Runs `f` on the value for `key` (not expired), marking it used now, without cloning
    /// the value: the per-packet path.
    #[expect(clippy::disallowed_methods, reason = "the guard lives only for `f`, which cannot await")]
    pub fn get_with<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        let now = self.millis(Instant::now());
        let entry = self.entries.get(key)?;
        if self.deadline_of(&entry) <= now {
            return None;
        }
        entry.last_used.store(now, Ordering::Relaxed);
        Some(f(&entry.value))
    }

    /// Counts an insert refused before it was tried (the caller checked [`Self::is_full`]).
    pub fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether an insert would be refused for capacity now.
    pub fn is_full(&self) -> bool {
        self.occupied.load(Ordering::Acquire) >= self.max_size.load(Ordering::Acquire)
    }

    /// Every entry's key and value (a snapshot; for reloads and shutdown, not the packet path).
    pub fn snapshot(&self) -> Vec<(K, V)> {
        self.entries.iter().map(|e| (e.key().clone(), e.value().value.clone())).collect()
    }
}

impl<K: PoolKey, V: Clone> ConnectionPool<K, V> for DashMapConnectionPool<K, V> {
    fn insert(&self, key: K, value: V) -> Result<(), ConnectionError> {
        let max = self.max_size.load(Ordering::Acquire);
        if self.occupied.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_err() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionError::LimitExceeded { listener: self.name.clone(), src: key.source(), max });
        }
        let now = self.millis(Instant::now());
        match self.entries.entry(key.clone()) {
            Entry::Occupied(_) => {
                self.occupied.fetch_sub(1, Ordering::AcqRel);
                return Err(ConnectionError::Duplicate { listener: self.name.clone(), src: key.source() });
            }
            Entry::Vacant(slot) => {
                slot.insert(PoolEntry::new(value, now));
            }
        }
        self.created_sum.fetch_add(now, Ordering::Relaxed);
        self.schedule(key, self.first_deadline(now));
        Ok(())
    }

    #[expect(clippy::disallowed_methods, reason = "the guard is dropped before returning; no await here")]
    fn get(&self, key: &K) -> Option<V> {
        let now = self.millis(Instant::now());
        // The guard lives only inside this expression.
        let entry = self.entries.get(key)?;
        if self.deadline_of(&entry) <= now {
            return None; // expired, awaiting the sweep: never handed out
        }
        entry.last_used.store(now, Ordering::Relaxed);
        Some(entry.value.clone())
    }

    fn remove(&self, key: &K) -> Option<V> {
        let (_, entry) = self.entries.remove(key)?;
        self.forget(&entry);
        self.evicted.fetch_add(1, Ordering::Relaxed);
        Some(entry.value)
    }

    fn clear(&self) {
        let keys: Vec<K> = self.entries.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            self.remove(&key);
        }
    }

    fn size(&self) -> usize {
        self.entries.len()
    }

    fn max_size(&self) -> usize {
        self.max_size.load(Ordering::Acquire)
    }

    fn touch(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    #[expect(clippy::disallowed_methods, reason = "guards live within one expression; no await here")]
    fn expire(&self, now: Instant) -> Vec<(K, V)> {
        let now = self.millis(now);
        let mut removed = Vec::new();
        loop {
            let due = {
                let mut heap = self.lock_deadlines();
                match heap.peek() {
                    Some(Reverse((deadline, _))) if *deadline <= now => heap.pop().map(|Reverse((_, k))| k),
                    _ => None,
                }
            };
            let Some(key) = due else { break };
            // Race: a packet may touch the entry between the check and the removal; the
            // `remove_if` re-checks under the shard lock, so a just-used entry survives.
            let taken = self.entries.remove_if(&key, |_, entry| self.deadline_of(entry) <= now);
            match taken {
                Some((key, entry)) => {
                    self.forget(&entry);
                    self.expired.fetch_add(1, Ordering::Relaxed);
                    removed.push((key, entry.value));
                }
                None => {
                    let next = self.entries.get(&key).map(|e| self.deadline_of(&e));
                    if let Some(deadline) = next {
                        self.schedule(key, deadline);
                    }
                }
            }
        }
        removed
    }

    fn stats(&self) -> PoolStats {
        let size = self.entries.len();
        let now = self.millis(Instant::now());
        let sum = self.created_sum.load(Ordering::Relaxed);
        let average_age_seconds =
            if size == 0 { 0.0 } else { (now as f64 - sum as f64 / size as f64).max(0.0) / 1000.0 };
        PoolStats {
            size,
            max_size: self.max_size.load(Ordering::Acquire),
            expired_count: self.expired.load(Ordering::Relaxed),
            average_age_seconds,
            rejected_inserts: self.rejected.load(Ordering::Relaxed),
            evictions: self.evicted.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test keys: client addresses 127.0.0.1:k.
    fn key(k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], k))
    }

    fn pool(max: usize, idle_ms: u64) -> DashMapConnectionPool<SocketAddr, u32> {
        DashMapConnectionPool::new("test".into(), max, Expiry { idle: Duration::from_millis(idle_ms), max_age: None })
    }

    #[tokio::test(start_paused = true)]
    async fn insert_at_capacity_fails_without_evicting() {
        let p = pool(2, 1000);
        p.insert(key(1), 10).unwrap();
        p.insert(key(2), 20).unwrap();
        let err = p.insert(key(3), 30).unwrap_err();
        assert_eq!(err.label(), "limit");
        assert_eq!((p.get(&key(1)), p.get(&key(2)), p.get(&key(3))), (Some(10), Some(20), None));
        assert_eq!(p.stats().rejected_inserts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_key_is_refused_and_frees_its_reservation() {
        let p = pool(2, 1000);
        p.insert(key(1), 10).unwrap();
        assert!(p.insert(key(1), 11).is_err());
        p.insert(key(2), 20).unwrap();
        assert_eq!(p.get(&key(1)), Some(10));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entry_expires_and_used_entry_stays() {
        let p = pool(10, 1000);
        p.insert(key(1), 10).unwrap();
        p.insert(key(2), 20).unwrap();
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(p.touch(&key(2)));
        tokio::time::advance(Duration::from_millis(400)).await;
        let expired = p.expire(Instant::now());
        assert_eq!(expired, vec![(key(1), 10)]);
        assert_eq!(p.get(&key(2)), Some(20)); // a use: idle again from now
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(p.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(p.expire(Instant::now()), vec![(key(2), 20)]);
        let stats = p.stats();
        assert_eq!((stats.size, stats.expired_count), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entry_is_never_returned_before_the_sweep() {
        let p = pool(10, 100);
        p.insert(key(1), 10).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(p.get(&key(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_expires_even_a_busy_entry() {
        let p: DashMapConnectionPool<SocketAddr, u32> = DashMapConnectionPool::new(
            "test".into(),
            10,
            Expiry { idle: Duration::from_millis(100), max_age: Some(Duration::from_millis(250)) },
        );
        p.insert(key(1), 10).unwrap();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(50)).await;
            p.touch(&key(1));
            p.expire(Instant::now());
        }
        assert_eq!(p.get(&key(1)), None);
        assert_eq!(p.stats().expired_count, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_work_is_proportional_to_what_is_due() {
        let p = pool(10_000, 1000);
        for k in 0..10_000 {
            p.insert(key(k), u32::from(k)).unwrap();
        }
        // Nothing is due: the sweep looks at the heap's head only.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(p.expire(Instant::now()).is_empty());
        assert_eq!(p.lock_deadlines().len(), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn stats_report_size_evictions_and_average_age() {
        let p = pool(5, 10_000);
        p.insert(key(1), 1).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        p.insert(key(2), 2).unwrap();
        let stats = p.stats();
        assert_eq!((stats.size, stats.max_size), (2, 5));
        assert!((stats.average_age_seconds - 1.0).abs() < 0.01, "{stats:?}");
        p.remove(&key(1));
        p.clear();
        assert_eq!(p.stats().evictions, 2);
        assert_eq!(p.stats().size, 0);
    }

    #[test]
    fn pool_stats_serialise_camel_case() {
        let json = serde_json::to_value(PoolStats { size: 1, max_size: 2, ..Default::default() }).unwrap();
        for field in ["size", "maxSize", "expiredCount", "averageAgeSeconds", "rejectedInserts", "evictions"] {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        Get(u8),
        Remove(u8),
        Advance(u16),
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..32).prop_map(Op::Insert),
            (0u8..32).prop_map(Op::Get),
            (0u8..32).prop_map(Op::Remove),
            (0u16..400).prop_map(Op::Advance),
            Just(Op::Expire),
        ]
    }

    proptest! {
        #[test]
        fn pool_invariants_hold_for_any_operation_sequence(ops in proptest::collection::vec(op(), 1..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let idle = Duration::from_millis(300);
                let p: DashMapConnectionPool<SocketAddr, u8> = DashMapConnectionPool::new("prop".into(), 8, Expiry { idle, max_age: None });
                // Model: key -> last use.
                let mut model: std::collections::HashMap<u8, Instant> = Default::default();
                let mut expired_total = 0u64;
                for op in ops {
                    let now = Instant::now();
                    match op {
                        Op::Insert(k) => {
                            let ok = p.insert(key(k.into()), k).is_ok();
                            let expect = !model.contains_key(&k) && model.len() < 8;
                            prop_assert_eq!(ok, expect);
                            if ok { model.insert(k, now); }
                        }
                        Op::Get(k) => {
                            let live = model.get(&k).is_some_and(|t| now.duration_since(*t) < idle);
                            let got = p.get(&key(k.into()));
                            // An expired entry is never returned.
                            prop_assert_eq!(got.is_some(), live);
                            if live { model.insert(k, now); }
                        }
                        Op::Remove(k) => {
                            prop_assert_eq!(p.remove(&key(k.into())).is_some(), model.remove(&k).is_some());
                        }
                        Op::Advance(ms) => tokio::time::advance(Duration::from_millis(u64::from(ms))).await,
                        Op::Expire => {
                            let removed = p.expire(now);
                            for (k, _) in &removed {
                                let k = u8::try_from(k.port()).expect("test key");
                                let last = model.remove(&k).expect("expired a key the model has");
                                prop_assert!(now.duration_since(last) >= idle);
                            }
                            expired_total += removed.len() as u64;
                        }
                    }
                    let stats = p.stats();
                    prop_assert!(stats.size <= stats.max_size);
                    prop_assert_eq!(stats.size, model.len());
                    prop_assert_eq!(stats.expired_count, expired_total);
                }
                Ok(())
            })?;
        }
    }
}
