//! The real CSI sidecars, as processes: external-provisioner, external-attacher,
//! external-resizer and csi-snapshotter on the controller plugin's socket, plus the
//! snapshot-controller, all against the guest cluster. Built at pinned versions by
//! `hack/tools.sh sidecars`; killed on drop.

use std::path::{Path, PathBuf};

use crate::process::{ManagedProcess, ProcessError};
use crate::tools::{ToolError, script_env};

/// Errors starting the sidecars.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// `hack/tools.sh --env` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A sidecar binary is not built.
    #[error("{name} not found at {path}: run hack/tools.sh sidecars first")]
    Missing { name: String, path: PathBuf },
    /// A sidecar could not start, or exited.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// One sidecar: its env var in `hack/tools.sh --env` and whether it talks CSI.
const SIDECARS: &[(&str, &str, bool)] = &[
    ("csi-provisioner", "CSI_PROVISIONER", true),
    ("csi-attacher", "CSI_ATTACHER", true),
    ("csi-resizer", "CSI_RESIZER", true),
    ("csi-snapshotter", "CSI_SNAPSHOTTER", true),
    ("snapshot-controller", "SNAPSHOT_CONTROLLER", false),
];

/// Running sidecars.
pub struct Sidecars {
    processes: Vec<ManagedProcess>,
}

impl Sidecars {
    /// Starts every sidecar; logs go to `<log_dir>/<name>.log`. The CSI sidecars use
    /// `sidecar_kubeconfig` (the driver's shipped RBAC); the snapshot-controller, a
    /// cluster component with its own RBAC upstream, uses `cluster_kubeconfig`.
    pub fn start(
        controller_socket: &Path,
        sidecar_kubeconfig: &Path,
        cluster_kubeconfig: &Path,
        log_dir: &Path,
    ) -> Result<Self, SidecarError> {
        let env = script_env("tools.sh", "--env")?;
        let mut processes = Vec::new();
        for &(name, var, csi) in SIDECARS {
            let path = std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| {
                    env.iter()
                        .find(|(k, _)| k == var)
                        .map(|(_, v)| PathBuf::from(v))
                })
                .unwrap_or_default();
            if !path.is_file() {
                return Err(SidecarError::Missing {
                    name: name.into(),
                    path,
                });
            }
            let mut args = vec![
                format!(
                    "--kubeconfig={}",
                    if csi {
                        sidecar_kubeconfig
                    } else {
                        cluster_kubeconfig
                    }
                    .display()
                ),
                "--leader-election=false".into(),
                "--v=4".into(),
            ];
            if csi {
                args.push(format!("--csi-address={}", controller_socket.display()));
                args.push("--timeout=30s".into());
            }
            match name {
                "csi-provisioner" => args.push("--extra-create-metadata".into()),
                // Retry failed operations fast: the driver's own waits are bounded.
                "csi-attacher" => args.push("--retry-interval-max=5s".into()),
                _ => {}
            }
            processes.push(ManagedProcess::spawn(
                name,
                &path,
                &args,
                &log_dir.join(format!("{name}.log")),
            )?);
        }
        Ok(Self { processes })
    }

    /// Fails with the log tail of the first sidecar that has exited.
    pub fn check_running(&mut self) -> Result<(), SidecarError> {
        for p in &mut self.processes {
            p.check_running()?;
        }
        Ok(())
    }

    /// The last lines of every sidecar's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Log lines (prefixed with the sidecar's name) containing `needle`, e.g. `forbidden`
    /// to catch an RBAC verb the shipped ClusterRoles miss.
    pub fn log_lines_matching(&self, needle: &str) -> Vec<String> {
        self.processes
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p.log_path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("{}: {l}", p.name()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// PIDs of the running sidecars.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().filter_map(|p| p.pid()).collect()
    }
}
