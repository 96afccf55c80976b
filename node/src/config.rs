//! Command-line flags and the settings the node service runs with.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::context::Bus;
use crate::discovery::Sysfs;
use crate::node_id::NodeId;
use crate::paths::KubeletRoot;
use crate::state::{StateDir, StateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// kubevirt-csi node plugin: serves CSI Identity and Node inside a KubeVirt worker VM.
#[derive(Debug, Clone, Parser)]
#[command(name = "kubevirt-csi-node", version)]
pub struct Args {
    /// Where to serve: unix:///path/to/csi.sock or tcp://127.0.0.1:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Allow a TCP endpoint on a non-loopback address. CSI carries no authentication and
    /// this plugin mounts and formats disks as root, so anyone who can reach the port owns
    /// the node: only for test VMs reached through a forwarded port.
    #[arg(long)]
    pub insecure_tcp: bool,
    /// The infra VM backing this node as <namespace>/<vm-name>; read from the Node object
    /// named by --node-name when absent.
    #[arg(long, env = "KUBEVIRT_CSI_NODE_ID")]
    pub node_id: Option<String>,
    /// The guest Node to read the infra VM from.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Staging and target paths must lie under this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// The plugin's own records (staged block volumes, the mounts it made). Must survive
    /// plugin restarts and be writable by no pod; CO paths inside it are refused.
    /// Default: <kubelet-root>/plugins/csi.kubevirt.io/node-state.
    #[arg(long, env = "KUBEVIRT_CSI_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where sysfs is mounted (a fixture tree in tests).
    #[arg(long, default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// Where device nodes live.
    #[arg(long, default_value = "/dev")]
    pub dev_root: PathBuf,
    /// The bus volumes are hotplugged on, for max_volumes_per_node.
    #[arg(long, default_value = "scsi")]
    pub bus: Bus,
    /// Overrides the bus's volume limit (0 = no limit).
    #[arg(long)]
    pub max_volumes: Option<i64>,
    /// How long NodeStage waits for a hotplugged disk to appear; below kubelet's 2-minute
    /// timeout for CSI calls, so kubelet sees our NOT_FOUND rather than its own timeout.
    #[arg(long, default_value_t = 60)]
    pub discovery_timeout_secs: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl clap::builder::ValueParserFactory for Bus {
    type Parser = clap::builder::ValueParser;

    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<Bus>())
    }
}

/// What the node service needs to serve.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub kubelet_root: KubeletRoot,
    pub state: StateDir,
    pub sysfs: Sysfs,
    pub discovery_timeout: Duration,
    pub max_volumes_per_node: i64,
}

impl Args {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.kubelet_root.join("plugins/csi.kubevirt.io/node-state"))
    }
}

impl NodeConfig {
    /// Opens the state directory (adopting mounts of earlier versions on its first use).
    pub fn from_args(args: &Args, node_id: NodeId) -> Result<Self, StateError> {
        let state_dir = args.state_dir();
        let state = StateDir::open(&state_dir, &args.kubelet_root)?;
        Ok(Self {
            node_id,
            kubelet_root: KubeletRoot::new(args.kubelet_root.clone()).with_state_dir(&state_dir),
            state,
            sysfs: Sysfs::new(&args.sysfs_root, &args.dev_root),
            discovery_timeout: Duration::from_secs(args.discovery_timeout_secs),
            max_volumes_per_node: args.max_volumes.unwrap_or(args.bus.max_hotplug_volumes()),
        })
    }
}
