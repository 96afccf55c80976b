//! `kvcsi-local-up demo`: applies `deploy/example` to a running local stack and shows, step by
//! step and as it happens, what the driver did with it: the guest claim, the infra
//! DataVolume, the bound PV, the VolumeAttachment, the disk in the worker VM, the mounted
//! filesystem at kubelet's path, a file written and read back there through the guest
//! agent, and the cleanup of all of it. Every wait is a watch (or, inside the VM, a poll)
//! with a bound; the first step that fails ends the demo with a non-zero exit, after a
//! best-effort cleanup so the next run starts clean.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::runtime::watcher;
use kubevirt_csi_common::error_chain as chain;
use kubevirt_csi_harness::fixtures::{data_volume_resource, vmi_resource};
use kubevirt_csi_harness::kubelet::{
    FAILED_MOUNT_REASON, MOUNTED_CONDITION, MOUNTED_REASON, wait_for,
};
use kubevirt_csi_harness::vm::agent::AgentClient;
use tokio::sync::oneshot;

/// The claim and the pod `deploy/example` creates (both are named so).
const EXAMPLE: &str = "kubevirt-csi-example";
/// Annotation on an infra DataVolume naming the CSI volume it backs (the controller's).
const ANN_CSI_NAME: &str = "csi.kubevirt.io/csi-name";
/// What the demo writes into the volume and expects to read back.
const PAYLOAD: &str = "written by hack/local-up.sh demo through the guest agent";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Guest cluster kubeconfig (`source _output/local/env` sets KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    guest_kubeconfig: PathBuf,
    /// Infra cluster kubeconfig.
    #[arg(long, env = "INFRA_KUBECONFIG")]
    infra_kubeconfig: PathBuf,
    /// Host address of the worker VM's guest agent.
    #[arg(long, env = "KVCSI_GUEST_AGENT")]
    agent: SocketAddr,
    /// The tenant's namespace in the infra cluster.
    #[arg(long, env = "KVCSI_INFRA_NAMESPACE")]
    infra_namespace: String,
    /// The infra VM behind the guest node.
    #[arg(long, env = "KVCSI_WORKER_VM")]
    vm: String,
    /// kubelet's root directory inside the VM (where the stand-in stages and publishes).
    #[arg(long, env = "KVCSI_KUBELET_ROOT")]
    kubelet_root: PathBuf,
    /// The kustomization to apply.
    #[arg(long, default_value = "deploy/example")]
    example: PathBuf,
    /// kubectl to apply and delete it with (looked up on PATH).
    #[arg(long, default_value = "kubectl")]
    kubectl: PathBuf,
    /// Bound on each step, in seconds (QEMU without KVM on a busy machine is slow).
    #[arg(long, default_value_t = 180)]
    step_timeout: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Prints numbered steps with the time since the start and since the previous step.
struct Steps {
    start: Instant,
    last: Instant,
    n: usize,
}

impl Steps {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            n: 0,
        }
    }

    fn done(&mut self, title: &str, details: &[String]) {
        self.done_at(Instant::now(), title, details);
    }

    /// A step that happened at `at` (seen by a watch that was running since before the
    /// apply), which may be earlier than the moment the demo got to checking it.
    fn done_at(&mut self, at: Instant, title: &str, details: &[String]) {
        let now = at;
        self.n += 1;
        println!(
            "[{:>2}] {:>6.1}s (+{:.1}s)  {title}",
            self.n,
            now.saturating_duration_since(self.start).as_secs_f64(),
            now.saturating_duration_since(self.last).as_secs_f64(),
        );
        for d in details {
            println!("                       {d}");
        }
        self.last = now;
    }

    fn failed(&self, what: &str, e: &BoxError) {
        println!(
            "[{:>2}] {:>6.1}s  FAILED: {what}: {}",
            self.n + 1,
            self.start.elapsed().as_secs_f64(),
            chain(e.as_ref()),
        );
    }
}

