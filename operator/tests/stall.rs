//! An API server that stops answering (frozen with SIGSTOP, as a stalled node or a long GC
//! pause would leave it): the leader gives up its leadership on time, says so, and once the API
//! server answers again it leads again and writes what changed at once, not at the next resync.
//! Its own control plane: freezing the shared one would stall every other test.

mod support;

use std::process::Command;

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use l4proxy_operator::L4Proxy;
use l4proxy_testenv::{ControlPlane, wait_for};
use serde_json::json;
use support::*;

const SIMPLE: &str = "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: web}\nspec:\n  listeners:\n  - {name: web, address: '127.0.0.1:8080', backends: [{address: '127.0.0.1:9000'}]}\n";

/// A frozen process, thawed on drop whatever the test does.
struct Frozen(u32);

impl Frozen {
    fn freeze(pid: u32) -> Self {
        signal("STOP", pid);
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("CONT", self.0);
    }
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn after_an_api_server_stall_leadership_ends_on_time_and_a_change_is_written_at_once() {
    let control_plane = ControlPlane::start_in_temp_dir().expect("a control plane of its own");
    let client = control_plane.client().await;
    install_crd(&client).await;
    let ns = control_plane.namespace(&client, "stall").await;
    let operator = start_leader(&client, ns.name(), "op-1").await;
    let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
    create(&api, SIMPLE).await;
    wait_status(&api, "web", "Ready for generation 1", |p| has_condition(p, "Ready", "True")).await;

    let (_, apiserver) = control_plane.pids().into_iter().find(|(name, _)| *name == "kube-apiserver").unwrap();
    let frozen = Frozen::freeze(apiserver);
    // The lease cannot be renewed: leadership ends at the renew deadline (4 s here), and the
    // gauge says so while the API server is still frozen.
    wait_for("leadership to end", TIMEOUT, || async { (!operator.leadership.is_leader()).then_some(()) }).await;
    // `is_leader` follows the clock (the lease's deadline passed); the gauge follows when the
    // elector's loop notices, a moment later.
    wait_for("the leader gauge to follow", TIMEOUT, || async {
        operator.metrics.encode().contains("l4proxy_operator_leader 0\n").then_some(())
    })
    .await;
    assert!(operator.metrics.encode().contains("l4proxy_operator_leader 0\n"));
    drop(frozen);

    // A change right after the thaw is written within seconds, not at the 5-minute resync.
    let patch = json!({"spec": {"listeners": [{"name": "web", "address": "127.0.0.1:8080",
        "backends": [{"address": "127.0.0.1:9000"}, {"address": "127.0.0.1:9001"}]}]}});
    wait_for("the patch to be accepted", TIMEOUT, || async {
        api.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.ok()
    })
    .await;
    let proxy = wait_status(&api, "web", "generation 2 written", |p| {
        p.status.as_ref().and_then(|s| s.observed_generation) == Some(2) && has_condition(p, "Ready", "True")
    })
    .await;
    assert_eq!(proxy.status.unwrap().listeners[0].backends, 2);
    assert!(operator.leadership.is_leader());
    assert!(operator.metrics.encode().contains("l4proxy_operator_leader 1\n"));
    operator.stop().await;
}
