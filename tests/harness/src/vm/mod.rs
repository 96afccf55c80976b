//! A real worker VM: QEMU running a Debian kernel whose userland is the host's own root (read-only
//! over 9p), with disks hotplugged over QMP the way KubeVirt hotplugs volumes into a worker node.
//!
//! The guest runs `kvcsi-guest-agent` (the host's binary, seen through 9p), which the host drives
//! over a forwarded TCP port; the node plugin runs inside the guest the same way, and its gRPC
//! port is forwarded too. See `hack/guest.sh` for the kernel and init.

pub mod agent;
pub mod disk;
pub mod image;
pub mod qemu;
pub mod qmp;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use agent::{AgentClient, AgentError, Background, ExecRequest, ExecResponse};
pub use disk::{DiskBus, DiskError, DiskSpec};
pub use image::{GuestImage, ImageError};
pub use qemu::Accel;
pub use qmp::{Qmp, QmpError, QmpEvent};

use agent::AGENT_GUEST_PORT;
use disk::DiskSlots;
use qemu::{Launch, QemuProcess, free_port, tail};

/// How many console lines an error carries.
const CONSOLE_TAIL_LINES: usize = 60;

/// How a worker VM is booted.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Host path of `kvcsi-guest-agent` (tests: `env!("CARGO_BIN_EXE_kvcsi-guest-agent")`).
    pub agent_binary: PathBuf,
    /// Kernel and initramfs; `None` runs [`GuestImage::locate`].
    pub image: Option<GuestImage>,
    /// Host directory exported read-write and mounted at the same path in the guest, so paths
    /// under it mean the same on both sides (csi-sanity's mount and staging dirs).
    pub shared_dir: Option<PathBuf>,
    /// Guest TCP ports to forward from fresh ports on the host's 127.0.0.1.
    pub forwarded_ports: Vec<u16>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Empty PCIe root ports, i.e. how many virtio disks can be attached at once.
    pub hotplug_slots: usize,
    /// Accelerator; TCG unless [`probe_kvm`] says KVM works.
    pub accel: Accel,
    /// Host directories the guest's tmpfs mounts (`/tmp`, `/run`, ...) would hide, to bind back
    /// in read-only. The agent binary's directory is always added.
    pub host_paths: Vec<PathBuf>,
    /// Writable tmpfs directory in the guest for kubelet-like state.
    pub kubelet_dir: PathBuf,
    /// Bound on boot, from starting QEMU to the agent's first answer.
    pub boot_timeout: Duration,
    /// Bound on the guest releasing an unplugged disk.
    pub unplug_timeout: Duration,
}

impl VmOptions {
    /// Defaults: 1 GiB, 1 vCPU, 4 hotplug slots, TCG, no shared dir, no extra ports.
    pub fn new(agent_binary: impl Into<PathBuf>) -> Self {
        Self {
            agent_binary: agent_binary.into(),
            image: None,
            shared_dir: None,
            forwarded_ports: Vec::new(),
            memory_mib: 1024,
            cpus: 1,
            hotplug_slots: 4,
            accel: Accel::Tcg,
            host_paths: Vec::new(),
            kubelet_dir: PathBuf::from("/var/lib/kubelet"),
            boot_timeout: Duration::from_secs(120),
            unplug_timeout: Duration::from_secs(60),
        }
    }
}

/// Failures booting or driving a worker VM. Boot failures carry the console's last lines.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The kernel/initramfs could not be located or built.
    #[error("cannot locate the guest image")]
    Image(#[from] ImageError),
    /// An option cannot be expressed on QEMU's or the kernel's command line.
    #[error("invalid vm option {what} {value:?}: {reason}")]
    InvalidOption {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    /// Scratch directory, port or process setup failed on the host.
    #[error("cannot {what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited while booting.
    #[error("qemu exited during boot ({status}); qemu said:\n{qemu_log}\nconsole tail:\n{console}")]
    QemuExited {
        status: std::process::ExitStatus,
        qemu_log: String,
        console: String,
    },
    /// The agent did not answer within the boot timeout.
    #[error(
        "the guest agent did not answer within {timeout:?} (last error: {last_error}); console tail:\n{console}"
    )]
    BootTimeout {
        timeout: Duration,
        last_error: String,
        console: String,
    },
    /// QMP failed.
    #[error("qmp failed; console tail:\n{console}")]
    Qmp {
        #[source]
        source: QmpError,
        console: String,
    },
    /// Talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A hotplug or unplug failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A disk did not appear in (or leave) the guest in time.
    #[error("disk with serial {serial} did not {what} the guest within {timeout:?}")]
    DiskWait {
        serial: String,
        what: &'static str,
        timeout: Duration,
    },
}