/// When each state of the flow was first seen, by watches that run from before the apply:
/// the demo checks the states one after another, but prints when they happened.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Instant>>>);

impl Seen {
    fn mark(&self, key: String) {
        let now = Instant::now();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(now);
    }

    /// The recorded time of `key`, or now if no watch saw it (it cannot be earlier).
    fn at(&self, key: &str) -> Instant {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or_else(Instant::now)
    }
}

/// Watches `api` and marks the keys `keys` derives from every object it sees; reports on
/// `listed` once the initial list is in, so nothing that happens after that is missed.
fn record<K>(
    api: Api<K>,
    seen: Seen,
    keys: impl Fn(&K) -> Vec<String> + Send + 'static,
) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        let stream = watcher(api, watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                    for k in keys(&o) {
                        seen.mark(k);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                // A failed watch is retried by the watcher itself; a state it misses meanwhile
                // is timed when the demo checks it.
                _ => {}
            }
        }
    });
    (task, rx)
}

/// Starts the recorders for every state the demo times, and waits until each has listed.
async fn start_recorders(
    ctx: &Ctx,
    seen: &Seen,
) -> Result<Vec<tokio::task::JoinHandle<()>>, BoxError> {
    let gns = ctx.guest_ns.as_str();
    let recorders = vec![
        record(
            Api::<PersistentVolumeClaim>::namespaced(ctx.guest.clone(), gns),
            seen.clone(),
            |p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                let mut keys = vec![format!("pvc/{name}")];
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    keys.push(format!("pvc-bound/{name}"));
                }
                keys
            },
        ),
        record(
            Api::<DynamicObject>::namespaced_with(
                ctx.infra.clone(),
                &ctx.args.infra_namespace,
                &data_volume_resource(),
            ),
            seen.clone(),
            |dv| {
                dv.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_CSI_NAME))
                    .map(|n| vec![format!("dv/{n}")])
                    .unwrap_or_default()
            },
        ),
        record(
            Api::<VolumeAttachment>::all(ctx.guest.clone()),
            seen.clone(),
            |va| match &va.spec.source.persistent_volume_name {
                Some(pv) if va.status.as_ref().is_some_and(|s| s.attached) => {
                    vec![format!("va-attached/{pv}")]
                }
                _ => Vec::new(),
            },
        ),
        record(
            Api::<Event>::namespaced(ctx.guest.clone(), gns),
            seen.clone(),
            |e| {
                vec![format!(
                    "event/{}/{}",
                    e.involved_object.uid.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or("")
                )]
            },
        ),
    ];
    let mut tasks = Vec::new();
    for (task, listed) in recorders {
        tasks.push(task);
        match tokio::time::timeout(ctx.timeout, listed).await {
            Ok(Ok(())) => {}
            _ => {
                for t in &tasks {
                    t.abort();
                }
                return Err(format!("a watch did not list within {:?}", ctx.timeout).into());
            }
        }
    }
    Ok(tasks)
}

/// Clients and names the steps share.
struct Ctx {
    args: DemoArgs,
    guest: kube::Client,
    guest_ns: String,
    infra: kube::Client,
    agent: AgentClient,
    timeout: Duration,
}

/// What earlier steps found, for later ones and the cleanup.
#[derive(Default)]
struct Found {
    pvc_uid: String,
    dv: String,
    pv: String,
    attachment: String,
    serial: String,
    device: String,
    target: String,
}

async fn client(path: &Path) -> Result<(kube::Client, String), BoxError> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("cannot load kubeconfig {}: {e}", path.display()))?;
    let ns = config.default_namespace.clone();
    Ok((kube::Client::try_from(config)?, ns))
}

