//! Where the external tools (pinned and cached by `hack/tools.sh`) and the workspace's own
//! binaries are. A missing tool is an error that says how to get it, never a skipped test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tool or binary the harness needs and cannot find.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {script}")]
    Script {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{script} failed: {stderr}")]
    ScriptFailed { script: PathBuf, stderr: String },
    #[error("{what} not found at {path}: run hack/tools.sh (or hack/test.sh) first")]
    Missing { what: String, path: PathBuf },
    #[error("workspace binary {name} not found at {path}: run `cargo build --workspace` first")]
    MissingBinary { name: String, path: PathBuf },
}

/// Paths of the pinned external tools.
#[derive(Clone, Debug)]
pub struct Tools {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
    pub csi_sanity: PathBuf,
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Runs `hack/<script> <args>` and returns its stdout; a failure carries its stderr.
pub fn run_script(script: &str, args: &[&str]) -> Result<String, ToolError> {
    let path = repo_root().join("hack").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .map_err(|source| ToolError::Script {
            script: path.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ToolError::ScriptFailed {
            script: path,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a hack/ script that prints `export NAME='value'` lines and returns the pairs.
pub fn script_env(script: &str, arg: &str) -> Result<Vec<(String, String)>, ToolError> {
    Ok(run_script(script, &[arg])?
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect())
}

impl Tools {
    /// Finds the tools from the environment `hack/test.sh` exports, or else asks
    /// `hack/tools.sh --env` (which only prints paths; it never builds).
    pub fn locate() -> Result<Self, ToolError> {
        let from_script = script_env("tools.sh", "--env")?;
        let get = |var: &str| -> Result<PathBuf, ToolError> {
            let path = std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| {
                    from_script
                        .iter()
                        .find(|(k, _)| k == var)
                        .map(|(_, v)| PathBuf::from(v))
                })
                .unwrap_or_default();
            if path.is_file() {
                Ok(path)
            } else {
                Err(ToolError::Missing {
                    what: var.to_lowercase().replace('_', "-"),
                    path,
                })
            }
        };
        Ok(Self {
            kube_apiserver: get("KUBE_APISERVER")?,
            kube_controller_manager: get("KUBE_CONTROLLER_MANAGER")?,
            kubectl: get("KUBECTL")?,
            etcd: get("ETCD")?,
            csi_sanity: get("CSI_SANITY")?,
        })
    }
}

/// A binary built from this workspace (`kubevirt-standin`, `kubevirt-csi-controller`, ...).
///
/// Integration tests run from `target/<profile>/deps/`; cargo puts workspace binaries one
/// level up. `KVCSI_BIN_DIR` overrides that.
pub fn workspace_bin(name: &str) -> Result<PathBuf, ToolError> {
    let dir = std::env::var_os("KVCSI_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let deps = exe.parent()?;
            Some(if deps.ends_with("deps") {
                deps.parent()?.to_path_buf()
            } else {
                deps.to_path_buf()
            })
        })
        .unwrap_or_default();
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ToolError::MissingBinary {
            name: name.to_string(),
            path,
        })
    }
}
