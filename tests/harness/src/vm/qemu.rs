//! The QEMU process: its command line, its scratch directory, and making sure it dies.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use super::disk::{SCSI_CONTROLLER, root_port_id};

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Pure emulation: slow but works everywhere, including under KVM-PVM hosts where a stock
    /// kernel hangs.
    #[default]
    Tcg,
    /// Hardware virtualisation; only sensible where a probe boot succeeded.
    Kvm,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Everything that goes on QEMU's command line.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub work_dir: PathBuf,
    pub shared_dir: Option<PathBuf>,
    /// (host port, guest port) pairs forwarded from 127.0.0.1.
    pub forwards: Vec<(u16, u16)>,
    pub root_ports: usize,
    /// Extra `kvcsi.*` (and other) kernel parameters.
    pub kernel_params: Vec<String>,
    /// Boot straight into the init's probe mode with no devices but the console.
    pub probe: bool,
}

impl Launch {
    pub fn console_log(&self) -> PathBuf {
        self.work_dir.join("console.log")
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.work_dir.join("qemu.log")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.work_dir.join("qmp.sock")
    }

    /// A second QMP monitor, for a client outside the harness (the stand-in's QEMU
    /// backend): one QMP socket serves one client at a time.
    pub fn external_qmp_socket(&self) -> PathBuf {
        self.work_dir.join("qmp-external.sock")
    }

    /// QEMU's arguments (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        let cpu = match self.accel {
            // qemu64 is the cheapest model to emulate; host binaries only assume baseline x86-64.
            Accel::Tcg => "qemu64",
            Accel::Kvm => "host",
        };
        push(&["-machine", "q35", "-accel", self.accel.name(), "-cpu", cpu]);
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&["-serial", &format!("file:{}", self.console_log().display())]);
        push(&["-kernel", &self.kernel.display().to_string()]);
        push(&["-initrd", &self.initrd.display().to_string()]);
        let mut cmdline = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".to_owned(),
            "mitigations=off".to_owned(),
        ];
        if self.probe {
            cmdline.push("kvcsi.probe=1".to_owned());
        }
        cmdline.extend(self.kernel_params.iter().cloned());
        push(&["-append", &cmdline.join(" ")]);
        if self.probe {
            return args;
        }

        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
        ]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                self.external_qmp_socket().display()
            ),
        ]);
        push(&[
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ]);
        if let Some(shared) = &self.shared_dir {
            push(&[
                "-virtfs",
                &format!(
                    "local,path={},mount_tag=shared,security_model=none,multidevs=remap",
                    shared.display()
                ),
            ]);
        }
        let mut netdev = "user,id=net0".to_owned();
        for (host, guest) in &self.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"]);
        push(&["-device", &format!("virtio-scsi-pci,id={SCSI_CONTROLLER}")]);
        for n in 0..self.root_ports {
            push(&[
                "-device",
                &format!("pcie-root-port,id={},chassis={}", root_port_id(n), n + 1),
            ]);
        }
        args
    }
}

/// A running QEMU. Dropping it kills QEMU and waits for it, so no test leaves one behind.
#[derive(Debug)]
pub(crate) struct QemuProcess {
    child: Child,
}

impl QemuProcess {
    /// Starts QEMU with its stdout and stderr in `launch.qemu_log()`. Where util-linux's
    /// `setpriv` exists, QEMU also gets a parent-death signal, so even a test process killed
    /// with SIGKILL (which runs no destructors) takes its VMs with it.
    pub fn spawn(launch: &Launch) -> std::io::Result<Self> {
        let log = File::create(launch.qemu_log())?;
        let log_err = log.try_clone()?;
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut command = if setpriv.exists() {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
            c
        } else {
            Command::new("qemu-system-x86_64")
        };
        command
            .args(launch.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        Ok(Self {
            child: command.spawn()?,
        })
    }

    /// The exit status if QEMU has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Pid of QEMU (or of setpriv, which execs QEMU in place).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills QEMU and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None))
            && let Err(e) = self.child.kill()
        {
            tracing::warn!(error = %e, pid = self.child.id(), "could not kill qemu");
        }
        let _ = self.child.wait();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free on 127.0.0.1 a moment ago. Another process can take it before QEMU
/// binds it; boot retries with fresh ports when QEMU reports that.
pub(crate) fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The last `lines` lines of a log file (lossy UTF-8), for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return format!("<{} unreadable>", path.display());
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            work_dir: "/w".into(),
            shared_dir: Some("/s".into()),
            forwards: vec![(40000, 7100), (40001, 9000)],
            root_ports: 2,
            kernel_params: vec!["kvcsi.port=7100".into()],
            probe: false,
        }
    }

    fn joined(l: &Launch) -> String {
        l.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_the_devices_hotplug_needs() {
        let args = joined(&launch());
        assert!(args.contains("-accel tcg"), "{args}");
        assert!(args.contains("virtio-scsi-pci,id=scsi0"), "{args}");
        assert!(args.contains("pcie-root-port,id=hp0,chassis=1"), "{args}");
        assert!(args.contains("pcie-root-port,id=hp1,chassis=2"), "{args}");
        assert!(
            args.contains("hostfwd=tcp:127.0.0.1:40000-:7100,hostfwd=tcp:127.0.0.1:40001-:9000"),
            "{args}"
        );
        assert!(
            args.contains("-qmp unix:/w/qmp.sock,server=on,wait=off"),
            "{args}"
        );
        assert!(args.contains("path=/s,mount_tag=shared"), "{args}");
        assert!(args.contains("kvcsi.port=7100"), "{args}");
    }

    #[test]
    fn probe_boot_has_no_devices() {
        let mut l = launch();
        l.probe = true;
        l.accel = Accel::Kvm;
        let args = joined(&l);
        assert!(
            args.contains("kvcsi.probe=1") && args.contains("-accel kvm"),
            "{args}"
        );
        assert!(
            !args.contains("-device") && !args.contains("-qmp"),
            "{args}"
        );
    }
}