pub async fn run(args: DemoArgs) -> Result<(), BoxError> {
    let (guest, guest_ns) = client(&args.guest_kubeconfig).await?;
    let (infra, _) = client(&args.infra_kubeconfig).await?;
    let timeout = Duration::from_secs(args.step_timeout);
    let ctx = Ctx {
        agent: AgentClient::new(args.agent).with_timeout(timeout),
        args,
        guest,
        guest_ns,
        infra,
        timeout,
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.guest.clone(), &ctx.guest_ns);
    if pvcs.get_opt(EXAMPLE).await?.is_some() {
        return Err(format!(
            "claim {}/{EXAMPLE} exists already (from an earlier run?); remove it with: kubectl delete -k {}",
            ctx.guest_ns,
            ctx.args.example.display()
        )
        .into());
    }
    println!(
        "demo: {} on the guest cluster, flow traced into the infra cluster (namespace {}) and worker VM {}",
        ctx.args.example.display(),
        ctx.args.infra_namespace,
        ctx.args.vm
    );
    let seen = Seen::default();
    let recorders = start_recorders(&ctx, &seen).await?;
    let mut steps = Steps::new();
    let mut found = Found::default();
    let flow = flow(&ctx, &seen, &mut steps, &mut found).await;
    for r in recorders {
        r.abort();
    }
    if let Err((what, e)) = &flow {
        steps.failed(what, e);
        println!("cleaning up what the demo created (see `hack/local-up.sh status` for the logs)");
    }
    let cleanup = cleanup(&ctx, &mut steps, &found).await;
    if let Err((what, e)) = &cleanup {
        steps.failed(what, e);
    }
    match (flow, cleanup) {
        (Ok(()), Ok(())) => {
            println!(
                "\ndemo passed in {:.1}s. By hand:\n  \
                 kubectl apply -k {example}\n  \
                 kubectl wait --for=condition={MOUNTED_CONDITION} pod/{EXAMPLE} --timeout=120s\n  \
                 kubectl get pvc,pv,volumeattachments\n  \
                 kubectl --kubeconfig \"$INFRA_KUBECONFIG\" -n {ns} get datavolumes,pvc,vmi\n  \
                 kubectl describe pod {EXAMPLE}\n  \
                 kvcsi-guest-exec -- lsblk -o NAME,SIZE,MOUNTPOINTS\n  \
                 kubectl delete -k {example}",
                steps.start.elapsed().as_secs_f64(),
                example = ctx.args.example.display(),
                ns = ctx.args.infra_namespace,
            );
            Ok(())
        }
        (Err((what, _)), _) | (Ok(()), Err((what, _))) => {
            Err(format!("demo failed at: {what}").into())
        }
    }
}

type StepResult = Result<(), (String, BoxError)>;

/// A step that found something wrong, with the step's name.
fn fail<T>(what: &str, message: String) -> Result<T, (String, BoxError)> {
    Err((what.to_string(), message.into()))
}

/// Attaches the step's name to its error.
fn at<T, E: Into<BoxError>>(what: &str, r: Result<T, E>) -> Result<T, (String, BoxError)> {
    r.map_err(|e| (what.to_string(), e.into()))
}

