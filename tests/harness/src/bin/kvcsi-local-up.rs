//! Brings up the whole driver stack on this machine for hands-on use: the infra cluster
//! with the KubeVirt/CDI stand-in, a QEMU worker VM running the node plugin, the
//! controller plugin, a guest cluster with kube-controller-manager, and the real CSI
//! sidecars. Writes admin kubeconfigs to `<out>/{infra,guest}.kubeconfig` and stays in the
//! foreground until SIGINT/SIGTERM, then stops everything. `hack/local-up.sh` wraps it.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kubevirt_csi_harness::csi::connect_tcp;
use kubevirt_csi_harness::guest::{FullStack, FullStackOptions};
use kubevirt_csi_harness::kubelet::{KubeletStandin, bind_unscheduled_pods};
use kubevirt_csi_harness::stack::StackOptions;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
struct Args {
    /// Where the kubeconfigs and the ready marker go.
    #[arg(long, default_value = "_output/local")]
    out: PathBuf,
    #[arg(long, default_value = "scsi")]
    bus: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(args: Args) -> Result<(), BoxError> {
    let t = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let ready = args.out.join("ready");
    let _ = std::fs::remove_file(&ready);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let start = FullStack::start(FullStackOptions {
        stack: StackOptions {
            bus: args.bus.clone(),
            ..Default::default()
        },
        ..Default::default()
    });
    // A signal during start-up aborts it (dropping whatever was already running).
    let fs = tokio::select! {
        fs = start => fs?,
        _ = sigterm.recv() => return Err("interrupted during start-up".into()),
        _ = sigint.recv() => return Err("interrupted during start-up".into()),
    };
    let infra_kc = args.out.join("infra.kubeconfig");
    let guest_kc = args.out.join("guest.kubeconfig");
    std::fs::copy(fs.stack.cp.kubeconfig_path(), &infra_kc)?;
    std::fs::copy(fs.guest.kubeconfig_path(), &guest_kc)?;
    let scheduler = tokio::spawn(bind_unscheduled_pods(
        fs.guest.client().await?,
        fs.node.name.clone(),
    ));
    let vm = fs.stack.vm.as_ref().ok_or("the stack has no worker VM")?;
    let kubelet = KubeletStandin::new(
        fs.guest.client().await?,
        connect_tcp(fs.stack.node_endpoint().parse()?).await?,
        vm,
        &fs.node.name,
        &fs.stack.kubelet_root(),
    );
    let took = t.elapsed();
    println!(
        "kubevirt-csi local stack is up ({:.1}s).\n\n\
         infra cluster (tenant namespace {ns}, worker VM {vm}):\n  kubectl --kubeconfig {infra}\n\
         guest cluster (node {node}, StorageClass kubevirt-fast, sidecars running):\n  kubectl --kubeconfig {guest}\n\n\
         try:\n  kubectl --kubeconfig {guest} apply -k deploy/example\n  \
         kubectl --kubeconfig {guest} get pvc,volumeattachments\n  \
         kubectl --kubeconfig {infra} -n {ns} get datavolumes,pvc\n\n\
         pods are bound to {node} by a scheduler stand-in, and a kubelet stand-in stages and\n\
         publishes their volumes inside the VM (no containers run: there is no runtime).\n\
         logs: {logs}\n",
        took.as_secs_f64(),
        ns = fs.stack.tenant.namespace,
        vm = fs.node.vm_name,
        node = fs.node.name,
        infra = infra_kc.display(),
        guest = guest_kc.display(),
        logs = fs.stack.dir().display(),
    );
    std::fs::write(&ready, format!("{:.1}\n", took.as_secs_f64()))?;
    tokio::select! {
        _ = sigterm.recv() => eprintln!("SIGTERM: stopping"),
        _ = sigint.recv() => eprintln!("interrupted: stopping"),
        r = scheduler => eprintln!("scheduler stand-in stopped ({r:?}): stopping"),
        r = kubelet.run() => eprintln!("kubelet stand-in stopped ({r:?}): stopping"),
    }
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&infra_kc);
    let _ = std::fs::remove_file(&guest_kc);
    drop(kubelet);
    drop(fs);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube-rs logs every failed readiness probe of a starting apiserver as an error.
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvcsi-local-up: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(2)
        }
    }
}
