//! Conditions as `metav1.Condition`: computed fresh on every reconcile, merged with what the
//! resource already says so `lastTransitionTime` moves only when a status flips, and compared so
//! an unchanged status is never written.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

pub const ACCEPTED: &str = "Accepted";
pub const READY: &str = "Ready";

/// Longest condition message (the API allows 32768; a status should stay readable).
const MAX_MESSAGE_LEN: usize = 1024;

/// A condition as the reconciler decides it, before times are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Decided {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut cut = MAX_MESSAGE_LEN - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        Self { type_, status, reason, message }
    }
}

fn status_text(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

/// The conditions to write: `decided` with `observedGeneration`, keeping each existing
/// condition's `lastTransitionTime` when its status did not change, `now` otherwise.
pub fn merge(existing: &[Condition], decided: &[Decided], generation: i64, now: Timestamp) -> Vec<Condition> {
    decided
        .iter()
        .map(|d| {
            let status = status_text(d.status);
            let since = existing
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| Time(now));
            Condition {
                type_: d.type_.to_owned(),
                status: status.to_owned(),
                reason: d.reason.to_owned(),
                message: d.message.clone(),
                observed_generation: Some(generation),
                last_transition_time: since,
            }
        })
        .collect()
}

/// The conditions in `new` whose status or reason differs from `existing`: one Event each.
pub fn transitions<'a>(existing: &[Condition], new: &'a [Condition]) -> impl Iterator<Item = &'a Condition> {
    new.iter().filter(move |c| {
        !existing.iter().any(|old| old.type_ == c.type_ && old.status == c.status && old.reason == c.reason)
    })
}

/// Now, to the second: what the API server stores, so a written time compares equal when read back.
pub fn now() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge(&[], &[Decided::new(READY, false, "BackendsUnresolved", "a")], 1, at(100));
        assert_eq!(first[0].last_transition_time, Time(at(100)));
        // Same status, new reason and generation: time kept.
        let second = merge(&first, &[Decided::new(READY, false, "GatewayUnavailable", "b")], 2, at(200));
        assert_eq!(second[0].last_transition_time, Time(at(100)));
        assert_eq!(second[0].observed_generation, Some(2));
        // Flip: time moves.
        let third = merge(&second, &[Decided::new(READY, true, "Resolved", "c")], 2, at(300));
        assert_eq!(third[0].last_transition_time, Time(at(300)));
        assert_eq!(third[0].status, "True");
    }

    #[test]
    fn unchanged_decision_merges_to_equal_conditions() {
        let decided = [Decided::new(ACCEPTED, true, "Valid", "ok"), Decided::new(READY, true, "Resolved", "ok")];
        let first = merge(&[], &decided, 3, at(100));
        assert_eq!(merge(&first, &decided, 3, at(999)), first);
        assert_eq!(transitions(&first, &first).count(), 0);
    }

    #[test]
    fn transitions_are_status_or_reason_changes() {
        let old = merge(&[], &[Decided::new(READY, false, "BackendsUnresolved", "a")], 1, at(1));
        let same_reason = merge(&old, &[Decided::new(READY, false, "BackendsUnresolved", "other text")], 1, at(2));
        assert_eq!(transitions(&old, &same_reason).count(), 0);
        let new_reason = merge(&old, &[Decided::new(READY, false, "GatewayUnavailable", "a")], 1, at(2));
        assert_eq!(transitions(&old, &new_reason).count(), 1);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let d = Decided::new(READY, false, "X", "é".repeat(2000));
        assert!(d.message.len() <= MAX_MESSAGE_LEN && d.message.ends_with("..."));
    }
}
