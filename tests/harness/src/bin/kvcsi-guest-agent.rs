//! Runs inside the worker VM (it is the host's binary, seen through the 9p root) and executes
//! commands for the host: one JSON request per TCP connection, one JSON answer back.
//!
//! Deliberately plain std threads: this is the guest's only long-lived process besides what it
//! starts, and it must keep answering while a foreground command (mkfs on an emulated CPU) runs.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use kubevirt_csi_harness::vm::agent::{ExecRequest, ExecResponse, SPAWN_FAILED_CODE};

/// Guest agent of the kubevirt-csi worker VM harness.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7100")]
    listen: String,
    /// Directory for background commands' default log files.
    #[arg(long, default_value = "/run/kvcsi-agent")]
    log_dir: PathBuf,
}

/// A PATH for commands when neither the request nor the agent's environment sets a useful one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static BACKGROUND_SEQ: AtomicU64 = AtomicU64::new(0);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("kvcsi-guest-agent: listening on {}", args.listen);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kvcsi-guest-agent: accept failed: {e}");
                continue;
            }
        };
        let log_dir = args.log_dir.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, &log_dir) {
                eprintln!("kvcsi-guest-agent: connection failed: {e}");
            }
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, log_dir: &Path) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let response = match serde_json::from_str::<ExecRequest>(&line) {
        Ok(request) if request.argv.is_empty() => failure(2, "bad request: empty argv".into()),
        Ok(request) if request.background => background(&request, log_dir),
        Ok(request) => foreground(&request),
        Err(e) => failure(2, format!("bad request: {e}")),
    };
    let mut answer = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    answer.push(b'\n');
    (&stream).write_all(&answer)?;
    stream.shutdown(std::net::Shutdown::Both)
}

fn failure(code: i32, stderr: String) -> ExecResponse {
    ExecResponse {
        code,
        stderr,
        ..ExecResponse::default()
    }
}

fn command(request: &ExecRequest) -> Command {
    let mut command = Command::new(&request.argv[0]);
    command.args(&request.argv[1..]);
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    command.envs(&request.env);
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    command
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn foreground(request: &ExecRequest) -> ExecResponse {
    let mut command = command(request);
    command
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return failure(SPAWN_FAILED_CODE, format!("{}: {e}", request.argv[0])),
    };
    // Feed stdin from another thread so a command that writes a lot before reading cannot
    // deadlock against us.
    let feeder = match (child.stdin.take(), request.stdin.clone()) {
        (Some(mut pipe), Some(input)) => Some(std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        })),
        _ => None,
    };
    let output = child.wait_with_output();
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    match output {
        Ok(out) => ExecResponse {
            code: exit_code(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            ..ExecResponse::default()
        },
        Err(e) => failure(
            SPAWN_FAILED_CODE,
            format!("waiting for {}: {e}", request.argv[0]),
        ),
    }
}

fn background(request: &ExecRequest, log_dir: &Path) -> ExecResponse {
    let log = match &request.log {
        Some(path) => PathBuf::from(path),
        None => {
            let n = BACKGROUND_SEQ.fetch_add(1, Ordering::Relaxed);
            let name = Path::new(&request.argv[0])
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "cmd".into());
            log_dir.join(format!("{n}-{name}.log"))
        }
    };
    let files = log
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| File::create(&log))
        .and_then(|out| Ok((out.try_clone()?, out)));
    let (stdout, stderr) = match files {
        Ok(f) => f,
        Err(e) => {
            return failure(
                SPAWN_FAILED_CODE,
                format!("log file {}: {e}", log.display()),
            );
        }
    };
    let mut command = command(request);
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    match command.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            // Reap it when it exits, so it never lingers as a zombie.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            ExecResponse {
                code: 0,
                pid: Some(pid),
                log: Some(log.display().to_string()),
                ..ExecResponse::default()
            }
        }
        Err(e) => failure(SPAWN_FAILED_CODE, format!("{}: {e}", request.argv[0])),
    }
}
