//! kubevirt-standin: the parts of KubeVirt (virt-api and virt-controller for hotplug) and CDI
//! (plus an infra storage provisioner) that the kubevirt-csi driver touches, speaking their
//! real API through a real kube-apiserver. See `--help`.
#![forbid(unsafe_code)]

mod backend;
mod cdi;
mod context;
mod error;
mod faults;
mod files;
mod hotplug_api;
mod hotplug_controller;
mod provisioner;
mod quantity;
mod registration;
mod server;
mod snapshots;
mod tls;
mod types;
mod update;
mod watches;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use context::{Ctx, StatusModes};
use futures::FutureExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::info;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Stand-in for KubeVirt hotplug (virt-api + virt-controller) and CDI with a file-backed
/// provisioner. Prints `STANDIN READY <addr>` on stdout once it serves and its watches run.
#[derive(Debug, Parser)]
#[command(name = "kubevirt-standin", version)]
struct Args {
    /// Kubeconfig of the infra cluster.
    #[arg(long, env = "STANDIN_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory for the volumes' and snapshots' sparse files.
    #[arg(long, env = "STANDIN_DATA_DIR", default_value = "standin-data")]
    data_dir: PathBuf,
    /// HTTPS listen address of the aggregated API (port 0 picks a free port).
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serving certificate (PEM). Without it a throwaway CA and certificate are generated.
    #[arg(long, env = "STANDIN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, env = "STANDIN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Front-proxy CA: when given, API calls must come with a client certificate it signed.
    #[arg(long, env = "STANDIN_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// CA bundle for the APIService (the CA that signed --tls-cert; defaults to the cert itself).
    #[arg(long, env = "STANDIN_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// Namespace for the Service and the faults ConfigMap (created if missing).
    #[arg(long, env = "STANDIN_NAMESPACE", default_value = "kubevirt")]
    namespace: String,
    /// Log format on stderr.
    #[arg(long, env = "STANDIN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// How long to wait for the APIService to become Available.
    #[arg(long, env = "STANDIN_READY_TIMEOUT_SECS", default_value_t = 60)]
    ready_timeout_secs: u64,
    /// Run only CDI, the provisioner and snapshots: no aggregated hotplug API and no VM/VMI
    /// controllers, for beds where KubeVirt's own virt-api and virt-controller run.
    #[arg(long, env = "STANDIN_CDI_ONLY")]
    cdi_only: bool,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=warn")
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let started = Instant::now();
    let signal = tokio::spawn(shutdown_signal());

    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    let client = kube::Client::try_from(config).context("building the kubernetes client")?;
    let data = files::DataDir::new(&args.data_dir)?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    info!(%addr, "listening");
    let serving = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => tls::load(c, k, args.ca_bundle.as_deref())?,
        _ => tls::generate(&[
            "localhost".into(),
            "127.0.0.1".into(),
            format!("{}.{}.svc", registration::SERVICE, args.namespace),
        ])?,
    };
    let ca_pem = match (&args.ca_bundle, &args.tls_cert) {
        (Some(p), None) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        _ => serving.ca_pem.clone(),
    };
    let tls_config = tls::server_config(&serving, args.client_ca.as_deref())?;

    let status = StatusModes::detect(&client)
        .await
        .context("reading the KubeVirt/CDI/snapshot CRDs (are they installed?)")?;
    info!(?status, "status write modes");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        data,
        faults: faults::FaultState::default(),
        backends: backend::Backends::default(),
        status,
    });

    let server = if args.cdi_only {
        // Keep the listener (the ready line names it) but serve nothing on it.
        tokio::spawn(futures::future::pending::<()>())
    } else {
        tokio::spawn(server::serve(
            listener,
            tls_config,
            ctx.clone(),
            args.client_ca.is_some(),
        ))
    };

    let (ready_dv, run_dv) = cdi::controller(ctx.clone());
    let (ready_pvc, run_pvc) = provisioner::controller(ctx.clone());
    let (ready_vs, run_vs) = snapshots::controller(ctx.clone());
    let (ready_vmi, run_vmi) = hotplug_controller::vmi_controller(ctx.clone());
    let (ready_vm, run_vm) = hotplug_controller::vm_controller(ctx.clone());
    let (ready_vmi, ready_vm) = if args.cdi_only {
        (
            futures::future::ready(()).boxed(),
            futures::future::ready(()).boxed(),
        )
    } else {
        (ready_vmi.boxed(), ready_vm.boxed())
    };
    let cdi_only = args.cdi_only;
    let controllers = tokio::spawn(async move {
        if cdi_only {
            tokio::join!(run_dv, run_pvc, run_vs);
        } else {
            tokio::join!(run_dv, run_pvc, run_vs, run_vmi, run_vm);
        }
    });
    if !args.cdi_only {
        registration::register(&client, &args.namespace, addr.port(), &ca_pem).await?;
    }
    let faults_api: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let fault_watch = tokio::spawn(faults::run(faults_api, ctx.faults.clone()));

    let timeout = Duration::from_secs(args.ready_timeout_secs);
    tokio::time::timeout(timeout, async {
        let t = |name: &'static str, f| async move {
            f.await;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                watch = name,
                "watch synced"
            );
        };
        tokio::join!(
            t("datavolumes", ready_dv.boxed()),
            t("persistentvolumeclaims", ready_pvc.boxed()),
            t("volumesnapshots", ready_vs.boxed()),
            t("virtualmachineinstances", ready_vmi),
            t("virtualmachines", ready_vm)
        )
    })
    .await
    .map_err(|_| anyhow::anyhow!("controller watches not synced after {timeout:?}"))?;
    if !args.cdi_only {
        registration::wait_available(&client, timeout).await?;
    }
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "STANDIN READY {addr}").context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }

    let why = tokio::select! {
        s = signal => s.context("signal task")??,
        r = server => anyhow::bail!("the https server stopped: {r:?}"),
        r = controllers => anyhow::bail!("the controllers stopped: {r:?}"),
        r = fault_watch => anyhow::bail!("the faults watch stopped: {r:?}"),
    };
    info!(signal = why, "shutting down");
    Ok(())
}
