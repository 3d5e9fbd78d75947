//! Admission under a limit, and the bounded connection pool with idle and max-age expiry.
//!
//! [`Admission`] is the one mechanism that bounds both TCP connections and UDP sessions: a
//! place is taken before any work is done for a client and given back when its [`Slot`] drops,
//! however the connection ends; it keeps the occupancy, the refusals and the average age in
//! O(1). The UDP session pool ([`DashMapConnectionPool`]) holds one slot per entry.
//!
//! Pool bounds: at most `max` entries; an insert at capacity fails (live entries are never
//! evicted to make room). Expiry keeps a min-heap of candidate deadlines, so a sweep does work in
//! proportion to the entries that came due, never a scan of the whole pool; touching an entry on
//! the per-packet path is one atomic store.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    hash::Hash,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Places under a limit. Shared by whoever admits (a manager) and whatever holds a place (a
/// connection, a pool entry).
#[derive(Debug)]
pub struct Admission {
    max: AtomicUsize,
    /// Places taken. Admission is decided on it with a compare-and-swap, so concurrent
    /// admissions never overshoot `max`.
    occupied: AtomicUsize,
    /// Sum of the held slots' admission times (ms since `epoch`), for the average age in O(1).
    admitted_sum: AtomicU64,
    rejected: AtomicU64,
    epoch: Instant,
}

impl Admission {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicUsize::new(max),
            occupied: AtomicUsize::new(0),
            admitted_sum: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Takes a place, or counts a refusal and returns `None` at the limit.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max.load(Ordering::Acquire);
        if self.occupied.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_err() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let admitted = self.millis(Instant::now());
        self.admitted_sum.fetch_add(admitted, Ordering::Relaxed);
        Some(Slot { admission: self.clone(), admitted })
    }

    /// A new limit (a reload). Held places stay; a lower limit only refuses new ones until
    /// enough have been given back.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    pub fn occupied(&self) -> usize {
        self.occupied.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Admissions refused at the limit.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Mean age of the held places.
    pub fn average_age_seconds(&self) -> f64 {
        let size = self.occupied();
        if size == 0 {
            return 0.0;
        }
        let now = self.millis(Instant::now()) as f64;
        let sum = self.admitted_sum.load(Ordering::Relaxed) as f64;
        (now - sum / size as f64).max(0.0) / 1000.0
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A snapshot with the holder's own expiry and eviction counts.
    pub fn stats(&self, expired_count: u64, evictions: u64) -> PoolStats {
        PoolStats {
            size: self.occupied(),
            max_size: self.max(),
            expired_count,
            average_age_seconds: self.average_age_seconds(),
            rejected_inserts: self.rejected(),
            evictions,
        }
    }
}

/// A place under an [`Admission`]'s limit, given back on drop.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    /// Milliseconds since the admission's epoch.
    admitted: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.occupied.fetch_sub(1, Ordering::AcqRel);
        self.admission.admitted_sum.fetch_sub(self.admitted, Ordering::Relaxed);
    }
}

/// A snapshot of a pool (or of a listener's open connections). Serialised camelCase: it
/// travels to the operator and into `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStats {
    pub size: usize,
    pub max_size: usize,
    /// Entries removed because they were idle (or older) past their limit.
    pub expired_count: u64,
    /// Mean age of the current entries.
    pub average_age_seconds: f64,
    /// Admissions refused at capacity.
    pub rejected_inserts: u64,
    /// Entries removed by their owner (closed, or their backend went away).
    pub evictions: u64,
}

/// Why an insert failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error("the pool is full ({max} entries)")]
    Full { max: usize },
    #[error("the key is already present")]
    Occupied,
}

/// Which limit an expired entry passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// Unused for the idle limit.
    Idle,
    /// Older than the maximum age, used or not.
    MaxAge,
}

