//! Property-based fuzzing of every CSI RPC against the real plugin processes.
//!
//! The controller runs against a real kube-apiserver with the upstream CRDs, the
//! KubeVirt/CDI stand-in and only the shipped infra Role; the node plugin runs as the
//! binary on this host against a kubelet root in a scratch directory, with one real loop
//! disk in its fixture sysfs, in a mount namespace of its own (so a wrong unmount cannot
//! reach the host's mounts, and what it mounts goes away with it).
//!
//! Requests come from proptest strategies ([`fuzz_support::hostile`]): hostile ids, aliases of
//! real volume and snapshot names, sizes, capabilities, parameter maps and paths. Every
//! answer is judged against the CSI spec's table for its RPC; INTERNAL, UNKNOWN, a hang, a
//! closed connection, a process exit or resident-set growth fail the test, and so does any
//! change to an infra object the driver did not create (or a volume the fuzz only ever
//! addressed through aliases), or to a mount the node plugin did not make.
//!
//! `KVCSI_FUZZ_CASES` (default 20000) sets the number of requests, `KVCSI_FUZZ_SEED` the
//! seed (printed; default fixed), `KVCSI_FUZZ_CONCURRENCY` the requests in flight (32) and
//! `KVCSI_FUZZ_ONLY` a comma-separated subset of RPCs, `KVCSI_FUZZ_TRACE` RPCs whose every
//! answer is printed. The plugin binaries are the ones in the target directory: build them
//! first (`cargo build --bins`). Every failure class is shrunk by proptest against the live
//! processes and printed with its minimal request and its case number.

mod fuzz_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::v1 as csi;
use csi_proto::v1::controller_client::ControllerClient;
use futures::StreamExt;
use fuzz_support::hostile::{MIB, NodePools, Pools, strategies};
use fuzz_support::{Call, Clients, Finding, Outcome, Unadvertised, judge, send};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use kubevirt_csi_harness::cluster::{ControlPlane, ControlPlaneOptions};
use kubevirt_csi_harness::csi::{ControllerOptions, ControllerPlugin, connect_unix};
use kubevirt_csi_harness::fixtures::{
    self, TenantFixture, data_volume_resource, vm_resource, vmi_resource,
};
use kubevirt_csi_harness::process::{ManagedProcess, ScratchDir};
use kubevirt_csi_harness::standin::{Standin, StandinOptions};
use kubevirt_csi_harness::tools::workspace_bin;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tonic::transport::Channel;

const DEFAULT_CASES: u64 = 20_000;
const DEFAULT_SEED: u64 = 0x6b76_6373_695f_6675;
/// Requests in flight at once: enough to keep both plugins and the apiserver busy on two
/// cores, and to make requests on the same volume race (ABORTED is a valid answer).
const CONCURRENCY: usize = 32;
fn concurrency() -> usize {
    usize::try_from(env_u64("KVCSI_FUZZ_CONCURRENCY", CONCURRENCY as u64))
        .unwrap_or(CONCURRENCY)
        .max(1)
}

/// Longer than every wait the plugins are configured with here (create/delete/expand/
/// snapshot 8 s, attach/detach 12 s), so a request still open at this point would never
/// have been answered.
const DEADLINE: Duration = Duration::from_secs(40);
/// Resident-set growth allowed between the end of the warm-up (the first quarter of the
/// requests) and the end. After the warm-up every request shape, including the 256 KiB
/// maps and 64 KiB ids at full concurrency, has been seen, so the allocators' high-water
/// mark is set; what remains is malloc arena fragmentation, which on glibc moves by a few
/// MiB between samples with 32 requests in flight. A leak of 1 KiB per request over the
/// remaining 15,000 requests (15 MiB) exceeds both limits.
const CONTROLLER_RSS_SLACK_KIB: u64 = 8 * 1024;
/// The node plugin serves on one thread with a small blocking pool: less fragmentation.
const NODE_RSS_SLACK_KIB: u64 = 4 * 1024;
/// Shrinking steps per failure class, each a request against the live processes.
const SHRINK_STEPS: usize = 48;
/// Time spent shrinking one class: a candidate can take as long as the plugin's longest
/// wait, and shrinking only improves the report.
const SHRINK_BUDGET: Duration = Duration::from_secs(20);
/// Time spent shrinking all classes; the classes left are reported unshrunk.
const SHRINK_TOTAL: Duration = Duration::from_secs(90);

const TENANT_NS: &str = "tenant-f";
const NODE_ID: &str = "tenant-f/worker-0";

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
        }
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------
// Infra side: apiserver, stand-in, controller, real and foreign objects.

fn cap(block: bool, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume::default())
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

async fn create_volume(
    c: &mut ControllerClient<Channel>,
    name: &str,
    block: bool,
    mode: Mode,
) -> String {
    c.create_volume(csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 10 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(block, mode)],
        parameters: HashMap::from([("infraStorageClassName".into(), "fast".into())]),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("bed: create volume {name}: {e}"))
    .into_inner()
    .volume
    .expect("volume in reply")
    .volume_id
}

async fn create_snapshot(c: &mut ControllerClient<Channel>, name: &str, source: &str) -> String {
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("bed: create snapshot {name}: {e}"))
    .into_inner()
    .snapshot
    .expect("snapshot in reply")
    .snapshot_id
}

fn volume_snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

fn pvc_resource() -> ApiResource {
    ApiResource::erase::<PersistentVolumeClaim>(&())
}

async fn create_object(client: &kube::Client, ar: &ApiResource, value: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(value).expect("static object");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), TENANT_NS, ar);
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("bed: create {} {:?}: {e}", ar.kind, obj.metadata.name));
}

