//! Tests of the test control plane itself, against the real etcd and kube-apiserver.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use l4proxy_testenv::{ControlPlane, StartOptions, TEST_NAMESPACE_LABEL, wait_for};

/// Set in the child process of `shared_control_plane_is_stopped_when_the_test_process_exits`.
const CHILD_ENV: &str = "L4PROXY_TESTENV_EXIT_CHILD";

#[tokio::test]
async fn control_plane_starts_and_serves_readyz_and_namespaces() {
    let control_plane = ControlPlane::shared();
    eprintln!("shared control plane ready after {:?}", control_plane.startup_time());

    let readyz = control_plane.kubectl().args(["get", "--raw", "/readyz"]).output().unwrap();
    assert!(readyz.status.success(), "kubectl get --raw /readyz: {}", String::from_utf8_lossy(&readyz.stderr));
    assert_eq!(String::from_utf8_lossy(&readyz.stdout).trim(), "ok");

    let client = control_plane.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> =
        namespaces.list(&ListParams::default()).await.unwrap().into_iter().filter_map(|ns| ns.metadata.name).collect();
    assert!(names.iter().any(|name| name == "default"), "{names:?}");

    let test_namespace = control_plane.namespace(&client, "readyz_and_namespaces").await;
    assert!(test_namespace.name().starts_with("readyz-and-namespaces-"), "{}", test_namespace.name());
    let created = namespaces.get(test_namespace.name()).await.unwrap();
    assert_eq!(created.metadata.labels.unwrap().get(TEST_NAMESPACE_LABEL).map(String::as_str), Some("true"));
}

#[tokio::test]
async fn binaries_report_their_pinned_versions() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.37.2");
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "37"));

    // helm is ours only when tools/build.sh built the directory (KUBEBUILDER_ASSETS has none).
    let helm = control_plane.bin_dir().join("helm");
    if helm.exists() {
        let out = Command::new(helm).args(["version", "--short"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("v3.22.0"), "{out:?}");
    }
    let etcd = Command::new(control_plane.bin_dir().join("etcd")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&etcd.stdout).contains("etcd Version: 3.7.3"), "{etcd:?}");
}

/// A second test on the same control plane, in parallel with the first: same server, its own
/// namespace and client, and `wait_for` observing a write.
#[tokio::test]
async fn tests_share_one_control_plane_but_not_namespaces() {
    let control_plane = ControlPlane::shared();
    assert!(std::ptr::eq(control_plane, ControlPlane::shared()));
    let client = control_plane.client().await;
    let namespace = control_plane.namespace(&client, "shared").await;
    let other = control_plane.namespace(&client, "shared").await;
    assert_ne!(namespace.name(), other.name());

    let config_maps: Api<ConfigMap> = Api::namespaced(client, namespace.name());
    let config_map = ConfigMap {
        metadata: ObjectMeta { name: Some("probe".into()), ..ObjectMeta::default() },
        data: Some([("key".to_owned(), "value".to_owned())].into()),
        ..ConfigMap::default()
    };
    config_maps.create(&PostParams::default(), &config_map).await.unwrap();
    let seen = wait_for("the probe ConfigMap to be listed", Duration::from_secs(10), || async {
        let list = config_maps.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|cm| cm.metadata.name.as_deref() == Some("probe"))
    })
    .await;
    assert_eq!(seen.data.unwrap()["key"], "value");
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for something that never happens")]
async fn wait_for_panics_naming_what_never_happened() {
    wait_for("something that never happens", Duration::from_millis(200), || async { None::<()> }).await;
}

#[test]
fn stopped_control_plane_leaves_no_processes() {
    let control_plane = ControlPlane::start_in_temp_dir().unwrap();
    let dir = control_plane.dir().to_path_buf();
    let pids = control_plane.pids();
    assert_eq!(pids.iter().map(|(name, _)| *name).collect::<Vec<_>>(), ["etcd", "kube-apiserver"]);
    assert!(pids.iter().all(|(_, pid)| process_exists(*pid)));

    control_plane.stop().unwrap();
    for (name, pid) in &pids {
        assert!(!process_exists(*pid), "{name} (pid {pid}) still exists after stop");
    }
    assert!(control_plane.pids().is_empty());
    assert!(!dir.exists(), "temp dir {} not removed", dir.display());
    drop(control_plane); // a second stop (by Drop) is a no-op
}