/// A keyed, bounded pool of live connections or sessions.
pub trait ConnectionPool<K, V> {
    /// Admits and adds an entry; fails at capacity, or if the key is present.
    fn insert(&self, key: K, value: V) -> Result<(), InsertError>;
    /// The value for `key` (not expired), marking it used now.
    fn get(&self, key: &K) -> Option<V>;
    /// Removes an entry, counting it as an eviction.
    fn remove(&self, key: &K) -> Option<V>;
    /// Removes every entry, counting them as evictions, and returns them.
    fn drain(&self) -> Vec<(K, V)>;
    fn size(&self) -> usize;
    fn max_size(&self) -> usize;
    /// Marks `key` used now; false if absent (or expired).
    fn touch(&self, key: &K) -> bool;
    /// Removes and returns the entries idle (or older) past their limit at `now`.
    fn expire(&self, now: Instant) -> Vec<(K, V, Expired)>;
    fn stats(&self) -> PoolStats;
}

/// A pooled value with the slot it holds and its last use.
#[derive(Debug)]
pub struct PoolEntry<V> {
    value: V,
    slot: Slot,
    /// Milliseconds since the admission's epoch.
    last_used: AtomicU64,
}

impl<V> PoolEntry<V> {
    pub fn value(&self) -> &V {
        &self.value
    }
}

/// Expiry limits of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub idle: Duration,
    pub max_age: Option<Duration>,
}

/// [`ConnectionPool`] on a [`DashMap`], bounded by its own [`Admission`].
pub struct DashMapConnectionPool<K: Eq + Hash, V> {
    entries: DashMap<K, PoolEntry<V>>,
    admission: Arc<Admission>,
    /// Limits, changeable by a reload while entries stay.
    idle_ms: AtomicU64,
    /// 0: no max age.
    max_age_ms: AtomicU64,
    /// Candidate deadlines: (deadline ms, key). A deadline may be stale (the entry was used
    /// since, or removed); a sweep checks the entry and re-queues or drops the candidate.
    deadlines: Mutex<BinaryHeap<Reverse<(u64, K)>>>,
    expired: AtomicU64,
    evicted: AtomicU64,
    /// Entries whose deadline was computed: every way of deciding expiry computes it, so a test
    /// counts a sweep's work with it.
    #[cfg(test)]
    examined: AtomicUsize,
}

impl<K: Eq + Hash + Clone + Ord, V: Clone> DashMapConnectionPool<K, V> {
    pub fn new(max_size: usize, expiry: Expiry) -> Self {
        let pool = Self {
            entries: DashMap::new(),
            admission: Admission::new(max_size),
            idle_ms: AtomicU64::new(0),
            max_age_ms: AtomicU64::new(0),
            deadlines: Mutex::new(BinaryHeap::new()),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            #[cfg(test)]
            examined: AtomicUsize::new(0),
        };
        pool.set_limits(max_size, expiry);
        pool
    }

    /// Changes the limits for a reload. Entries stay; a lower `max_size` only refuses new
    /// inserts until enough entries have gone.
    pub fn set_limits(&self, max_size: usize, expiry: Expiry) {
        self.admission.set_max(max_size);
        self.idle_ms.store(expiry.idle.as_millis() as u64, Ordering::Relaxed);
        self.max_age_ms.store(expiry.max_age.map_or(0, |a| a.as_millis().max(1) as u64), Ordering::Relaxed);
    }

    /// Takes a place for an entry to be inserted later with [`Self::insert_admitted`] (the
    /// caller sets up the value only once it has a place); `None` at capacity (counted).
    pub fn admit(&self) -> Option<Slot> {
        self.admission.admit()
    }

    /// Adds an entry in the place `slot` holds. If the key is already present, the entry there
    /// stays, `slot` is given back, and its value is returned.
    pub fn insert_admitted(&self, key: K, value: V, slot: Slot) -> Result<(), V> {
        let now = slot.admitted;
        match self.entries.entry(key.clone()) {
            Entry::Occupied(present) => return Err(present.get().value.clone()),
            Entry::Vacant(place) => {
                place.insert(PoolEntry { value, slot, last_used: AtomicU64::new(now) });
            }
        }
        self.schedule(key, self.first_deadline(now));
        Ok(())
    }

    fn first_deadline(&self, now: u64) -> u64 {
        let idle = now.saturating_add(self.idle_ms.load(Ordering::Relaxed));
        match self.max_age_ms.load(Ordering::Relaxed) {
            0 => idle,
            max_age => idle.min(now.saturating_add(max_age)),
        }
    }