/// Objects in the tenant namespace that the driver did not create, shaped to tempt it:
/// a DataVolume with the tenant labels and the driver's prefix but no marker, a worker's
/// root disk with the tenant labels, another tenant's DataVolume in the same namespace,
/// unlabelled claims (one under a driver-shaped name), and snapshots it did not take.
async fn foreign_objects(client: &kube::Client, labels: &BTreeMap<String, String>) -> Vec<String> {
    let dv = |name: &str, labels: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": TENANT_NS, "labels": labels},
            "spec": {"source": {"blank": {}}, "storage": {
                "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                "storageClassName": "fast",
                "resources": {"requests": {"storage": "10Mi"}}}}
        })
    };
    let tenant = serde_json::to_value(labels).expect("labels");
    let dvs = data_volume_resource();
    create_object(client, &dvs, dv("kvcsi-foreign-aaaaaaaaaa", tenant.clone())).await;
    create_object(client, &dvs, dv("worker-0-rootdisk", tenant.clone())).await;
    create_object(
        client,
        &dvs,
        dv(
            "kvcsi-other-tenant-bbbbbbbbbb",
            serde_json::json!({"cluster": "other"}),
        ),
    )
    .await;
    let pvc = |name: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": TENANT_NS},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                "resources": {"requests": {"storage": "10Mi"}}}
        })
    };
    create_object(client, &pvc_resource(), pvc("foreign-pvc")).await;
    create_object(client, &pvc_resource(), pvc("kvcsi-squat-cccccccccc")).await;
    let snap = |name: &str, labels: serde_json::Value, claim: &str| {
        serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": TENANT_NS, "labels": labels},
            "spec": {"source": {"persistentVolumeClaimName": claim},
                "volumeSnapshotClassName": "fast-snap"}
        })
    };
    create_object(
        client,
        &volume_snapshot_resource(),
        snap("foreign-snap", serde_json::json!({}), "foreign-pvc"),
    )
    .await;
    create_object(
        client,
        &volume_snapshot_resource(),
        snap(
            "kvcsi-foreign-snap-dddddddddd",
            tenant,
            "kvcsi-foreign-aaaaaaaaaa",
        ),
    )
    .await;
    [
        "kvcsi-foreign-aaaaaaaaaa",
        "worker-0-rootdisk",
        "kvcsi-other-tenant-bbbbbbbbbb",
        "foreign-pvc",
        "kvcsi-squat-cccccccccc",
        "foreign-snap",
        "kvcsi-foreign-snap-dddddddddd",
        "worker-0",
        "worker-x",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What must not change: identity, spec, labels.
#[derive(Clone, Debug, PartialEq)]
struct Fingerprint {
    uid: String,
    spec: serde_json::Value,
    labels: BTreeMap<String, String>,
    deleting: bool,
}

type Inventory = BTreeMap<(String, String), Fingerprint>;

async fn inventory(client: &kube::Client) -> Inventory {
    let mut out = Inventory::new();
    for ar in [
        data_volume_resource(),
        pvc_resource(),
        volume_snapshot_resource(),
        vm_resource(),
        vmi_resource(),
    ] {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), TENANT_NS, &ar);
        for o in api.list(&Default::default()).await.expect("list").items {
            out.insert(
                (ar.kind.clone(), o.metadata.name.clone().unwrap_or_default()),
                Fingerprint {
                    uid: o.metadata.uid.clone().unwrap_or_default(),
                    spec: spec_of(&ar, &o),
                    labels: o.metadata.labels.clone().unwrap_or_default(),
                    deleting: o.metadata.deletion_timestamp.is_some(),
                },
            );
        }
    }
    out
}

/// The spec as far as the driver could change it. A claim's `volumeName` is set once, by
/// the provisioner binding it (the stand-in, asynchronously), never by the driver.
fn spec_of(ar: &ApiResource, o: &DynamicObject) -> serde_json::Value {
    let mut spec = o.data["spec"].clone();
    if ar.kind == "PersistentVolumeClaim"
        && let Some(m) = spec.as_object_mut()
    {
        m.remove("volumeName");
    }
    spec
}

/// The non-hotplugged part of a VM or VMI spec: KubeVirt's own volumes and disks.
fn fixed_part(spec: &serde_json::Value, hotplugged: &BTreeSet<String>) -> serde_json::Value {
    let mut spec = spec.clone();
    let keep = |arr: &mut serde_json::Value| {
        if let Some(a) = arr.as_array_mut() {
            a.retain(|v| !hotplugged.contains(v["name"].as_str().unwrap_or_default()));
        }
    };
    let inner = if spec.get("template").is_some() {
        &mut spec["template"]["spec"]
    } else {
        &mut spec
    };
    keep(&mut inner["volumes"]);
    keep(&mut inner["domain"]["devices"]["disks"]);
    spec
}

