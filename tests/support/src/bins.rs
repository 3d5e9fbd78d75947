//! Finding the etcd / kube-apiserver / kubectl binaries built by `tools/build.sh`.
//!
//! Tests must never silently skip because the binaries are missing: a skipped control-plane
//! test looks exactly like a passing one. So every lookup either finds all binaries or fails
//! with instructions.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Binaries a control plane needs (kubectl is for [`crate::ControlPlane::kubectl`]).
pub const REQUIRED_BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kubectl"];

/// Explicit bin directory, set by the Makefile and `tests/controlplane/up`.
pub const TOOLS_BIN_ENV: &str = "L4PROXY_TOOLS_BIN";

/// The envtest convention, honoured so an existing envtest setup works too.
pub const KUBEBUILDER_ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";

const HOW_TO_FIX: &str = "run `tools/build.sh` (or `make test`) to build etcd, kube-apiserver and kubectl";

/// Locates the directory holding [`REQUIRED_BINARIES`].
///
/// Order: `$L4PROXY_TOOLS_BIN`, then `$KUBEBUILDER_ASSETS`, then the directory
/// `tools/build.sh --print-dir` names for this checkout. A variable that is set but points at an
/// incomplete directory is an error rather than a fall-through, so a typo cannot go unnoticed.
pub fn locate() -> Result<PathBuf> {
    for var in [TOOLS_BIN_ENV, KUBEBUILDER_ASSETS_ENV] {
        if let Some(dir) = env::var_os(var).filter(|value| !value.is_empty()) {
            return check(Path::new(&dir), &format!("${var}"));
        }
    }
    let dir = print_dir().with_context(|| format!("cannot locate the control-plane binaries; {HOW_TO_FIX}"))?;
    check(&dir, "`tools/build.sh --print-dir`")
}

/// The workspace root: this crate lives in `<repo>/tests/support`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Asks `tools/build.sh` (without building) which cache directory this checkout uses.
fn print_dir() -> Result<PathBuf> {
    let script = repo_root().join("tools/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--print-dir")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} --print-dir failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().rev().find(|line| !line.trim().is_empty()) {
        Some(line) => Ok(PathBuf::from(line.trim())),
        None => bail!("{} --print-dir printed nothing", script.display()),
    }
}

/// Accepts `dir` only if it holds every required binary as an executable file.
fn check(dir: &Path, source: &str) -> Result<PathBuf> {
    let missing: Vec<&str> = REQUIRED_BINARIES.iter().copied().filter(|name| !is_executable(&dir.join(name))).collect();
    if !missing.is_empty() {
        bail!("{source} = {} lacks {}; {HOW_TO_FIX}", dir.display(), missing.join(", "));
    }
    Ok(dir.to_path_buf())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Points at a prebuilt `l4proxy` binary (the Makefile sets it); otherwise one is built.
pub const PROXY_BIN_ENV: &str = "L4PROXY_BIN";

/// The `l4proxy` binary for tests that run real proxy processes next to an operator: `$L4PROXY_BIN`
/// when set, else this checkout's debug build, made once per test process with
/// `cargo build -p l4proxy --bin l4proxy` (a no-op when it is current).
pub fn proxy_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Some(path) = env::var_os(PROXY_BIN_ENV).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("${PROXY_BIN_ENV}={} is not a file", path.display());
        }
        return Ok(path);
    }
    let built = BUILT.get_or_init(|| {
        let root = repo_root();
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "l4proxy", "--bin", "l4proxy"])
            .current_dir(&root)
            .status()
            .map_err(|e| format!("running cargo build -p l4proxy: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p l4proxy failed ({status})"));
        }
        let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        Ok(target.join("debug").join("l4proxy"))
    });
    match built {
        Ok(path) => Ok(path.clone()),
        Err(why) => bail!("{why}; or set ${PROXY_BIN_ENV}"),
    }
}