    /// When `entry` expires, and for which limit.
    fn deadline_of(&self, entry: &PoolEntry<V>) -> (u64, Expired) {
        #[cfg(test)]
        self.examined.fetch_add(1, Ordering::Relaxed);
        let idle = entry.last_used.load(Ordering::Relaxed).saturating_add(self.idle_ms.load(Ordering::Relaxed));
        match self.max_age_ms.load(Ordering::Relaxed) {
            0 => (idle, Expired::Idle),
            max_age if entry.slot.admitted.saturating_add(max_age) <= idle => {
                (entry.slot.admitted.saturating_add(max_age), Expired::MaxAge)
            }
            _ => (idle, Expired::Idle),
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
        if heap.len() > 2 * self.admission.max().max(16) {
            let live: Vec<_> =
                self.entries.iter().map(|e| Reverse((self.deadline_of(e.value()).0, e.key().clone()))).collect();
            *heap = BinaryHeap::from(live);
        }
    }

    /// Runs `f` on the entry for `key` (not expired), marking it used now, without cloning
    /// the value: the per-packet path.
    #[expect(clippy::disallowed_methods, reason = "the guard lives only for `f`, which cannot await")]
    pub fn get_with<R>(&self, key: &K, f: impl FnOnce(&PoolEntry<V>) -> R) -> Option<R> {
        let now = self.admission.millis(Instant::now());
        let entry = self.entries.get(key)?;
        if self.deadline_of(&entry).0 <= now {
            return None; // expired, awaiting the sweep: never handed out
        }
        entry.last_used.store(now, Ordering::Relaxed);
        Some(f(&entry))
    }

    /// Every entry's key and value (a snapshot; for reloads, not the packet path).
    pub fn snapshot(&self) -> Vec<(K, V)> {
        self.entries.iter().map(|e| (e.key().clone(), e.value().value.clone())).collect()
    }
}

impl<K: Eq + Hash + Clone + Ord, V: Clone> ConnectionPool<K, V> for DashMapConnectionPool<K, V> {
    fn insert(&self, key: K, value: V) -> Result<(), InsertError> {
        let slot = self.admit().ok_or(InsertError::Full { max: self.admission.max() })?;
        self.insert_admitted(key, value, slot).map_err(|_| InsertError::Occupied)
    }

    fn get(&self, key: &K) -> Option<V> {
        self.get_with(key, |entry| entry.value.clone())
    }

    fn remove(&self, key: &K) -> Option<V> {
        let (_, entry) = self.entries.remove(key)?;
        self.evicted.fetch_add(1, Ordering::Relaxed);
        Some(entry.value)
    }

    fn drain(&self) -> Vec<(K, V)> {
        let keys: Vec<K> = self.entries.iter().map(|e| e.key().clone()).collect();
        keys.into_iter().filter_map(|key| self.remove(&key).map(|value| (key, value))).collect()
    }

    fn size(&self) -> usize {
        self.entries.len()
    }

    fn max_size(&self) -> usize {
        self.admission.max()
    }

    fn touch(&self, key: &K) -> bool {
        self.get_with(key, |_| ()).is_some()
    }

    #[expect(clippy::disallowed_methods, reason = "guards live within one expression; no await here")]
    fn expire(&self, now: Instant) -> Vec<(K, V, Expired)> {
        let now = self.admission.millis(now);
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
            let taken = self.entries.remove_if(&key, |_, entry| self.deadline_of(entry).0 <= now);
            match taken {
                Some((key, entry)) => {
                    self.expired.fetch_add(1, Ordering::Relaxed);
                    let (_, why) = self.deadline_of(&entry);
                    removed.push((key, entry.value, why));
                }
                None => {
                    let next = self.entries.get(&key).map(|e| self.deadline_of(&e).0);
                    if let Some(deadline) = next {
                        self.schedule(key, deadline);
                    }
                }
            }
        }
        removed
    }

