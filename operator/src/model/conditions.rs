//! Conditions as `metav1.Condition`: decided fresh on every reconcile from what it found, merged
//! with what the resource already says so `lastTransitionTime` moves only when a status flips,
//! and compared so an unchanged status is never written.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use super::{effective::Resolved, spec::SpecError};

pub const ACCEPTED: &str = "Accepted";
pub const READY: &str = "Ready";

/// Longest condition message (the API allows 32768; a status should stay readable).
const MAX_MESSAGE_LEN: usize = 1024;

/// A condition as the reconciler decides it, before times are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Decided {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self::with_status(type_, if status { "True" } else { "False" }, reason, message)
    }

    /// A condition whose status cannot be told yet.
    pub fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self::with_status(type_, "Unknown", reason, message)
    }

    fn with_status(
        type_: &'static str,
        status: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
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

/// What became of the gateway.
#[derive(Debug)]
pub enum GatewayState {
    /// Applied; the Deployment reports this many available replicas.
    Applied { name: String, wanted: i32, available: i32 },
    /// An object with the gateway's name exists and belongs to someone else: nothing applied.
    Conflict(String),
}

/// The conditions, from what the reconcile found: the spec check and resolution, and the
/// gateway when the resource has one.
pub fn decide(resolved: &Result<Resolved, SpecError>, gateway: Option<&GatewayState>) -> Vec<Decided> {
    let resolved = match resolved {
        Err(e) => {
            return vec![
                Decided::new(ACCEPTED, false, e.reason, e.to_string()),
                Decided::new(READY, false, "NotAccepted", "the spec is not accepted; see the Accepted condition"),
            ];
        }
        Ok(resolved) => resolved,
    };
    let accepted = Decided::new(ACCEPTED, true, "Valid", "the spec is valid");
    let ready = if !resolved.unresolved.is_empty() {
        let names: Vec<_> = resolved.unresolved.iter().map(ToString::to_string).collect();
        Decided::new(READY, false, "BackendsUnresolved", names.join("; "))
    } else if resolved.config.is_none() {
        Decided::new(READY, false, "InvalidEffectiveConfig", "the resolved backends do not make a valid config")
    } else if let Some(GatewayState::Conflict(why)) = gateway {
        Decided::new(READY, false, "GatewayConflict", why.clone())
    } else if let Some(GatewayState::Applied { name, wanted, available }) = gateway
        && *available < (*wanted).min(1)
    {
        Decided::new(
            READY,
            false,
            "GatewayUnavailable",
            format!("gateway Deployment {name} has {available} of {wanted} replicas available"),
        )
    } else {
        let backends: u32 = resolved.backends_per_listener.iter().map(|(_, n)| n).sum();
        Decided::new(READY, true, "Resolved", format!("{backends} backend addresses resolved"))
    };
    vec![accepted, ready]
}

/// The conditions to write: `decided` with `observedGeneration`, keeping each existing
/// condition's `lastTransitionTime` when its status did not change, `now` otherwise.
pub fn merge(existing: &[Condition], decided: &[Decided], generation: i64, now: Timestamp) -> Vec<Condition> {
    decided
        .iter()
        .map(|d| {
            let status = d.status;
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

    fn resolved(backends: u32) -> Resolved {
        let config = crate::model::effective::EffectiveConfig {
            version: crate::model::effective::ConfigVersion(1),
            generation: 1,
            listeners: vec![],
        };
        Resolved { config: Some(config), unresolved: vec![], backends_per_listener: vec![("web".into(), backends)] }
    }

    fn ready(decided: &[Decided]) -> (bool, &'static str) {
        let ready = decided.iter().find(|d| d.type_ == READY).unwrap();
        (ready.status == "True", ready.reason)
    }

    #[test]
    fn refused_spec_is_not_accepted_and_not_ready() {
        let refused = SpecError { reason: "InvalidSpec", field: "spec.listeners[0]".into(), message: "bad".into() };
        let decided = decide(&Err(refused), None);
        assert_eq!((decided[0].type_, decided[0].status, decided[0].reason), (ACCEPTED, "False", "InvalidSpec"));
        assert_eq!(ready(&decided), (false, "NotAccepted"));
    }

    #[test]
    fn gateway_conflict_or_no_available_replica_is_not_ready() {
        let conflict = GatewayState::Conflict("Service shop/db-gateway exists".into());
        assert_eq!(ready(&decide(&Ok(resolved(1)), Some(&conflict))), (false, "GatewayConflict"));
        let starting = GatewayState::Applied { name: "shop/db-gateway".into(), wanted: 2, available: 0 };
        assert_eq!(ready(&decide(&Ok(resolved(1)), Some(&starting))), (false, "GatewayUnavailable"));
        let one_up = GatewayState::Applied { name: "shop/db-gateway".into(), wanted: 2, available: 1 };
        assert_eq!(ready(&decide(&Ok(resolved(1)), Some(&one_up))), (true, "Resolved"));
        assert_eq!(ready(&decide(&Ok(resolved(1)), None)), (true, "Resolved"));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let d = Decided::new(READY, false, "X", "é".repeat(2000));
        assert!(d.message.len() <= MAX_MESSAGE_LEN && d.message.ends_with("..."));
    }
}
