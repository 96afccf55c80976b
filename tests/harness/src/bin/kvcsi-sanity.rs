//! Runs csi-sanity against the whole driver stack (see `kubevirt_csi_harness::stack`):
//! the controller on the host, the node plugin on the host or inside a QEMU worker VM.
//!
//! `kvcsi-sanity --node vm --bus scsi --access-type mount --bed hotplug [-- <more csi-sanity
//! flags>]` exits with csi-sanity's exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use kubevirt_csi_harness::stack::{Bed, NodePlacement, Stack, StackOptions};
use kubevirt_csi_harness::tools::Tools;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Node {
    Host,
    Vm,
}

#[derive(Debug, Parser)]
struct Args {
    /// The infra bed: `hotplug` or `declarative` (KubeVirt's own virt-api and
    /// virt-controller with that gate profile), or `standin`.
    #[arg(long, default_value = "standin")]
    bed: Bed,
    #[arg(long, value_enum, default_value = "vm")]
    node: Node,
    #[arg(long, default_value = "scsi")]
    bus: String,
    #[arg(long, default_value = "mount")]
    access_type: String,
    /// Flags passed on to csi-sanity (e.g. -ginkgo.focus=...).
    #[arg(last = true)]
    sanity_args: Vec<String>,
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error + Send + Sync>> {
    let tools = Tools::locate()?;
    let stack = Stack::start(StackOptions {
        node: match args.node {
            Node::Host => NodePlacement::Host,
            Node::Vm => NodePlacement::Vm,
        },
        bus: args.bus.clone(),
        bed: args.bed,
        ..Default::default()
    })
    .await?;
    let mut sanity = stack.sanity_args(&args.access_type)?;
    sanity.extend(args.sanity_args.iter().cloned());
    eprintln!(
        "running {} {}",
        tools.csi_sanity.display(),
        sanity.join(" ")
    );
    let status = tokio::process::Command::new(&tools.csi_sanity)
        .args(&sanity)
        .kill_on_drop(true)
        .status()
        .await?;
    if !status.success() {
        eprintln!(
            "--- controller log (tail) ---\n{}",
            stack.controller.log_tail(60)
        );
        eprintln!(
            "--- node plugin log (tail) ---\n{}",
            stack.node_log_tail(60)
        );
        eprintln!("{}", stack.infra_log_tails(40));
    }
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvcsi-sanity: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(2)
        }
    }
}