fn hotplugged_names(spec: &serde_json::Value) -> BTreeSet<String> {
    let inner = if spec.get("template").is_some() {
        &spec["template"]["spec"]
    } else {
        spec
    };
    inner["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| {
                    v["dataVolume"]["hotpluggable"] == true
                        || v["persistentVolumeClaim"]["hotpluggable"] == true
                })
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The claim a VM volume is backed by.
fn claims_of(spec: &serde_json::Value) -> Vec<(String, String)> {
    let inner = if spec.get("template").is_some() {
        &spec["template"]["spec"]
    } else {
        spec
    };
    inner["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    let claim = v["dataVolume"]["name"]
                        .as_str()
                        .or(v["persistentVolumeClaim"]["claimName"].as_str())?;
                    Some((v["name"].as_str()?.to_owned(), claim.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compares the namespace after the fuzz with before: protected objects unchanged, the
/// tenant's worker changed only in hotplugged volumes (the attached anchor still there, no
/// second disk backed by one claim), and nothing new without the tenant's labels.
fn infra_problems(
    before: &Inventory,
    after: &Inventory,
    protected: &BTreeSet<String>,
    tenant_labels: &BTreeMap<String, String>,
    attached_anchor: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for ((kind, name), fp) in before {
        if !protected.contains(name) {
            continue;
        }
        let Some(now) = after.get(&(kind.clone(), name.clone())) else {
            problems.push(format!("{kind} {name} was deleted"));
            continue;
        };
        if now.uid != fp.uid {
            problems.push(format!("{kind} {name} was replaced (uid changed)"));
        }
        if now.deleting {
            problems.push(format!("{kind} {name} is being deleted"));
        }
        if now.labels != fp.labels {
            problems.push(format!(
                "{kind} {name} labels changed: {:?} -> {:?}",
                fp.labels, now.labels
            ));
        }
        let tenant_worker =
            name == "worker-0" && (kind == "VirtualMachine" || kind == "VirtualMachineInstance");
        if tenant_worker {
            let hot: BTreeSet<String> = hotplugged_names(&fp.spec)
                .union(&hotplugged_names(&now.spec))
                .cloned()
                .collect();
            if fixed_part(&fp.spec, &hot) != fixed_part(&now.spec, &hot) {
                problems.push(format!(
                    "{kind} {name}: a volume or disk that is not hotplugged changed: {} -> {}",
                    fixed_part(&fp.spec, &hot),
                    fixed_part(&now.spec, &hot)
                ));
            }
            if kind == "VirtualMachine" {
                let claims = claims_of(&now.spec);
                if !claims.iter().any(|(n, _)| n == attached_anchor) {
                    problems.push(format!(
                        "VirtualMachine worker-0 lost the attached anchor {attached_anchor} (only ever addressed through aliases)"
                    ));
                }
                let mut by_claim: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for (n, c) in &claims {
                    by_claim.entry(c).or_default().push(n);
                }
                for (c, names) in by_claim {
                    if names.len() > 1 {
                        problems.push(format!(
                            "VirtualMachine worker-0 has {} volumes backed by claim {c}: {names:?}",
                            names.len()
                        ));
                    }
                }
            }
        } else if now.spec != fp.spec {
            problems.push(format!(
                "{kind} {name} spec changed: {} -> {}",
                fold(&fp.spec.to_string()),
                fold(&now.spec.to_string())
            ));
        }
    }
    for ((kind, name), fp) in after {
        if before.contains_key(&(kind.clone(), name.clone())) || kind == "PersistentVolumeClaim" {
            continue;
        }
        let labelled = tenant_labels
            .iter()
            .all(|(k, v)| fp.labels.get(k) == Some(v));
        if !labelled || !name.starts_with("kvcsi-") {
            problems.push(format!(
                "new {kind} {name} lacks the tenant labels or the driver's prefix: {:?}",
                fp.labels
            ));
        }
    }
    problems
}

fn fold(s: &str) -> String {
    let s = fuzz_support::fold_runs(s);
    if s.chars().count() > 600 {
        format!("{}…", s.chars().take(600).collect::<String>())
    } else {
        s
    }
}

struct InfraBed {
    client: kube::Client,
    plugin: ControllerPlugin,
    tenant: TenantFixture,
    protected: BTreeSet<String>,
    attached_anchor: String,
    before: Inventory,
    // Dropped last: the processes the controller talks to.
    _standin: Standin,
    _cp: ControlPlane,
}

async fn infra_bed() -> (InfraBed, Pools) {
    let t = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    kubevirt_csi_harness::crds::install(&client)
        .await
        .expect("crds");
    fixtures::infra_storage_classes(&client)
        .await
        .expect("storage classes");
    let standin = Standin::start(&cp, StandinOptions::default())
        .await
        .expect("stand-in");
    let tenant = fixtures::tenant(&cp, TENANT_NS, &[("cluster", "f")], None)
        .await
        .expect("tenant");
    fixtures::worker_vm(&client, &tenant, "worker-0", None)
        .await
        .expect("worker-0");
    // A VM in the tenant's namespace that is not the tenant's worker.
    let mut other = tenant.clone();
    other.labels = BTreeMap::from([("cluster".into(), "other".into())]);
    fixtures::worker_vm(&client, &other, "worker-x", None)
        .await
        .expect("worker-x");
    let plugin = ControllerPlugin::start(ControllerOptions {
        infra_kubeconfig: tenant.controller_kubeconfig.clone(),
        namespace: tenant.namespace.clone(),
        tenant_labels: tenant.label_args(),
        config_yaml: Some("storageClassEnforcement:\n  allowList: [fast, slow]\n  allowDefault: true\nsnapshotClasses:\n- infraStorageClass: fast\n  infraSnapshotClass: fast-snap\n".into()),
        extra_args: vec![],
    })
    .await
    .expect("controller starts");
    let mut c = plugin.controller();

    let single = Mode::SingleNodeWriter;
    let live0 = create_volume(&mut c, "live-0", false, single).await;
    let live1 = create_volume(&mut c, "live-1", true, Mode::MultiNodeMultiWriter).await;
    let anchor_attached = create_volume(&mut c, "anchor-attached", false, single).await;
    let anchor_detached = create_volume(&mut c, "anchor-detached", false, single).await;
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: anchor_attached.clone(),
        node_id: NODE_ID.into(),
        volume_capability: Some(cap(false, single)),
        ..Default::default()
    })
    .await
    .expect("bed: publish the attached anchor");
    let snap_live = create_snapshot(&mut c, "snap-live", &live0).await;
    let snap_anchor = create_snapshot(&mut c, "snap-anchor", &anchor_detached).await;
    let foreign = foreign_objects(&client, &tenant.labels).await;

    let mut protected: BTreeSet<String> = foreign.iter().cloned().collect();
    protected.extend([
        anchor_attached.clone(),
        anchor_detached.clone(),
        snap_anchor.clone(),
    ]);
    let before = inventory(&client).await;
    eprintln!("infra bed up in {:?}", t.elapsed());

    let pools = Pools {
        // The ids the controller derives for the names CreateVolume is fuzzed with, so the
        // volumes the fuzz creates are published, expanded and deleted too.
        volumes: [live0, live1]
            .into_iter()
            .chain((0..6).map(|i| {
                kubevirt_csi_controller::names::infra_name("kvcsi-", &format!("fuzz-{i}"))
            }))
            .collect(),
        anchor_volumes: vec![anchor_attached.clone(), anchor_detached],
        foreign_names: foreign,
        snapshots: vec![snap_live],
        anchor_snapshots: vec![snap_anchor],
        create_names: (0..6)
            .map(|i| format!("fuzz-{i}"))
            .chain([
                "live-0".into(),
                "anchor-detached".into(),
                "snap-live".into(),
            ])
            .collect(),
        node_ids: vec![
            NODE_ID.into(),
            "tenant-f/worker-x".into(),
            "tenant-f/worker-9".into(),
            "tenant-g/worker-0".into(),
            "default/worker-0".into(),
        ],
        node: NodePools {
            paths: vec![],
            kubelet: String::new(),
            volume_ids: vec![],
            serial: String::new(),
        },
    };
    (
        InfraBed {
            client,
            plugin,
            tenant,
            protected,
            attached_anchor: anchor_attached,
            before,
            _standin: standin,
            _cp: cp,
        },
        pools,
    )
}

// ---------------------------------------------------------------------------------------
// Node side: kubelet root, fixture sysfs with a real loop disk, foreign mounts, and the
// plugin binary in a mount namespace of its own.

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("bed: {tool} is required: {e}"));
    assert!(
        out.status.success(),
        "bed: {tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loop device over a sparse file; detached on drop.
struct Loop(String);

impl Loop {
    fn new(backing: &Path, size: u64) -> Self {
        std::fs::File::create(backing)
            .and_then(|f| f.set_len(size))
            .expect("bed: backing file");
        Loop(run(
            "losetup",
            &["--find", "--show", backing.to_str().expect("utf-8")],
        ))
    }

    fn name(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Mounts the test made itself (in its own namespace); detached on drop.
struct OwnMounts(Vec<PathBuf>);

impl Drop for OwnMounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

struct NodeBed {
    process: ManagedProcess,
    channel: Channel,
    /// Mount points the plugin did not make and must leave alone.
    foreign_mounts: Vec<PathBuf>,
    /// Files and directories outside the kubelet root that must survive.
    victims: Vec<PathBuf>,
    /// A directory outside the kubelet root that symlinks under it point into, and what it
    /// held before the fuzz.
    outside: PathBuf,
    outside_before: BTreeSet<PathBuf>,
    kubelet: PathBuf,
    // Drop order: plugin (its namespace and mounts go), then our mounts, loops, directory.
    _mounts: OwnMounts,
    _loops: Vec<Loop>,
    _dir: ScratchDir,
}

const SERIAL: &str = "kvfuzzdisk0000000001";

async fn node_bed() -> (NodeBed, NodePools) {
    let dir = ScratchDir::new("fuzz-node").expect("scratch");
    let root = std::fs::canonicalize(dir.path()).expect("canonical");
    let kubelet = root.join("kubelet");
    let sysfs = root.join("sys");
    let outside = root.join("outside");
    let cwd = root.join("cwd");
    for d in [&kubelet, &sysfs.join("block"), &outside, &cwd] {
        std::fs::create_dir_all(d).expect("bed dirs");
    }
    let victim_file = outside.join("victim-file");
    let victim_dir = outside.join("victim-dir");
    std::fs::write(&victim_file, b"keep").expect("victim");
    std::fs::create_dir_all(&victim_dir).expect("victim dir");

    // The one disk the node can find: a blank loop device under SERIAL (virtio-style).
    let disk = Loop::new(&root.join("disk.img"), 64 << 20);
    let devno = std::fs::read_to_string(format!("/sys/class/block/{}/dev", disk.name()))
        .expect("loop devno");
    let block = sysfs.join("block").join(disk.name());
    std::fs::create_dir_all(&block).expect("fixture disk");
    std::fs::write(block.join("dev"), devno).expect("dev");
    std::fs::write(block.join("size"), format!("{}\n", (64u64 << 20) / 512)).expect("size");
    std::fs::write(block.join("serial"), SERIAL).expect("serial");

    // Foreign mounts under the kubelet root: an ext4 filesystem and a tmpfs, each where a
    // publish target would be.
    let foreign_disk = Loop::new(&root.join("foreign.img"), 32 << 20);
    run("mkfs.ext4", &["-q", "-F", &foreign_disk.0]);
    let foreign_ext4 = kubelet.join("pods/foreign-ext4/volumes/mount");
    let foreign_tmpfs = kubelet.join("pods/foreign-tmpfs/volumes/mount");
    std::fs::create_dir_all(&foreign_ext4).expect("mkdir");
    std::fs::create_dir_all(&foreign_tmpfs).expect("mkdir");
    let mut mounts = OwnMounts(Vec::new());
    mount(
        Some(foreign_disk.0.as_str()),
        &foreign_ext4,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("bed: mount the foreign ext4");
    mounts.0.push(foreign_ext4.clone());
    mount(
        Some("tmpfs"),
        &foreign_tmpfs,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("bed: mount the foreign tmpfs");
    mounts.0.push(foreign_tmpfs.clone());

    // Staging and target paths as kubelet lays them out, plus traps.
    let mut paths = Vec::new();
    for i in 0..3 {
        let staging = kubelet.join(format!(
            "plugins/kubernetes.io/csi/csi.kubevirt.io/s{i}/globalmount"
        ));
        std::fs::create_dir_all(&staging).expect("staging");
        paths.push(staging);
        let parent = kubelet.join(format!("pods/p{i}/volumes/kubernetes.io~csi/pv{i}"));
        std::fs::create_dir_all(&parent).expect("target parent");
        paths.push(parent.join("mount"));
        let dev_parent = kubelet.join(format!(
            "plugins/kubernetes.io/csi/volumeDevices/publish/pv{i}"
        ));
        std::fs::create_dir_all(&dev_parent).expect("device parent");
        paths.push(dev_parent.join("pod"));
    }
    // A staging directory with a FIFO where a staged block record would be.
    let fifo_dir = kubelet.join("plugins/kubernetes.io/csi/csi.kubevirt.io/fifo/globalmount");
    std::fs::create_dir_all(&fifo_dir).expect("fifo dir");
    nix::unistd::mkfifo(
        &fifo_dir.join("kubevirt-csi-block.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    paths.push(fifo_dir);
    // A staging directory whose record is a symlink out of the volume.
    let link_dir = kubelet.join("plugins/kubernetes.io/csi/csi.kubevirt.io/link/globalmount");
    std::fs::create_dir_all(&link_dir).expect("link dir");
    symlink(&victim_file, link_dir.join("kubevirt-csi-block.json")).expect("symlink");
    paths.push(link_dir);
    let file = kubelet.join("a-file");
    std::fs::write(&file, b"x").expect("file");
    paths.push(file);
    for (name, to) in [
        ("link-dangling", root.join("nowhere")),
        ("link-out", outside.clone()),
        ("link-victim", victim_dir.clone()),
        ("link-in", paths[0].clone()),
        ("link-loop", kubelet.join("link-loop")),
    ] {
        symlink(&to, kubelet.join(name)).expect("symlink");
        paths.push(kubelet.join(name));
    }
    paths.push(foreign_ext4.clone());
    paths.push(foreign_tmpfs.clone());
    paths.push(outside.join("victim-dir"));
    paths.push(kubelet.join("pods/never-made/volumes/mount"));

    let socket = root.join("plugin/csi.sock");
    let bin = workspace_bin("kubevirt-csi-node").expect("node binary");
    let unshare = ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("bed: unshare (util-linux) is required");
    let args: Vec<String> = [
        "--mount",
        "--propagation",
        "private",
        "--",
        bin.to_str().expect("utf-8"),
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--node-id",
        NODE_ID,
        "--kubelet-root",
        kubelet.to_str().expect("utf-8"),
        "--sysfs-root",
        sysfs.to_str().expect("utf-8"),
        "--bus",
        "virtio",
        // Unknown serials answer at once instead of after a wait: the fuzz sends many.
        "--discovery-timeout-secs",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut process = ManagedProcess::spawn_with(
        "kubevirt-csi-node",
        Path::new(unshare),
        &args,
        &root.join("node.log"),
        |c| {
            c.current_dir(&cwd).env(
                "RUST_LOG",
                std::env::var("KVCSI_LOG").unwrap_or_else(|_| "warn".into()),
            );
        },
    )
    .expect("start node plugin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let channel = loop {
        process.check_running().expect("node plugin running");
        if socket.exists()
            && let Ok(ch) = connect_unix(&socket).await
        {
            break ch;
        }
        assert!(Instant::now() < deadline, "node plugin never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = |p: &PathBuf| p.to_str().expect("utf-8").to_owned();
    let pools = NodePools {
        paths: paths.iter().map(s).collect(),
        kubelet: s(&kubelet),
        volume_ids: vec![
            "vol-0".into(),
            "vol-1".into(),
            "kvcsi-live-0-aaaaaaaaaa".into(),
        ],
        serial: SERIAL.into(),
    };
    (
        NodeBed {
            process,
            channel,
            foreign_mounts: vec![foreign_ext4, foreign_tmpfs],
            victims: vec![victim_file, victim_dir],
            outside_before: tree(&outside),
            outside: outside.clone(),
            kubelet: kubelet.clone(),
            _mounts: mounts,
            _loops: vec![disk, foreign_disk],
            _dir: dir,
        },
        pools,
    )
}

// ---------------------------------------------------------------------------------------
// Processes.

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Still running (not exited, not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Samples the node plugin's mount table while the fuzz runs and keeps every new mount
/// point outside the kubelet root: a mount made through a symlink that climbs out may be
/// undone by a later request before the end of the run.
struct MountWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<PathBuf>>,
}

impl MountWatch {
    fn start(pid: u32, before: BTreeSet<PathBuf>, kubelet: PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut escaped = BTreeSet::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for m in mount_points(pid).difference(&before) {
                    if !m.starts_with(&kubelet) {
                        escaped.insert(m.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            escaped
        });
        MountWatch { stop, thread }
    }

    fn stop(self) -> BTreeSet<PathBuf> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("mount watch")
    }
}

/// Every path below `dir` (not following symlinks).
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

fn mount_points(pid: u32) -> BTreeSet<PathBuf> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The run.

/// The proptest runner for one case: its own seed, so any case can be regenerated (and
/// shrunk) alone.
fn runner(seed: u64, case: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&case.to_le_bytes());
    bytes[16..].copy_from_slice(b"kubevirt-csi-fuz");
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

type Strategies = Vec<(&'static str, u32, BoxedStrategy<Call>)>;

/// Case `case`'s RPC and its value tree.
fn generate(
    strategies: &Strategies,
    seed: u64,
    case: u64,
) -> (usize, Box<dyn ValueTree<Value = Call>>) {
    let total: u32 = strategies.iter().map(|s| s.1).sum();
    let mut r = runner(seed, case);
    let mut pick = (0..total).new_tree(&mut r).expect("pick").current();
    let mut idx = 0;
    for (i, (_, w, _)) in strategies.iter().enumerate() {
        if pick < *w {
            idx = i;
            break;
        }
        pick -= w;
    }
    let tree = strategies[idx].2.new_tree(&mut r).expect("generate");
    (idx, Box::new(tree))
}

type Example = (u64, Finding, String);

#[derive(Default)]
struct Tally {
    /// rpc → outcome label → count.
    counts: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// class → how often, and examples (case, finding, request): the first two seen and the
    /// three shortest.
    findings: BTreeMap<String, (u64, Vec<Example>)>,
    sent: u64,
}

impl Tally {
    fn record(&mut self, case: u64, call: &Call, outcome: &Outcome, finding: Option<Finding>) {
        self.sent += 1;
        *self
            .counts
            .entry(call.rpc())
            .or_default()
            .entry(outcome.label())
            .or_default() += 1;
        if let Some(f) = finding {
            let e = self.findings.entry(f.class.clone()).or_default();
            e.0 += 1;
            e.1.push((case, f, call.describe()));
            if e.1.len() > 5 {
                // Keep the first two; of the rest, the three shortest.
                e.1[2..].sort_by_key(|x| x.2.len());
                e.1.truncate(5);
            }
        }
    }
}

async fn run_cases(
    clients: &Clients,
    strategies: &Strategies,
    unadvertised: &Unadvertised,
    seed: u64,
    cases: std::ops::Range<u64>,
    tally: &mut Tally,
) {
    // `KVCSI_FUZZ_TRACE=RpcA,RpcB` prints every answer of those RPCs.
    let trace_env = std::env::var("KVCSI_FUZZ_TRACE").unwrap_or_default();
    let trace: BTreeSet<&str> = trace_env.split(',').map(str::trim).collect();
    let mut results = futures::stream::iter(cases)
        .map(|case| {
            let (_, tree) = generate(strategies, seed, case);
            let call = tree.current();
            drop(tree);
            let clients = clients.clone();
            async move {
                let outcome = send(&clients, call.clone(), DEADLINE).await;
                (case, call, outcome)
            }
        })
        .buffer_unordered(concurrency());
    while let Some((case, call, outcome)) = results.next().await {
        let finding = judge(&call, &outcome, unadvertised);
        if trace.contains(call.rpc()) {
            let message = match &outcome {
                Outcome::Err { message, .. } => message.as_str(),
                _ => "",
            };
            eprintln!(
                "trace {case} {} {}: {}",
                call.rpc(),
                outcome.label(),
                fold(message)
            );
        }
        tally.record(case, &call, &outcome, finding);
    }
}

/// What shrinking a failure class found.
enum Shrunk {
    /// Sent alone, the request fails the same way; here is the simplest variant found.
    Alone(Box<Call>, Finding),
    /// Sent alone, it does not: it failed as collateral of another request (one that broke
    /// the shared connection, or held the volume's lock).
    NotAlone(Outcome),
}

/// proptest's shrinking loop, with each candidate sent to the live processes, alone:
/// simplify while the request still fails in the same class. Bounded by steps and by
/// `budget`, since a candidate can take as long as the plugin's longest wait.
async fn shrink(
    clients: &Clients,
    strategies: &Strategies,
    unadvertised: &Unadvertised,
    seed: u64,
    case: u64,
    class: &str,
    budget: Duration,
) -> Shrunk {
    let started = Instant::now();
    let (_, mut tree) = generate(strategies, seed, case);
    let original = tree.current();
    let outcome = send(clients, original.clone(), DEADLINE).await;
    let Some(first) = judge(&original, &outcome, unadvertised).filter(|f| f.class == class) else {
        return Shrunk::NotAlone(outcome);
    };
    let mut best = (original, first);
    if !tree.simplify() {
        return Shrunk::Alone(Box::new(best.0), best.1);
    }
    for _ in 0..SHRINK_STEPS {
        if started.elapsed() > budget {
            break;
        }
        let call = tree.current();
        let outcome = send(clients, call.clone(), DEADLINE).await;
        let same = judge(&call, &outcome, unadvertised).filter(|f| f.class == class);
        if let Some(f) = same {
            best = (call, f);
            if !tree.simplify() {
                break;
            }
        } else if !tree.complicate() {
            break;
        }
    }
    Shrunk::Alone(Box::new(best.0), best.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_hostile_input_within_the_spec() {
    let cases = env_u64("KVCSI_FUZZ_CASES", DEFAULT_CASES);
    let seed = env_u64("KVCSI_FUZZ_SEED", DEFAULT_SEED);
    eprintln!("fuzz: {cases} requests, seed {seed:#x} (KVCSI_FUZZ_SEED / KVCSI_FUZZ_CASES)");

    let (infra, mut pools) = infra_bed().await;
    let (node, node_pools) = node_bed().await;
    pools.node = node_pools;
    let clients = Clients {
        controller: infra.plugin.controller(),
        controller_identity: infra.plugin.identity(),
        node: kubevirt_csi_harness::csi::node_client(node.channel.clone()),
        node_identity: csi_proto::v1::identity_client::IdentityClient::new(node.channel.clone()),
    };
    let unadvertised = unadvertised(&clients).await;
    eprintln!(
        "fuzz: not advertised (UNIMPLEMENTED allowed): {:?}",
        unadvertised.0
    );
    let mut strategies = strategies(&pools);
    // `KVCSI_FUZZ_ONLY=RpcA,RpcB` narrows the mix, to reproduce or bisect one finding.
    if let Ok(only) = std::env::var("KVCSI_FUZZ_ONLY") {
        let only: BTreeSet<&str> = only.split(',').map(str::trim).collect();
        strategies.retain(|(name, _, _)| only.contains(name));
        assert!(!strategies.is_empty(), "KVCSI_FUZZ_ONLY names no RPC");
        eprintln!("fuzz: only {only:?}");
    }
    let controller_pid = infra.plugin.pid().expect("controller pid");
    let node_pid = node.process.pid().expect("node pid");
    let mounts_before = mount_points(node_pid);
    let escapes = MountWatch::start(node_pid, mounts_before.clone(), node.kubelet.clone());

    let t = Instant::now();
    let mut tally = Tally::default();
    // Eight slices; after each, the volumes and snapshots the fuzz created are removed and
    // the resident sets sampled. The first two slices are the warm-up.
    let mut samples = Vec::new();
    for slice in 0..8 {
        let range = cases * slice / 8..cases * (slice + 1) / 8;
        run_cases(
            &clients,
            &strategies,
            &unadvertised,
            seed,
            range,
            &mut tally,
        )
        .await;
        sweep(&infra, &clients).await;
        samples.push((rss_kib(controller_pid), rss_kib(node_pid)));
    }
    eprintln!("fuzz: VmRSS KiB (controller, node) after each eighth: {samples:?}");
    let rss_warm = samples[1];
    let rss_end = (rss_kib(controller_pid), rss_kib(node_pid));
    eprintln!(
        "fuzz: {} requests in {:?}; VmRSS controller {} -> {} KiB, node {} -> {} KiB",
        tally.sent,
        t.elapsed(),
        rss_warm.0,
        rss_end.0,
        rss_warm.1,
        rss_end.1
    );

    let mut problems: Vec<String> = Vec::new();
    for (pid, name, slack, (a, b)) in [
        (
            controller_pid,
            "controller",
            CONTROLLER_RSS_SLACK_KIB,
            (rss_warm.0, rss_end.0),
        ),
        (
            node_pid,
            "node",
            NODE_RSS_SLACK_KIB,
            (rss_warm.1, rss_end.1),
        ),
    ] {
        if !alive(pid) {
            problems.push(format!(
                "the {name} plugin (pid {pid}) exited during the fuzz"
            ));
        } else if b > a + slack {
            problems.push(format!(
                "the {name} plugin's VmRSS grew from {a} KiB to {b} KiB after the warm-up (allowed: {slack} KiB)"
            ));
        }
    }
    if !alive(node_pid) {
        eprintln!("node log tail:\n{}", node.process.log_tail(40));
    }

    // Per-RPC counts by answer.
    let mut table = String::from("fuzz: answers per RPC\n");
    for (rpc, by) in &tally.counts {
        let total: u64 = by.values().sum();
        let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
        table.push_str(&format!("  {rpc:<30} {total:>5}: {}\n", parts.join(", ")));
    }
    eprintln!("{table}");

    // Shrink each failure class against the live processes.
    let mut report = Vec::new();
    // A wait that ran out of time while 32 requests loaded the apiserver and the stand-in,
    // and that does not when the request is sent alone, is the plugin's bounded wait doing
    // its job (the CO retries DEADLINE_EXCEEDED); it is printed, not failed. The same answer
    // when the request is sent alone fails.
    let mut under_load = Vec::new();
    let shrinking = Instant::now();
    for (class, (count, examples)) in &tally.findings {
        // Shortest first; the first example that fails the same way when sent alone is
        // shrunk and reported. A class none of whose examples reproduces alone failed only
        // as collateral of concurrent requests.
        let mut examples = examples.clone();
        examples.sort_by_key(|x| x.2.len());
        let mut found = None;
        let mut alone_answers = Vec::new();
        let in_budget = shrinking.elapsed() < SHRINK_TOTAL;
        if in_budget && !class.ends_with("(hang)") {
            for (case, finding, request) in &examples {
                match shrink(
                    &clients,
                    &strategies,
                    &unadvertised,
                    seed,
                    *case,
                    class,
                    SHRINK_BUDGET,
                )
                .await
                {
                    Shrunk::Alone(call, f) => {
                        let (req, detail, note) = if call.describe().len() <= request.len() {
                            (call.describe(), f.detail, "shrunk, reproduces alone")
                        } else {
                            (request.clone(), finding.detail.clone(), "reproduces alone")
                        };
                        found = Some((*case, req, detail, note));
                        break;
                    }
                    Shrunk::NotAlone(o) => alone_answers.push(o.label()),
                }
            }
        }
        let (case, req, detail, note) = found.unwrap_or_else(|| {
            let (case, finding, request) = &examples[0];
            let note = if class.ends_with("(hang)") {
                "not shrunk"
            } else if !in_budget {
                "not shrunk: the time for shrinking is spent"
            } else {
                "did NOT reproduce alone: collateral of concurrent requests"
            };
            let detail = if alone_answers.is_empty() {
                finding.detail.clone()
            } else {
                format!("{} (alone: {})", finding.detail, alone_answers.join(", "))
            };
            (*case, request.clone(), detail, note)
        });
        let line = format!(
            "{class} ×{count} (case {case}; {note}):\n    request: {}\n    answer:  {}",
            fold(&req),
            fold(&detail)
        );
        if class.ends_with(": DEADLINE_EXCEEDED") && note.starts_with("did NOT") {
            under_load.push(line);
        } else {
            report.push(line);
        }
    }
    if !under_load.is_empty() {
        eprintln!(
            "fuzz: waits that timed out only under load (not failures):\n{}",
            under_load.join("\n")
        );
    }

    // Infra: protected objects unchanged, nothing foreign made.
    let after = inventory(&infra.client).await;
    problems.extend(infra_problems(
        &infra.before,
        &after,
        &infra.protected,
        &infra.tenant.labels,
        &infra.attached_anchor,
    ));
    // Node: foreign mounts still there, no new mount outside the kubelet root, victims
    // outside the kubelet root untouched.
    if alive(node_pid) {
        let mounted = mount_points(node_pid);
        for m in escapes.stop() {
            problems.push(format!(
                "the node plugin mounted something at {} (outside the kubelet root)",
                m.display()
            ));
        }
        for m in &node.foreign_mounts {
            if !mounted.contains(m) {
                problems.push(format!(
                    "the node plugin unmounted {} (a mount it did not make)",
                    m.display()
                ));
            }
        }
    }
    for v in &node.victims {
        if !v.exists() {
            problems.push(format!("{} outside the kubelet root is gone", v.display()));
        }
    }
    if std::fs::read(&node.victims[0]).ok().as_deref() != Some(b"keep".as_slice()) {
        problems.push(format!("{} was overwritten", node.victims[0].display()));
    }
    let outside_after = tree(&node.outside);
    for p in outside_after.symmetric_difference(&node.outside_before) {
        let what = if outside_after.contains(p) {
            "created"
        } else {
            "removed"
        };
        problems.push(format!(
            "the node plugin {what} {} (outside the kubelet root, reached through a symlink)",
            p.display()
        ));
    }

    if !report.is_empty() {
        eprintln!(
            "fuzz: {} answer classes outside the spec's tables:\n{}",
            report.len(),
            report.join("\n")
        );
    }
    if !problems.is_empty() {
        eprintln!("fuzz: other problems:\n  {}", problems.join("\n  "));
    }
    if !alive(controller_pid) {
        eprintln!("controller log tail:\n{}", infra.plugin.log_tail(40));
    }
    assert!(
        report.is_empty() && problems.is_empty(),
        "{} answer classes outside the spec and {} other problems (seed {seed:#x}, {cases} requests); see above",
        report.len(),
        problems.len()
    );
}

/// Removes, through the CSI API, the volumes and snapshots the fuzz created (any valid CSI
/// name creates one). Without this the namespace grows by hundreds of volumes per 10,000
/// requests, every ListVolumes reads each of them, and the plugin's resident set tracks
/// the size of those listings rather than leaks.
async fn sweep(infra: &InfraBed, clients: &Clients) {
    let known = |kind: &str, name: &str| {
        infra
            .before
            .contains_key(&(kind.to_owned(), name.to_owned()))
    };
    let names = |ar: ApiResource| async move {
        let api: Api<DynamicObject> = Api::namespaced_with(infra.client.clone(), TENANT_NS, &ar);
        api.list(&Default::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect::<Vec<_>>()
    };
    let snapshots: Vec<String> = names(volume_snapshot_resource())
        .await
        .into_iter()
        .filter(|n| !known("VolumeSnapshot", n))
        .collect();
    futures::stream::iter(snapshots)
        .for_each_concurrent(8, |snapshot_id| async move {
            let call = Call::DeleteSnapshot(csi::DeleteSnapshotRequest {
                snapshot_id,
                ..Default::default()
            });
            send(clients, call, DEADLINE).await;
        })
        .await;
    let volumes: Vec<String> = names(data_volume_resource())
        .await
        .into_iter()
        .filter(|n| !known("DataVolume", n))
        .collect();
    futures::stream::iter(volumes)
        .for_each_concurrent(8, |volume_id| async move {
            let unpublish =
                Call::ControllerUnpublishVolume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: NODE_ID.into(),
                    ..Default::default()
                });
            send(clients, unpublish, DEADLINE).await;
            let delete = Call::DeleteVolume(csi::DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            });
            send(clients, delete, DEADLINE).await;
        })
        .await;
}

/// The optional RPCs each plugin does not advertise.
async fn unadvertised(c: &Clients) -> Unadvertised {
    use csi::controller_service_capability::rpc::Type as C;
    use csi::node_service_capability::rpc::Type as N;
    let ctrl: BTreeSet<i32> = c
        .controller
        .clone()
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .expect("ControllerGetCapabilities")
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|cap| match cap.r#type? {
            csi::controller_service_capability::Type::Rpc(r) => Some(r.r#type),
        })
        .collect();
    let node: BTreeSet<i32> = c
        .node
        .clone()
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities")
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|cap| match cap.r#type? {
            csi::node_service_capability::Type::Rpc(r) => Some(r.r#type),
        })
        .collect();
    let mut out = BTreeSet::new();
    for (rpc, cap) in [
        ("CreateVolume", C::CreateDeleteVolume),
        ("DeleteVolume", C::CreateDeleteVolume),
        ("ControllerPublishVolume", C::PublishUnpublishVolume),
        ("ControllerUnpublishVolume", C::PublishUnpublishVolume),
        ("ListVolumes", C::ListVolumes),
        ("GetCapacity", C::GetCapacity),
        ("CreateSnapshot", C::CreateDeleteSnapshot),
        ("DeleteSnapshot", C::CreateDeleteSnapshot),
        ("ListSnapshots", C::ListSnapshots),
        ("GetSnapshot", C::GetSnapshot),
        ("ControllerExpandVolume", C::ExpandVolume),
        ("ControllerGetVolume", C::GetVolume),
        ("ControllerModifyVolume", C::ModifyVolume),
    ] {
        if !ctrl.contains(&(cap as i32)) {
            out.insert(rpc);
        }
    }
    for (rpc, cap) in [
        ("NodeStageVolume", N::StageUnstageVolume),
        ("NodeUnstageVolume", N::StageUnstageVolume),
        ("NodeGetVolumeStats", N::GetVolumeStats),
        ("NodeExpandVolume", N::ExpandVolume),
    ] {
        if !node.contains(&(cap as i32)) {
            out.insert(rpc);
        }
    }
    Unadvertised(out)
}