/// A booted worker VM. Dropping it kills QEMU and removes its scratch directory.
#[derive(Debug)]
pub struct WorkerVm {
    // Field order matters for Drop: QMP and QEMU go before the directory their sockets live in.
    qmp: Qmp,
    disks: tokio::sync::Mutex<DiskSlots>,
    agent: AgentClient,
    ports: BTreeMap<u16, u16>,
    boot_duration: Duration,
    unplug_timeout: Duration,
    launch: Launch,
    qemu: Mutex<QemuProcess>,
    work_dir: TempDir,
}

fn check_cmdline_path(what: &'static str, path: &Path) -> Result<String, VmError> {
    let s = path.to_str().ok_or_else(|| VmError::InvalidOption {
        what,
        value: path.display().to_string(),
        reason: "not utf-8",
    })?;
    if !path.is_absolute() {
        return Err(VmError::InvalidOption {
            what,
            value: s.to_owned(),
            reason: "must be absolute",
        });
    }
    if s.contains(|c: char| c.is_whitespace() || c == ',' || c == '"') {
        return Err(VmError::InvalidOption {
            what,
            value: s.to_owned(),
            reason: "kernel and qemu command lines cannot carry whitespace, commas or quotes",
        });
    }
    Ok(s.to_owned())
}

impl WorkerVm {
    /// Boots a VM and waits until its agent answers.
    pub async fn boot(options: VmOptions) -> Result<Self, VmError> {
        let image = match options.image.clone() {
            Some(image) => image,
            None => tokio::task::spawn_blocking(GuestImage::locate)
                .await
                .map_err(|e| VmError::Host {
                    what: "locate the guest image",
                    source: std::io::Error::other(e),
                })??,
        };
        let agent = check_cmdline_path("agent_binary", &options.agent_binary)?;
        if !options.agent_binary.is_file() {
            return Err(VmError::InvalidOption {
                what: "agent_binary",
                value: agent,
                reason: "does not exist (build the kvcsi-guest-agent binary first)",
            });
        }
        let mut params = vec![
            format!("kvcsi.agent={agent}"),
            format!("kvcsi.port={AGENT_GUEST_PORT}"),
            format!(
                "kvcsi.kubelet={}",
                check_cmdline_path("kubelet_dir", &options.kubelet_dir)?
            ),
        ];
        let mut pass = Vec::new();
        if let Some(dir) = options.agent_binary.parent() {
            pass.push(check_cmdline_path("agent_binary", dir)?);
        }
        for path in &options.host_paths {
            pass.push(check_cmdline_path("host_paths", path)?);
        }
        params.push(format!("kvcsi.pass={}", pass.join(",")));
        if let Some(shared) = &options.shared_dir {
            params.push(format!(
                "kvcsi.shared={}",
                check_cmdline_path("shared_dir", shared)?
            ));
        }
        for (what, path) in [("kernel", &image.kernel), ("initrd", &image.initrd)] {
            check_cmdline_path(what, path)?;
        }

        let work_dir = tempfile::Builder::new()
            .prefix("kvcsi-vm-")
            .tempdir()
            .map_err(|source| VmError::Host {
                what: "create the vm scratch directory",
                source,
            })?;

        // Ports picked here can be taken before QEMU binds them; retry with fresh ones then.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut forwards = Vec::new();
            for guest in
                std::iter::once(AGENT_GUEST_PORT).chain(options.forwarded_ports.iter().copied())
            {
                let host = free_port().map_err(|source| VmError::Host {
                    what: "pick a free host port",
                    source,
                })?;
                forwards.push((host, guest));
            }
            let launch = Launch {
                kernel: image.kernel.clone(),
                initrd: image.initrd.clone(),
                accel: options.accel,
                memory_mib: options.memory_mib,
                cpus: options.cpus,
                work_dir: work_dir.path().to_owned(),
                shared_dir: options.shared_dir.clone(),
                forwards,
                root_ports: options.hotplug_slots,
                kernel_params: params.clone(),
                probe: false,
            };
            match Self::start(launch, &options).await {
                Err(VmError::QemuExited { qemu_log, .. })
                    if attempt < 4 && qemu_log.contains("host forwarding rule") =>
                {
                    tracing::info!(
                        attempt,
                        "a forwarded port was taken; retrying with fresh ports"
                    );
                }
                Err(e) => return Err(e),
                Ok((qemu, qmp, agent, ports, launch, boot_duration)) => {
                    tracing::info!(?boot_duration, ?ports, "worker vm booted");
                    return Ok(Self {
                        qmp,
                        disks: tokio::sync::Mutex::new(DiskSlots::new(options.hotplug_slots)),
                        agent,
                        ports,
                        boot_duration,
                        unplug_timeout: options.unplug_timeout,
                        launch,
                        qemu: Mutex::new(qemu),
                        work_dir,
                    });
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn start(
        launch: Launch,
        options: &VmOptions,
    ) -> Result<
        (
            QemuProcess,
            Qmp,
            AgentClient,
            BTreeMap<u16, u16>,
            Launch,
            Duration,
        ),
        VmError,
    > {
        let started = Instant::now();
        let mut qemu = QemuProcess::spawn(&launch).map_err(|source| VmError::Host {
            what: "start qemu-system-x86_64 (is qemu-system-x86 installed?)",
            source,
        })?;
        let exited = |qemu: &mut QemuProcess| -> Option<VmError> {
            match qemu.try_wait() {
                Ok(Some(status)) => Some(VmError::QemuExited {
                    status,
                    qemu_log: tail(&launch.qemu_log(), 30),
                    console: tail(&launch.console_log(), CONSOLE_TAIL_LINES),
                }),
                _ => None,
            }
        };

        let qmp = loop {
            match Qmp::connect(&launch.qmp_socket(), Duration::from_millis(500)).await {
                Ok(qmp) => break qmp,
                Err(source) => {
                    if let Some(e) = exited(&mut qemu) {
                        return Err(e);
                    }
                    if started.elapsed() > options.boot_timeout {
                        return Err(VmError::Qmp {
                            source,
                            console: tail(&launch.console_log(), CONSOLE_TAIL_LINES),
                        });
                    }
                }
            }
        };

        let ports: BTreeMap<u16, u16> = launch.forwards.iter().map(|&(h, g)| (g, h)).collect();
        let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[&AGENT_GUEST_PORT]));
        let probe = AgentClient::new(agent_addr).with_timeout(Duration::from_secs(5));
        let mut last_error: String;
        loop {
            match probe.exec(["true"]).await {
                Ok(r) if r.success() => break,
                Ok(r) => last_error = format!("`true` exited with {}: {}", r.code, r.stderr),
                Err(e) => last_error = e.to_string(),
            }
            if let Some(e) = exited(&mut qemu) {
                return Err(e);
            }
            if started.elapsed() > options.boot_timeout {
                return Err(VmError::BootTimeout {
                    timeout: options.boot_timeout,
                    last_error,
                    console: tail(&launch.console_log(), CONSOLE_TAIL_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let boot_duration = started.elapsed();
        Ok((
            qemu,
            qmp,
            AgentClient::new(agent_addr),
            ports,
            launch,
            boot_duration,
        ))
    }

    /// The agent client (clone it to drive the guest from other tasks).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Host address of the guest agent, for `kvcsi-guest-exec --addr`.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent.addr()
    }

    /// Runs a command in the guest; any exit code is an `Ok` answer.
    pub async fn exec<I, S>(&self, argv: I) -> Result<ExecResponse, VmError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(self.agent.exec(argv).await?)
    }

    /// Runs a command in the guest and returns its stdout; a non-zero exit is an error.
    pub async fn exec_ok<I, S>(&self, argv: I) -> Result<String, VmError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(self.agent.exec_ok(argv).await?)
    }

    /// Starts a long-running command in the guest (e.g. the node plugin).
    pub async fn spawn_background<I, S>(
        &self,
        argv: I,
        log: Option<&str>,
    ) -> Result<Background, VmError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(self.agent.spawn_background(argv, log).await?)
    }

    /// Host port on 127.0.0.1 that forwards to `guest_port`, if it was asked for.
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.ports.get(&guest_port).copied()
    }

    /// Every forward, guest port to host port (the agent's included).
    pub fn forwarded_ports(&self) -> &BTreeMap<u16, u16> {
        &self.ports
    }

    /// A QMP socket left free for another client (the stand-in attaches disks through it).
    pub fn external_qmp_socket(&self) -> PathBuf {
        self.work_dir.path().join("qmp-external.sock")
    }

    /// The QMP session, for commands this module does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Hotplugs a disk. Returns once QEMU accepted it; the guest sees it a moment later
    /// ([`Self::wait_for_disk`]).
    pub async fn hotplug_disk(&self, spec: &DiskSpec) -> Result<(), VmError> {
        Ok(self.disks.lock().await.attach(&self.qmp, spec).await?)
    }

    /// Unplugs a disk and waits until QEMU reports the guest released it.
    pub async fn unplug_disk(&self, id: &str) -> Result<(), VmError> {
        Ok(self
            .disks
            .lock()
            .await
            .detach(&self.qmp, id, self.unplug_timeout)
            .await?)
    }

    /// The block device (`vdb`, `sda`, ...) whose serial is exactly `serial`, read from sysfs
    /// the way the node plugin does: `/sys/block/X/serial` for virtio, VPD page 0x80 (after its
    /// 4-byte header) for SCSI.
    pub async fn find_disk_by_serial(&self, serial: &str) -> Result<Option<String>, VmError> {
        const SCRIPT: &str = r#"for d in /sys/block/*; do
  s=""
  if [ -r "$d/serial" ]; then s="$(cat "$d/serial")"
  elif [ -r "$d/device/vpd_pg80" ]; then s="$(tail -c +5 "$d/device/vpd_pg80" | tr -d '\000' | sed 's/ *$//')"
  fi
  [ "$s" = "$1" ] && echo "${d##*/}"
done; true"#;
        let out = self.exec_ok(["sh", "-c", SCRIPT, "sh", serial]).await?;
        Ok(out.lines().next().map(str::to_owned))
    }

    /// Polls until a disk with `serial` shows up in the guest; returns its device name.
    pub async fn wait_for_disk(&self, serial: &str, timeout: Duration) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(dev) = self.find_disk_by_serial(serial).await? {
                return Ok(dev);
            }
            if Instant::now() > deadline {
                return Err(VmError::DiskWait {
                    serial: serial.to_owned(),
                    what: "appear in",
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until no disk with `serial` is left in the guest.
    pub async fn wait_for_disk_gone(&self, serial: &str, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        while self.find_disk_by_serial(serial).await?.is_some() {
            if Instant::now() > deadline {
                return Err(VmError::DiskWait {
                    serial: serial.to_owned(),
                    what: "leave",
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The serial console so far (kernel log and init messages).
    pub fn console_log(&self) -> String {
        std::fs::read(self.launch.console_log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the console, for assertion messages.
    pub fn console_tail(&self) -> String {
        tail(&self.launch.console_log(), CONSOLE_TAIL_LINES)
    }

    /// Time from starting QEMU to the agent's first answer.
    pub fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    /// Scratch directory holding the QMP socket, `console.log` and `qemu.log`.
    pub fn work_dir(&self) -> &Path {
        self.work_dir.path()
    }

    /// Pid of the QEMU process (for diagnostics).
    pub fn qemu_pid(&self) -> u32 {
        lock(&self.qemu).id()
    }

    /// Stops the VM: QMP `quit`, a bounded wait for QEMU to exit, then SIGKILL if needed.
    pub async fn shutdown(self) -> Result<(), VmError> {
        // Flush anything written to the shared dir before the guest disappears.
        let _ = self
            .agent
            .clone()
            .with_timeout(Duration::from_secs(10))
            .exec(["sync"])
            .await;
        let quit = self.qmp.execute("quit", None).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(lock(&self.qemu).try_wait(), Ok(None)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lock(&self.qemu).kill();
        match quit {
            // QEMU may close the socket before its reply to `quit` gets through.
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(source) => Err(VmError::Qmp {
                source,
                console: tail(&self.launch.console_log(), CONSOLE_TAIL_LINES),
            }),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether KVM can run the guest here: boots the kernel with `-accel kvm` into the init's probe
/// mode and looks for its "probe ok". Stock kernels hang under KVM-PVM hosts, so callers should
/// only pick [`Accel::Kvm`] when this says yes.
pub async fn probe_kvm(image: &GuestImage, timeout: Duration) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(dir) = tempfile::Builder::new()
        .prefix("kvcsi-kvm-probe-")
        .tempdir()
    else {
        return false;
    };
    let launch = Launch {
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        accel: Accel::Kvm,
        memory_mib: 512,
        cpus: 1,
        work_dir: dir.path().to_owned(),
        shared_dir: None,
        forwards: Vec::new(),
        root_ports: 0,
        kernel_params: Vec::new(),
        probe: true,
    };
    let Ok(mut qemu) = QemuProcess::spawn(&launch) else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(launch.console_log())
            .is_ok_and(|c| c.contains("kvcsi-init: probe ok"))
        {
            return true;
        }
        if !matches!(qemu.try_wait(), Ok(None)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    qemu.kill();
    std::fs::read_to_string(launch.console_log()).is_ok_and(|c| c.contains("kvcsi-init: probe ok"))
}
