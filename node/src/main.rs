//! The node plugin binary: resolve who we are, then serve until SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use kubevirt_csi_node::config::{Args, LogFormat, NodeConfig};
use kubevirt_csi_node::error::chain;
use kubevirt_csi_node::node_id::NodeId;
use kubevirt_csi_node::node_service::NodeService;
use kubevirt_csi_node::server::{Endpoint, serve};
use tokio::signal::unix::{SignalKind, signal};

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let endpoint: Endpoint = args.endpoint.parse()?;
    // Checked before anything else is resolved, so a refused endpoint is the error shown.
    endpoint.check_exposure(args.insecure_tcp)?;
    let flag = args
        .node_id
        .as_deref()
        .map(str::parse::<NodeId>)
        .transpose()?;
    let node_id = NodeId::resolve(flag, args.node_name.as_deref())
        .await
        .map_err(|e| format!("cannot resolve the node id: {}", chain(&e)))?;
    let cfg = NodeConfig::from_args(&args, node_id)
        .map_err(|e| format!("cannot open the state directory: {}", chain(&e)))?;
    tracing::info!(node_id = %cfg.node_id, max_volumes = cfg.max_volumes_per_node, kubelet_root = ?cfg.kubelet_root.path(), state_dir = ?cfg.state.path(), "starting node plugin");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let listener = endpoint.listen(args.insecure_tcp).await?;
    serve(listener, NodeService::new(cfg), shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    // One thread serves gRPC; volume work runs on a small blocking pool. Keeps the resident
    // set small on a node where every MiB belongs to the tenant.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %chain(e.as_ref()), "node plugin failed");
            eprintln!("kubevirt-csi-node: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
