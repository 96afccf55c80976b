//! Brings up the whole driver stack on this machine for hands-on use (`up`): the infra
//! cluster with KubeVirt's own virt-api and virt-controller (or the stand-in, `--bed
//! standin`), a QEMU worker VM running the node plugin, the
//! controller plugin, a guest cluster with kube-controller-manager, and the real CSI
//! sidecars. Writes admin kubeconfigs to `<out>/{infra,guest}.kubeconfig` and what a shell
//! needs to reach the stack to `<out>/stack.env`, and stays in the foreground until
//! SIGINT/SIGTERM, then stops everything. `demo` walks a running stack through the example
//! (see `demo.rs`). `hack/local-up.sh` wraps both.
#![forbid(unsafe_code)]

mod demo;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kubevirt_csi_harness::csi::connect_tcp;
use kubevirt_csi_harness::guest::{FullStack, FullStackOptions};
use kubevirt_csi_harness::kubelet::{KubeletStandin, bind_unscheduled_pods};
use kubevirt_csi_harness::stack::{Bed, StackOptions};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "The kubevirt-csi stack on this machine (run it through hack/local-up.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the stack and keep it running until SIGINT or SIGTERM.
    Up(UpArgs),
    /// Walk a running stack through deploy/example, step by step, and clean up.
    Demo(demo::DemoArgs),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Where the kubeconfigs, stack.env and the ready marker go.
    #[arg(long, default_value = "_output/local")]
    out: PathBuf,
    #[arg(long, default_value = "scsi")]
    bus: String,
    /// The infra bed: `hotplug` or `declarative` (KubeVirt's own virt-api and
    /// virt-controller with that gate profile), or `standin`.
    #[arg(long, default_value = "hotplug")]
    bed: Bed,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `value` quoted for a POSIX shell (single quotes; an embedded quote closes, escapes and
/// reopens).
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// What `hack/local-up.sh status` and `demo` need to know about the running stack, as
/// `export` lines a shell can source. Values that exist only while it runs (ports, scratch
/// directories, pids) live here and nowhere else.
fn stack_env(fs: &FullStack, vm_agent: std::net::SocketAddr) -> String {
    let vars: Vec<(&str, String)> = vec![
        ("KVCSI_LOCAL_PID", std::process::id().to_string()),
        ("KVCSI_INFRA_SERVER", fs.stack.cp.url().to_string()),
        ("KVCSI_GUEST_SERVER", fs.guest.cp.url().to_string()),
        ("KVCSI_INFRA_NAMESPACE", fs.stack.tenant.namespace.clone()),
        ("KVCSI_WORKER_VM", fs.node.vm_name.clone()),
        ("KVCSI_GUEST_NODE", fs.node.name.clone()),
        ("KVCSI_GUEST_AGENT", vm_agent.to_string()),
        ("KVCSI_NODE_ENDPOINT", fs.stack.node_endpoint().to_string()),
        (
            "KVCSI_CONTROLLER_SOCKET",
            fs.stack.controller.socket().display().to_string(),
        ),
        (
            "KVCSI_KUBELET_ROOT",
            fs.stack.kubelet_root().display().to_string(),
        ),
        ("KVCSI_STACK_DIR", fs.stack.dir().display().to_string()),
        ("KVCSI_INFRA_DIR", fs.stack.cp.dir().display().to_string()),
        ("KVCSI_GUEST_DIR", fs.guest.cp.dir().display().to_string()),
        (
            "KVCSI_QEMU_PID",
            fs.stack
                .vm
                .as_ref()
                .map(|vm| vm.qemu_pid().to_string())
                .unwrap_or_default(),
        ),
        (
            "KVCSI_VM_DIR",
            fs.stack
                .vm
                .as_ref()
                .map(|vm| vm.work_dir().display().to_string())
                .unwrap_or_default(),
        ),
    ];
    let mut out =
        String::from("# Written by kvcsi-local-up while the stack runs; removed when it stops.\n");
    for (k, v) in vars {
        let _ = writeln!(out, "export {k}={}", shell_quote(&v));
    }
    out
}

/// Writes `path` whole or not at all, so a reader never sees half a file.
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

async fn up(args: UpArgs) -> Result<(), BoxError> {
    let t = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let ready = args.out.join("ready");
    let env_file = args.out.join("stack.env");
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&env_file);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let start = FullStack::start(FullStackOptions {
        stack: StackOptions {
            bus: args.bus.clone(),
            bed: args.bed,
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
    let agent = vm.agent_addr();
    let kubelet = KubeletStandin::new(
        fs.guest.client().await?,
        connect_tcp(fs.stack.node_endpoint().parse()?).await?,
        vm,
        &fs.node.name,
        &fs.stack.kubelet_root(),
    );
    write_atomically(&env_file, &stack_env(&fs, agent))?;
    let took = t.elapsed();
    println!(
        "kubevirt-csi local stack is up ({:.1}s).\n\n\
         infra cluster: tenant namespace {ns}, worker VM {vm} (QEMU), kubeconfig {infra}\n\
         \x20              running {bed}\n\
         guest cluster: node {node}, sidecars running, kubeconfig {guest}\n\n\
         pods are bound to {node} by a scheduler stand-in, and a kubelet stand-in stages and\n\
         publishes their volumes inside the VM (no containers run: there is no runtime).\n\
         logs: {logs}\n",
        took.as_secs_f64(),
        bed = match args.bed {
            Bed::Standin => "the KubeVirt and CDI stand-in".to_string(),
            Bed::KubeVirt(p) => format!("KubeVirt's virt-api and virt-controller ({p:?} gates)"),
        },
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
    for f in [&ready, &env_file, &infra_kc, &guest_kc] {
        let _ = std::fs::remove_file(f);
    }
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
    let result = match Cli::parse().command {
        Command::Up(args) => up(args).await,
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
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