    fn stats(&self) -> PoolStats {
        self.admission.stats(self.expired.load(Ordering::Relaxed), self.evicted.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    /// Test keys: client addresses 127.0.0.1:k.
    fn key(k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], k))
    }

    fn pool(max: usize, idle_ms: u64) -> DashMapConnectionPool<SocketAddr, u32> {
        DashMapConnectionPool::new(max, Expiry { idle: Duration::from_millis(idle_ms), max_age: None })
    }

    #[tokio::test(start_paused = true)]
    async fn insert_at_capacity_fails_without_evicting() {
        let p = pool(2, 1000);
        p.insert(key(1), 10).unwrap();
        p.insert(key(2), 20).unwrap();
        assert_eq!(p.insert(key(3), 30), Err(InsertError::Full { max: 2 }));
        assert_eq!((p.get(&key(1)), p.get(&key(2)), p.get(&key(3))), (Some(10), Some(20), None));
        assert_eq!(p.stats().rejected_inserts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_key_is_refused_and_frees_its_reservation() {
        let p = pool(2, 1000);
        p.insert(key(1), 10).unwrap();
        assert_eq!(p.insert(key(1), 11), Err(InsertError::Occupied));
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
        assert_eq!(expired, vec![(key(1), 10, Expired::Idle)]);
        assert_eq!(p.get(&key(2)), Some(20)); // a use: idle again from now
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(p.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(p.expire(Instant::now()), vec![(key(2), 20, Expired::Idle)]);
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
            10,
            Expiry { idle: Duration::from_millis(100), max_age: Some(Duration::from_millis(250)) },
        );
        p.insert(key(1), 10).unwrap();
        let mut expired = Vec::new();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(50)).await;
            p.touch(&key(1));
            expired.extend(p.expire(Instant::now()));
        }
        assert_eq!(expired, vec![(key(1), 10, Expired::MaxAge)]);
        assert_eq!(p.get(&key(1)), None);
        assert_eq!(p.stats().expired_count, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_work_is_proportional_to_what_is_due() {
        let p = pool(10_000, 1000);
        for k in 0..10_000 {
            p.insert(key(k), u32::from(k)).unwrap();
        }
        let examined_by = |p: &DashMapConnectionPool<SocketAddr, u32>, sweep: &dyn Fn() -> usize| {
            let before = p.examined.load(Ordering::Relaxed);
            let expired = sweep();
            (expired, p.examined.load(Ordering::Relaxed) - before)
        };
        // Nothing is due: the sweep looks at the heap's head only, at no entry.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(examined_by(&p, &|| p.expire(Instant::now()).len()), (0, 0));
        // 100 used since: when the first 1,000 ms are up, 9,900 expire and the 100 are looked
        // at and re-queued; each due entry is looked at a bounded number of times.
        for k in 0..100 {
            assert!(p.touch(&key(k)));
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        let (expired, examined) = examined_by(&p, &|| p.expire(Instant::now()).len());
        assert_eq!(expired, 9_900);
        assert!(examined <= 2 * 10_000, "{examined} entries examined for 10,000 due");
        assert_eq!(examined_by(&p, &|| p.expire(Instant::now()).len()), (0, 0), "nothing more is due");
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
        assert_eq!(p.drain(), vec![(key(2), 2)]);
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
                let p: DashMapConnectionPool<SocketAddr, u8> = DashMapConnectionPool::new(8, Expiry { idle, max_age: None });
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
                            for (k, _, why) in &removed {
                                prop_assert_eq!(*why, Expired::Idle);
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

#[cfg(test)]
mod admission_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn admission_refuses_at_the_limit_counts_it_and_gives_places_back_on_drop() {
        let admission = Admission::new(2);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        assert!(admission.admit().is_none());
        assert_eq!((admission.occupied(), admission.rejected()), (2, 1));
        drop(a);
        assert_eq!(admission.occupied(), 1);
        assert!(admission.admit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn admission_reports_the_average_age_of_held_places() {
        let admission = Admission::new(10);
        let old = admission.admit().unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        let _new = admission.admit().unwrap();
        assert!((admission.average_age_seconds() - 2.0).abs() < 0.01);
        drop(old);
        assert!(admission.average_age_seconds() < 0.01);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_limit_keeps_held_places_and_refuses_new_ones() {
        let admission = Admission::new(3);
        let held: Vec<_> = (0..3).map(|_| admission.admit().unwrap()).collect();
        admission.set_max(1);
        assert!(admission.admit().is_none());
        assert_eq!(admission.occupied(), 3);
        drop(held);
        assert!(admission.admit().is_some());
    }
}
