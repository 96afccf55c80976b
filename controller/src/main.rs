//! `kubevirt-csi-controller`: the CSI controller plugin (Identity + Controller services).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use csi_proto::v1::controller_server::ControllerServer;
use csi_proto::v1::identity_server::IdentityServer;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubevirt_csi_controller::driver::{Driver, HotplugMode, Settings, Timeouts};
use kubevirt_csi_controller::identity::Identity;
use kubevirt_csi_controller::infra::{Infra, Tenant};
use kubevirt_csi_controller::params::{Bus, ConfigFile};
use kubevirt_csi_controller::server::{Endpoint, Listener, shutdown_signal};
use kubevirt_csi_controller::service::ControllerService;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BusArg {
    Scsi,
    Virtio,
    Sata,
}

/// The kubevirt-csi controller plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to serve CSI: unix:///path/csi.sock or tcp://host:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Allow a TCP endpoint on a non-loopback address. CSI carries no authentication: anyone
    /// who reaches the port can create, attach and delete this tenant's volumes.
    #[arg(long)]
    insecure_tcp: bool,
    /// Kubeconfig for the infra cluster; in-cluster credentials when absent.
    #[arg(long, env = "INFRA_KUBECONFIG")]
    infra_kubeconfig: Option<PathBuf>,
    /// The tenant's namespace in the infra cluster (where its worker VMs run).
    #[arg(long, env = "INFRA_NAMESPACE")]
    infra_namespace: String,
    /// A label (key=value) every infra object of this tenant carries. Repeatable; required.
    #[arg(
        long = "tenant-label",
        env = "TENANT_LABELS",
        value_delimiter = ',',
        required = true
    )]
    tenant_labels: Vec<String>,
    /// Prefix of infra DataVolume and VolumeSnapshot names.
    #[arg(long, env = "VOLUME_PREFIX", default_value = "kvcsi-")]
    volume_prefix: String,
    /// Config file (YAML): storageClassEnforcement and snapshotClasses.
    #[arg(long, env = "CONFIG_FILE")]
    config: Option<PathBuf>,
    /// Bus for hotplugged disks when the StorageClass does not name one.
    #[arg(long, value_enum, default_value = "scsi")]
    default_bus: BusArg,
    /// Hotplugged volumes allowed per worker VM.
    #[arg(long, default_value_t = 64)]
    max_volumes_per_vm: usize,
    /// Largest volume to provision or grow to, as a Kubernetes quantity (e.g. 64Ti); larger
    /// requests are OUT_OF_RANGE instead of claims no provisioner fills.
    #[arg(long, value_parser = parse_size, default_value = "64Ti")]
    max_volume_size: u64,
    /// How to hotplug: addvolume subresources, or by editing the VM spec.
    #[arg(long, value_enum, default_value = "subresource")]
    hotplug_mode: HotplugMode,
    /// Longest wait for a DataVolume to be provisioned (keep below external-provisioner's --timeout).
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    create_timeout: Duration,
    /// Longest wait for a DataVolume to be deleted.
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    delete_timeout: Duration,
    /// Longest wait for a hotplug to be Ready (keep below external-attacher's --timeout).
    #[arg(long, value_parser = parse_duration, default_value = "12s")]
    attach_timeout: Duration,
    /// Longest wait for an unplug to finish.
    #[arg(long, value_parser = parse_duration, default_value = "12s")]
    detach_timeout: Duration,
    /// Longest wait for a claim to grow (keep below external-resizer's --timeout).
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    expand_timeout: Duration,
    /// Longest wait for a snapshot to be ready.
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    snapshot_timeout: Duration,
    #[arg(long, value_enum, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn parse_size(s: &str) -> Result<u64, String> {
    kubevirt_csi_controller::quantity::bytes(
        &k8s_openapi::apimachinery::pkg::api::resource::Quantity(s.to_string()),
    )
    .filter(|b| *b > 0)
    .ok_or_else(|| format!("{s:?} is not a positive size like 64Ti or 500Gi"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 8s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration like 500ms, 8s or 2m")),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

async fn infra_client(path: Option<&PathBuf>) -> Result<kube::Client, Box<dyn std::error::Error>> {
    let config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .map_err(|e| format!("cannot read infra kubeconfig {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::incluster().map_err(|e| {
            format!("no --infra-kubeconfig given and no in-cluster credentials: {e}")
        })?,
    };
    Ok(kube::Client::try_from(config)?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    init_logging(args.log_format);
    // Refused endpoints fail before anything talks to the infra cluster.
    // Display, not Debug: main's Err is printed with Debug, and these messages say what to do.
    let endpoint = Endpoint::parse(&args.endpoint).map_err(|e| e.to_string())?;
    endpoint
        .check_exposure(args.insecure_tcp)
        .map_err(|e| e.to_string())?;

    let tenant = Tenant::new(&args.infra_namespace, &args.tenant_labels)?;
    let config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read config file {}: {e}", p.display()))?;
            serde_yaml::from_str::<ConfigFile>(&text)
                .map_err(|e| format!("config file {} is invalid: {e}", p.display()))?
        }
        None => ConfigFile {
            storage_class_enforcement: kubevirt_csi_controller::params::StorageClassEnforcement {
                allow_default: true,
                ..Default::default()
            },
            ..Default::default()
        },
    };
    let client = infra_client(args.infra_kubeconfig.as_ref()).await?;
    let settings = Settings {
        volume_prefix: args.volume_prefix,
        default_bus: match args.default_bus {
            BusArg::Scsi => Bus::Scsi,
            BusArg::Virtio => Bus::Virtio,
            BusArg::Sata => Bus::Sata,
        },
        max_volumes_per_vm: args.max_volumes_per_vm,
        max_volume_bytes: args.max_volume_size,
        hotplug_mode: args.hotplug_mode,
        timeouts: Timeouts {
            create: args.create_timeout,
            delete: args.delete_timeout,
            attach: args.attach_timeout,
            detach: args.detach_timeout,
            expand: args.expand_timeout,
            snapshot: args.snapshot_timeout,
        },
        config,
    };
    let driver = Driver::new(Infra::new(client.clone(), tenant.clone()), settings);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(Identity::new(client)))
        .add_service(ControllerServer::new(ControllerService::new(driver)));

    let listener = endpoint
        .listen(args.insecure_tcp)
        .await
        .map_err(|e| kubevirt_csi_common::error_chain(&e))?;
    tracing::info!(endpoint = %listener.describe(), namespace = %tenant.namespace, labels = %tenant.selector(), "serving CSI controller");
    match listener {
        Listener::Unix { listener, path } => {
            router
                .serve_with_incoming_shutdown(Listener::unix_incoming(listener), shutdown_signal())
                .await?;
            let _ = std::fs::remove_file(&path);
        }
        Listener::Tcp { listener, .. } => {
            router
                .serve_with_incoming_shutdown(Listener::tcp_incoming(listener), shutdown_signal())
                .await?;
        }
    }
    Ok(())
}