async fn flow(ctx: &Ctx, seen: &Seen, steps: &mut Steps, found: &mut Found) -> StepResult {
    let gns = ctx.guest_ns.as_str();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.guest.clone(), gns);
    let pods: Api<Pod> = Api::namespaced(ctx.guest.clone(), gns);

    let what = "kubectl apply";
    let applying = Instant::now();
    let out = at(
        what,
        kubectl(
            ctx,
            &["apply", "-k", &ctx.args.example.display().to_string()],
        )
        .await,
    )?;
    let mut details: Vec<String> = out.lines().map(str::to_owned).collect();
    details.push(format!(
        "(kubectl took {:.1}s)",
        applying.elapsed().as_secs_f64()
    ));
    steps.done_at(
        applying,
        &format!("kubectl apply -k {}", ctx.args.example.display()),
        &details,
    );

    let what = "guest PVC";
    let pvc = at(what, pvcs.get(EXAMPLE).await)?;
    found.pvc_uid = pvc.metadata.uid.clone().unwrap_or_default();
    let spec = pvc.spec.clone().unwrap_or_default();
    steps.done_at(
        seen.at(&format!("pvc/{EXAMPLE}")),
        &format!("guest PVC {gns}/{EXAMPLE} created"),
        &[format!(
            "StorageClass {}, {} requested (phase now {})",
            spec.storage_class_name.as_deref().unwrap_or("-"),
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| q.0.as_str())
                .unwrap_or("-"),
            pvc.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("-"),
        )],
    );

    // external-provisioner names the CSI volume pvc-<claim uid>; the controller records
    // that name on the DataVolume it creates for it.
    let what = "infra DataVolume";
    let csi_name = format!("pvc-{}", found.pvc_uid);
    let dvs: Api<DynamicObject> = Api::namespaced_with(
        ctx.infra.clone(),
        &ctx.args.infra_namespace,
        &data_volume_resource(),
    );
    let want = csi_name.clone();
    let dv = at(
        what,
        wait_for(
            dvs,
            ctx.timeout,
            &format!("a DataVolume for {csi_name}"),
            move |dv: &DynamicObject| {
                dv.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_CSI_NAME))
                    == Some(&want)
            },
        )
        .await,
    )?;
    found.dv = dv.metadata.name.clone().unwrap_or_default();
    let labels = dv.metadata.labels.clone().unwrap_or_default();
    let storage = &dv.data["spec"]["storage"];
    steps.done_at(
        seen.at(&format!("dv/{csi_name}")),
        &format!(
            "infra DataVolume {}/{} created by the controller",
            ctx.args.infra_namespace, found.dv
        ),
        &[
            format!("labels: {}", join_map(&labels)),
            format!(
                "infra StorageClass {}, {} requested, {ANN_CSI_NAME}={csi_name}",
                storage["storageClassName"].as_str().unwrap_or("(default)"),
                quantity(
                    storage["resources"]["requests"]["storage"]
                        .as_str()
                        .unwrap_or("-")
                ),
            ),
        ],
    );

    let what = "PV Bound";
    let bound = at(
        what,
        wait_for(
            pvcs.clone(),
            ctx.timeout,
            &format!("pvc {gns}/{EXAMPLE} Bound"),
            |p: &PersistentVolumeClaim| {
                p.metadata.name.as_deref() == Some(EXAMPLE)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
            },
        )
        .await,
    )?;
    found.pv = bound.spec.and_then(|s| s.volume_name).unwrap_or_default();
    let pv = at(
        what,
        Api::<PersistentVolume>::all(ctx.guest.clone())
            .get(&found.pv)
            .await,
    )?;
    let handle = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_default();
    if handle != found.dv {
        return fail(
            what,
            format!(
                "PV {} has volume handle {handle:?}, not the DataVolume {}",
                found.pv, found.dv
            ),
        );
    }
    steps.done_at(
        seen.at(&format!("pvc-bound/{EXAMPLE}")),
        &format!("PV {} Bound to the claim", found.pv),
        &[format!(
            "capacity {}, volumeHandle {handle} (the DataVolume's name)",
            pv.spec
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.as_str())
                .unwrap_or("-"),
        )],
    );

    let what = "VolumeAttachment attached";
    let pv_name = found.pv.clone();
    let va = at(
        what,
        wait_for(
            Api::<VolumeAttachment>::all(ctx.guest.clone()),
            ctx.timeout,
            &format!("VolumeAttachment of {pv_name} attached"),
            move |va: &VolumeAttachment| {
                va.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str())
                    && va.status.as_ref().is_some_and(|s| s.attached)
            },
        )
        .await,
    )?;
    found.attachment = va.metadata.name.clone().unwrap_or_default();
    let metadata = va
        .status
        .as_ref()
        .and_then(|s| s.attachment_metadata.clone())
        .unwrap_or_default();
    found.serial = match metadata.get("serial") {
        Some(s) => s.clone(),
        None => {
            return fail(
                what,
                format!(
                    "{} has no serial in its attachment metadata",
                    found.attachment
                ),
            );
        }
    };
    let vmis: Api<DynamicObject> = Api::namespaced_with(
        ctx.infra.clone(),
        &ctx.args.infra_namespace,
        &vmi_resource(),
    );
    let vmi = at(what, vmis.get(&ctx.args.vm).await)?;
    let volume_status = vmi.data["status"]["volumeStatus"]
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|v| v["name"].as_str() == Some(found.dv.as_str()))
        })
        .cloned();
    let Some(volume_status) = volume_status else {
        return fail(
            what,
            format!(
                "VMI {} has no volumeStatus for {} although the attachment is attached",
                ctx.args.vm, found.dv
            ),
        );
    };
    steps.done_at(
        seen.at(&format!("va-attached/{}", found.pv)),
        &format!(
            "VolumeAttachment {} attached to node {}",
            found.attachment, va.spec.node_name
        ),
        &[
            format!(
                "attachment metadata: {}",
                join_map(&metadata.into_iter().collect())
            ),
            format!(
                "infra VMI {}/{} volumeStatus {}: phase {}, target {}",
                ctx.args.infra_namespace,
                ctx.args.vm,
                found.dv,
                volume_status["phase"].as_str().unwrap_or("-"),
                volume_status["target"].as_str().unwrap_or("-"),
            ),
        ],
    );

    let what = "disk in the VM";
    found.device = at(what, wait_for_disk(ctx, &found.serial).await)?;
    let sectors = at(
        what,
        ctx.agent
            .exec_ok(["cat", &format!("/sys/block/{}/size", found.device)])
            .await,
    )?;
    let bytes = sectors.trim().parse::<u64>().unwrap_or(0) * 512;
    steps.done(
        &format!(
            "disk /dev/{} in worker VM {} has serial {}",
            found.device, ctx.args.vm, found.serial
        ),
        &[format!(
            "{} MiB, found by serial in the VM's sysfs as the node plugin does",
            bytes >> 20
        )],
    );

    let what = "filesystem mounted at kubelet's path";
    let pod = at(what, pods.get(EXAMPLE).await)?;
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let uid = pod_uid.clone();
    let event = at(
        what,
        wait_for(
            Api::<Event>::namespaced(ctx.guest.clone(), gns),
            ctx.timeout,
            &format!("{MOUNTED_REASON} event on pod {gns}/{EXAMPLE}"),
            move |e: &Event| {
                e.involved_object.uid.as_deref() == Some(uid.as_str())
                    && matches!(
                        e.reason.as_deref(),
                        Some(MOUNTED_REASON | FAILED_MOUNT_REASON)
                    )
            },
        )
        .await,
    )?;
    // The stand-in does not retry: a failure is final, and its message says why.
    if event.reason.as_deref() == Some(FAILED_MOUNT_REASON) {
        return fail(
            what,
            format!(
                "the kubelet stand-in reports {FAILED_MOUNT_REASON}: {}",
                event.message.as_deref().unwrap_or("")
            ),
        );
    }
    let target = ctx
        .args
        .kubelet_root
        .join(format!(
            "pods/{pod_uid}/volumes/kubernetes.io~csi/{}/mount",
            found.pv
        ))
        .display()
        .to_string();
    let mounts = at(
        what,
        ctx.agent.exec_ok(["cat", "/proc/self/mountinfo"]).await,
    )?;
    let mounts = parse_mountinfo(&mounts);
    let dev = format!("/dev/{}", found.device);
    let Some(published) = mounts.iter().find(|m| m.point == target) else {
        return fail(what, format!("nothing is mounted at {target} in the VM"));
    };
    if published.source != dev || published.fstype != "ext4" {
        return fail(
            what,
            format!(
                "{target} holds {} ({}), not ext4 on {dev}",
                published.source, published.fstype
            ),
        );
    }
    let staged: Vec<&str> = mounts
        .iter()
        .filter(|m| m.source == dev && m.point.ends_with("/globalmount"))
        .map(|m| m.point.as_str())
        .collect();
    if staged.len() != 1 {
        return fail(
            what,
            format!("expected one staging mount of {dev}, found {staged:?}"),
        );
    }
    found.target = target.clone();
    // What a user sees: kubectl describe shows the stand-in's event on the Pending pod.
    let described = at(what, kubectl(ctx, &["describe", "pod", EXAMPLE]).await)?;
    let Some(event_line) = described.lines().find(|l| l.contains(MOUNTED_REASON)) else {
        return fail(
            what,
            format!("kubectl describe pod {EXAMPLE} shows no {MOUNTED_REASON} event"),
        );
    };
    let event_line: String = event_line.split_whitespace().collect::<Vec<_>>().join(" ");
    let event_line = match event_line.char_indices().nth(110) {
        Some((cut, _)) => format!("{}...", &event_line[..cut]),
        None => event_line,
    };
    let mounted = at(
        what,
        wait_for(
            pods.clone(),
            ctx.timeout,
            &format!("pod condition {MOUNTED_CONDITION} True"),
            |p: &Pod| {
                p.metadata.name.as_deref() == Some(EXAMPLE)
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c.type_ == MOUNTED_CONDITION && c.status == "True")
                        })
            },
        )
        .await,
    )?;
    let phase = mounted.status.and_then(|s| s.phase).unwrap_or_default();
    steps.done_at(
        seen.at(&format!("event/{pod_uid}/{MOUNTED_REASON}")),
        &format!("ext4 on /dev/{} mounted at kubelet's path inside the VM", found.device),
        &[
            format!("staged:    {}", staged[0]),
            format!("published: {target}"),
            format!(
                "pod {gns}/{EXAMPLE} stays {phase}: no container runtime runs its container, but {} set condition {MOUNTED_CONDITION}=True and recorded:",
                event
                    .source
                    .as_ref()
                    .and_then(|s| s.component.as_deref())
                    .unwrap_or("-"),
            ),
            format!("kubectl describe pod {EXAMPLE} | grep {MOUNTED_REASON}"),
            format!("  {event_line}"),
        ],
    );

    let what = "write and read back a file";
    let file = format!("{target}/demo.txt");
    at(
        what,
        ctx.agent
            .exec_ok([
                "sh",
                "-c",
                r#"printf '%s\n' "$1" > "$2" && sync"#,
                "sh",
                PAYLOAD,
                &file,
            ])
            .await,
    )?;
    let read = at(what, ctx.agent.exec_ok(["cat", &file]).await)?;
    if read.trim_end() != PAYLOAD {
        return fail(what, format!("read back {read:?}, wrote {PAYLOAD:?}"));
    }
    let df = at(what, ctx.agent.exec_ok(["df", "-k", &target]).await)?;
    steps.done(
        "a file written and read back in the volume, through the guest agent",
        &[
            format!("kvcsi-guest-exec -- cat {file}"),
            format!("  {}", read.trim_end()),
            format!(
                "df: {}",
                df.lines()
                    .last()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ],
    );
    Ok(())
}

