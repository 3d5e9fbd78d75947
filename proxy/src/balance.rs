//! Load-balancing algorithms. Pure choice logic over a slice of candidates, so it is tested
//! without sockets; eligibility (not ejected, not yet tried for this connection) is the caller's.

use std::{
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::LoadBalancing;

/// What a balancer needs to know of a backend.
pub trait Candidate {
    /// Relative share, at least 1.
    fn weight(&self) -> u32;
    /// Connections open now.
    fn active(&self) -> usize;
    /// Stable identity (the address as written), used by source hashing.
    fn key(&self) -> &str;
}

/// Picks a backend for each new connection.
#[derive(Debug)]
pub struct Balancer {
    kind: LoadBalancing,
    /// Smooth weighted round robin's running weights (nginx's algorithm), one per backend.
    /// A short critical section per pick; contention is bounded by the number of workers.
    current: Mutex<Vec<i64>>,
    /// Where LeastConnections starts looking, so ties spread instead of piling on backend 0.
    cursor: AtomicUsize,
}

impl Balancer {
    pub fn new(kind: LoadBalancing, backends: usize) -> Self {
        Self { kind, current: Mutex::new(vec![0; backends]), cursor: AtomicUsize::new(0) }
    }

    /// The index of the chosen backend among those `eligible`, or `None` if none is.
    pub fn pick<C: Candidate>(
        &self,
        backends: &[C],
        client: IpAddr,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match self.kind {
            LoadBalancing::RoundRobin => self.round_robin(backends, eligible),
            LoadBalancing::LeastConnections => self.least_connections(backends, eligible),
            LoadBalancing::Random => power_of_two_choices(backends, eligible),
            LoadBalancing::SourceHash => rendezvous(backends, client, eligible),
        }
    }

    fn round_robin<C: Candidate>(&self, backends: &[C], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        // A poisoned lock only means another picker panicked mid-update; the weights are still
        // integers and the algorithm self-corrects, so keep using them.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, backend) in backends.iter().enumerate().filter(|(i, _)| eligible(*i)) {
            let weight = i64::from(backend.weight());
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }

    fn least_connections<C: Candidate>(&self, backends: &[C], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).filter(|&i| eligible(i)).reduce(|a, b| less_loaded(backends, a, b))
    }
}

/// Of two indices, the one with fewer active connections per unit of weight (`a` on a tie).
fn less_loaded<C: Candidate>(backends: &[C], a: usize, b: usize) -> usize {
    let load = |i: usize| backends[i].active() as u128;
    let weight = |i: usize| u128::from(backends[i].weight());
    // active_a / weight_a <= active_b / weight_b, without division.
    if load(a) * weight(b) <= load(b) * weight(a) { a } else { b }
}

/// Two distinct random eligible backends; the less loaded one wins.
fn power_of_two_choices<C: Candidate>(backends: &[C], eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..backends.len()).filter(|&i| eligible(i)).count();
    let nth = |k: usize| (0..backends.len()).filter(|&i| eligible(i)).nth(k);
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let first = fastrand::usize(..count);
            let mut second = fastrand::usize(..count - 1);
            if second >= first {
                second += 1;
            }
            Some(less_loaded(backends, nth(first)?, nth(second)?))
        }
    }
}