#[test]
fn start_failure_reports_the_log_tail() {
    let bin_dir = fake_bin_dir("log-tail", "echo 'fake etcd: unknown flag: --bogus' >&2; exit 3");
    let dir = bin_dir.with_file_name(format!("{}-state", file_name(&bin_dir)));
    let options = StartOptions { bin_dir: Some(bin_dir.clone()), ..StartOptions::default() };

    let err = format!("{:#}", ControlPlane::start_with(&dir, &options).unwrap_err());
    assert!(err.contains("etcd (pid"), "{err}");
    assert!(err.contains("exited with exit status: 3"), "{err}");
    assert!(err.contains("fake etcd: unknown flag: --bogus"), "{err}");
    assert!(!dir.join("pids").exists());
    cleanup(&[&bin_dir, &dir]);
}

#[test]
fn lost_port_races_are_retried_with_new_ports() {
    let script = "echo \"listen tcp 127.0.0.1:2379: bind: address already in use\" >&2; exit 1";
    let bin_dir = fake_bin_dir("port-race", script);
    let dir = bin_dir.with_file_name(format!("{}-state", file_name(&bin_dir)));
    let options = StartOptions { bin_dir: Some(bin_dir.clone()), ..StartOptions::default() };

    let err = format!("{:#}", ControlPlane::start_with(&dir, &options).unwrap_err());
    assert!(err.contains("lost the race for free ports 4 times"), "{err}");
    assert!(err.contains("address already in use"), "{err}");
    cleanup(&[&bin_dir, &dir]);
}

/// Runs this test binary again, with only `exit_child_starts_shared_control_plane_and_panics`,
/// which starts the shared control plane and panics; once that process has exited, the control
/// plane's processes and temp dir must be gone.
#[test]
fn shared_control_plane_is_stopped_when_the_test_process_exits() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "exit_child_starts_shared_control_plane_and_panics", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the child test should have failed\n{stdout}\n{stderr}");
    assert!(stderr.contains("deliberate panic"), "{stdout}\n{stderr}");

    let dir = field(&stdout, "DIR").unwrap_or_else(|| panic!("no DIR line\n{stdout}\n{stderr}"));
    let pids = field(&stdout, "PIDS").unwrap_or_else(|| panic!("no PIDS line\n{stdout}\n{stderr}"));
    for pid in pids.split_whitespace() {
        let pid: u32 = pid.parse().unwrap();
        assert!(!process_exists(pid), "pid {pid} outlived the test process\n{stderr}");
    }
    assert!(!Path::new(&dir).exists(), "{dir} outlived the test process");
}

#[test]
#[ignore = "helper: run by shared_control_plane_is_stopped_when_the_test_process_exits"]
fn exit_child_starts_shared_control_plane_and_panics() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let control_plane = ControlPlane::shared();
    let pids: Vec<String> = control_plane.pids().iter().map(|(_, pid)| pid.to_string()).collect();
    println!("DIR {}", control_plane.dir().display());
    println!("PIDS {}", pids.join(" "));
    panic!("deliberate panic: the exit handler must still stop the shared control plane");
}

/// Whether `pid` exists as a live (non-zombie) process.
fn process_exists(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// A bin dir whose `etcd` is a shell script running `body`, for cheap start-failure tests.
fn fake_bin_dir(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("l4proxy-testenv-fake-{}-{name}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let etcd = dir.join("etcd");
    fs::write(&etcd, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&etcd, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn field(stdout: &str, key: &str) -> Option<String> {
    stdout.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ').map(str::to_owned))
}

fn cleanup(dirs: &[&Path]) {
    for dir in dirs {
        let _ = fs::remove_dir_all(dir);
    }
}