/// Deletes the pod and the claim, then waits for the driver to undo everything: unmount,
/// detach, the disk gone from the VM, the PV and the infra DataVolume deleted; finally
/// removes the rest of the example (StorageClass, VolumeSnapshotClass).
async fn cleanup(ctx: &Ctx, steps: &mut Steps, found: &Found) -> StepResult {
    let gns = ctx.guest_ns.as_str();
    let what = "cleanup: delete the pod and the claim";
    at(
        what,
        kubectl(
            ctx,
            &[
                "delete",
                "pod,pvc",
                EXAMPLE,
                "--ignore-not-found",
                "--wait=false",
            ],
        )
        .await,
    )?;
    let what = "cleanup: pod removed";
    at(
        what,
        wait_gone(ctx, Api::<Pod>::namespaced(ctx.guest.clone(), gns), EXAMPLE).await,
    )?;
    let mut details = Vec::new();
    if !found.target.is_empty() {
        let mounts = at(
            what,
            ctx.agent.exec_ok(["cat", "/proc/self/mountinfo"]).await,
        )?;
        if let Some(m) = parse_mountinfo(&mounts)
            .iter()
            .find(|m| m.source == format!("/dev/{}", found.device))
        {
            return fail(
                what,
                format!("/dev/{} is still mounted at {}", found.device, m.point),
            );
        }
        details.push(format!(
            "/dev/{} unmounted (unpublished and unstaged)",
            found.device
        ));
    }
    steps.done(
        &format!("cleanup: pod {gns}/{EXAMPLE} deleted by the kubelet stand-in"),
        &details,
    );
    if !found.attachment.is_empty() {
        let what = "cleanup: detach";
        at(
            what,
            wait_gone(
                ctx,
                Api::<VolumeAttachment>::all(ctx.guest.clone()),
                &found.attachment,
            )
            .await,
        )?;
        at(what, wait_for_disk_gone(ctx, &found.serial).await)?;
        steps.done(
            &format!("cleanup: VolumeAttachment {} deleted", found.attachment),
            &[format!("disk with serial {} left the VM", found.serial)],
        );
    }
    at(
        "cleanup: claim deleted",
        wait_gone(
            ctx,
            Api::<PersistentVolumeClaim>::namespaced(ctx.guest.clone(), gns),
            EXAMPLE,
        )
        .await,
    )?;
    if !found.pv.is_empty() {
        at(
            "cleanup: PV deleted",
            wait_gone(
                ctx,
                Api::<PersistentVolume>::all(ctx.guest.clone()),
                &found.pv,
            )
            .await,
        )?;
    }
    if !found.dv.is_empty() {
        at(
            "cleanup: DataVolume deleted",
            wait_gone(
                ctx,
                Api::<DynamicObject>::namespaced_with(
                    ctx.infra.clone(),
                    &ctx.args.infra_namespace,
                    &data_volume_resource(),
                ),
                &found.dv,
            )
            .await,
        )?;
    }
    let what = "cleanup: kubectl delete";
    let out = at(
        what,
        kubectl(
            ctx,
            &[
                "delete",
                "-k",
                &ctx.args.example.display().to_string(),
                "--ignore-not-found",
            ],
        )
        .await,
    )?;
    let mut details = vec![format!(
        "PV {} and infra DataVolume {} deleted",
        or_none(&found.pv),
        or_none(&found.dv)
    )];
    details.extend(out.lines().map(str::to_owned));
    steps.done(
        &format!(
            "cleanup: claim deleted; kubectl delete -k {}",
            ctx.args.example.display()
        ),
        &details,
    );
    Ok(())
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "(none)" } else { s }
}