/// Weighted rendezvous hashing: each backend scores the client by a hash of (client IP, backend
/// key); the highest score wins. The hash has a fixed seed, so the choice is the same across
/// restarts and replicas, and removing a backend moves only the clients it had.
fn rendezvous<C: Candidate>(backends: &[C], client: IpAddr, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let ip = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let ip_hash = xxh3_64_with_seed(&ip, 0x6c34_7072_6f78_7921);
    let score = |c: &C| {
        let h = xxh3_64_with_seed(c.key().as_bytes(), ip_hash);
        // A uniform value in (0, 1), then the weighted score w / -ln(u).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(c.weight()) / -u.ln()
    };
    (0..backends.len())
        .filter(|&i| eligible(i))
        .map(|i| (i, score(&backends[i])))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        key: String,
        weight: u32,
        active: usize,
    }

    impl Candidate for Fake {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn active(&self) -> usize {
            self.active
        }
        fn key(&self) -> &str {
            &self.key
        }
    }

    fn fakes(weights: &[u32]) -> Vec<Fake> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Fake { key: format!("10.0.0.{i}:80"), weight, active: 0 })
            .collect()
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn counts(balancer: &Balancer, backends: &[Fake], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; backends.len()];
        for _ in 0..picks {
            counts[balancer.pick(backends, CLIENT, |_| true).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let backends = fakes(&[5, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::RoundRobin, 3);
        assert_eq!(counts(&balancer, &backends, 70), vec![50, 10, 10]);
    }

    #[test]
    fn round_robin_interleaves_smoothly() {
        let backends = fakes(&[2, 1]);
        let balancer = Balancer::new(LoadBalancing::RoundRobin, 2);
        let order: Vec<usize> = (0..6).map(|_| balancer.pick(&backends, CLIENT, |_| true).unwrap()).collect();
        assert_eq!(order, vec![0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn round_robin_skips_ineligible_backends() {
        let backends = fakes(&[1, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::RoundRobin, 3);
        for _ in 0..10 {
            assert_ne!(balancer.pick(&backends, CLIENT, |i| i != 1), Some(1));
        }
        assert_eq!(balancer.pick(&backends, CLIENT, |_| false), None);
    }

    #[test]
    fn least_connections_prefers_lowest_load_per_weight() {
        let mut backends = fakes(&[1, 4, 1]);
        backends[0].active = 2;
        backends[1].active = 4; // 1 per unit of weight
        backends[2].active = 3;
        let balancer = Balancer::new(LoadBalancing::LeastConnections, 3);
        assert_eq!(balancer.pick(&backends, CLIENT, |_| true), Some(1));
        assert_eq!(balancer.pick(&backends, CLIENT, |i| i != 1), Some(0));
    }

    #[test]
    fn least_connections_spreads_ties() {
        let backends = fakes(&[1, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::LeastConnections, 3);
        let c = counts(&balancer, &backends, 30);
        assert_eq!(c, vec![10, 10, 10]);
    }

    #[test]
    fn random_two_choices_never_picks_the_busier_of_two() {
        let mut backends = fakes(&[1, 1]);
        backends[0].active = 10;
        let balancer = Balancer::new(LoadBalancing::Random, 2);
        assert_eq!(counts(&balancer, &backends, 50), vec![0, 50]);
    }

    #[test]
    fn random_picks_only_eligible() {
        let backends = fakes(&[1, 1, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::Random, 4);
        for _ in 0..100 {
            assert_eq!(balancer.pick(&backends, CLIENT, |i| i == 2), Some(2));
        }
    }

    #[test]
    fn source_hash_is_stable_and_moves_only_clients_of_a_removed_backend() {
        let backends = fakes(&[1, 1, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::SourceHash, 4);
        let clients: Vec<IpAddr> = (0..200u8).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        let before: Vec<usize> = clients.iter().map(|&c| balancer.pick(&backends, c, |_| true).unwrap()).collect();
        let again: Vec<usize> = clients.iter().map(|&c| balancer.pick(&backends, c, |_| true).unwrap()).collect();
        assert_eq!(before, again);
        let after: Vec<usize> = clients.iter().map(|&c| balancer.pick(&backends, c, |i| i != 3).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(a, b, "a client whose backend stayed must not move");
            }
        }
        assert!(before.iter().filter(|&&b| b == 3).count() > 20, "hashing spreads clients");
    }

    #[test]
    fn source_hash_is_fixed_across_processes() {
        // The same inputs must give the same backend in every build and run.
        let backends = fakes(&[1, 1, 1, 1]);
        let balancer = Balancer::new(LoadBalancing::SourceHash, 4);
        let picks: Vec<usize> =
            (0..8u8).map(|i| balancer.pick(&backends, IpAddr::from([198, 51, 100, i]), |_| true).unwrap()).collect();
        assert_eq!(picks, PINNED_SOURCE_HASH_PICKS);
    }

    // Recorded once; a change here moves every client of every deployment.
    const PINNED_SOURCE_HASH_PICKS: [usize; 8] = [0, 1, 3, 3, 3, 0, 1, 3];

    #[test]
    fn source_hash_follows_weights() {
        let backends = fakes(&[3, 1]);
        let balancer = Balancer::new(LoadBalancing::SourceHash, 2);
        let mut counts = [0usize; 2];
        for i in 0..4000u32 {
            counts[balancer.pick(&backends, IpAddr::from(i.to_be_bytes()), |_| true).unwrap()] += 1;
        }
        let share = counts[0] as f64 / 4000.0;
        assert!((0.70..0.80).contains(&share), "weight 3:1 gave share {share}");
    }
}