/// Runs kubectl against the guest cluster; its stdout, or an error with its stderr.
async fn kubectl(ctx: &Ctx, args: &[&str]) -> Result<String, BoxError> {
    let mut cmd = tokio::process::Command::new(&ctx.args.kubectl);
    cmd.args(args)
        .env("KUBECONFIG", &ctx.args.guest_kubeconfig)
        .kill_on_drop(true);
    let out = tokio::time::timeout(ctx.timeout, cmd.output())
        .await
        .map_err(|_| format!("kubectl {} took over {:?}", args.join(" "), ctx.timeout))?
        .map_err(|e| format!("cannot run {}: {e}", ctx.args.kubectl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_gone<K>(ctx: &Ctx, api: Api<K>, name: &str) -> Result<(), BoxError>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + 'static,
{
    let gone = await_condition(api, name, |o: Option<&K>| o.is_none());
    match tokio::time::timeout(ctx.timeout, gone).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("watching {name}: {e}").into()),
        Err(_) => Err(format!("{name} still there after {:?}", ctx.timeout).into()),
    }
}

/// The block device whose serial is `serial`, read from the VM's sysfs: `serial` for
/// virtio, VPD page 0x80 after its 4-byte header for SCSI. Empty output: not there (yet).
const FIND_BY_SERIAL: &str = r#"for d in /sys/block/*; do
  s=""
  if [ -r "$d/serial" ]; then s="$(cat "$d/serial")"
  elif [ -r "$d/device/vpd_pg80" ]; then s="$(tail -c +5 "$d/device/vpd_pg80" | tr -d '\000' | sed 's/ *$//')"
  fi
  [ "$s" = "$1" ] && echo "${d##*/}"
done; true"#;

async fn disk_by_serial(ctx: &Ctx, serial: &str) -> Result<Option<String>, BoxError> {
    let out = ctx
        .agent
        .exec_ok(["sh", "-c", FIND_BY_SERIAL, "sh", serial])
        .await?;
    Ok(out.lines().next().map(str::to_owned))
}

/// Polls the VM (it has no watch to offer) until the disk shows up, within the step bound.
async fn wait_for_disk(ctx: &Ctx, serial: &str) -> Result<String, BoxError> {
    let deadline = Instant::now() + ctx.timeout;
    loop {
        if let Some(dev) = disk_by_serial(ctx, serial).await? {
            return Ok(dev);
        }
        if Instant::now() > deadline {
            return Err(format!("no disk with serial {serial} within {:?}", ctx.timeout).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_disk_gone(ctx: &Ctx, serial: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + ctx.timeout;
    while let Some(dev) = disk_by_serial(ctx, serial).await? {
        if Instant::now() > deadline {
            return Err(format!(
                "disk {dev} with serial {serial} still in the VM after {:?}",
                ctx.timeout
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// One line of `/proc/self/mountinfo`, the fields the demo checks.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: String,
    fstype: String,
    source: String,
}

/// Parses mountinfo: the mount point is field 5; after the ` - ` separator come the
/// filesystem type and the source. Octal escapes (`\040` for a space) are decoded.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            Some(Mount {
                point: unescape(point),
                fstype: right.next()?.to_string(),
                source: unescape(right.next()?),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, b| v.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A byte count the controller wrote as plain digits, in binary units where it divides evenly.
fn quantity(q: &str) -> String {
    match q.parse::<u64>() {
        Ok(b) if b > 0 && b % (1 << 30) == 0 => format!("{}Gi", b >> 30),
        Ok(b) if b > 0 && b % (1 << 20) == 0 => format!("{}Mi", b >> 20),
        _ => q.to_string(),
    }
}

fn join_map(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_in_binary_units() {
        assert_eq!(quantity("1073741824"), "1Gi");
        assert_eq!(quantity("67108864"), "64Mi");
        assert_eq!(quantity("1000"), "1000");
        assert_eq!(quantity("1Gi"), "1Gi");
    }

    #[test]
    fn mountinfo_lines_give_point_type_and_source() {
        let text = "36 25 8:16 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.kubevirt.io/ab/globalmount rw,relatime shared:1 - ext4 /dev/sdb rw\n\
                    37 25 8:16 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv\\0401/mount rw - ext4 /dev/sdb rw\n\
                    garbage\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![
                Mount {
                    point:
                        "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.kubevirt.io/ab/globalmount"
                            .into(),
                    fstype: "ext4".into(),
                    source: "/dev/sdb".into(),
                },
                Mount {
                    point: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv 1/mount".into(),
                    fstype: "ext4".into(),
                    source: "/dev/sdb".into(),
                },
            ]
        );
    }
}
