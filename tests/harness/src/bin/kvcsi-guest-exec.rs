//! Runs a command inside a worker VM through its guest agent and exits with the command's code,
//! so tools that expect a local command (csi-sanity's `-csi.createmountpathcmd` and friends) can
//! act in the guest's mount namespace.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use kubevirt_csi_harness::vm::agent::{AgentClient, ExecRequest};

/// Run a command in the kubevirt-csi worker VM.
#[derive(Parser)]
struct Args {
    /// Host address of the guest agent (the forwarded port).
    #[arg(long, env = "KVCSI_GUEST_AGENT")]
    addr: SocketAddr,
    /// Forward this process's stdin to the command.
    #[arg(long)]
    stdin: bool,
    /// Start the command in the background and print its pid and log file.
    #[arg(long)]
    background: bool,
    /// Log file (guest path) for a background command.
    #[arg(long, requires = "background")]
    log: Option<String>,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("kvcsi-guest-exec: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            // Distinct from any code a command is likely to return.
            ExitCode::from(255)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut request = ExecRequest::new(args.argv);
    request.cwd = args.cwd;
    if args.stdin {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        request.stdin = Some(input);
    }
    if args.background {
        request = request.in_background(args.log);
    }
    let client =
        AgentClient::new(args.addr).with_timeout(std::time::Duration::from_secs(args.timeout));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime.block_on(client.request(&request))?;
    std::io::stdout().write_all(response.stdout.as_bytes())?;
    std::io::stderr().write_all(response.stderr.as_bytes())?;
    if let (Some(pid), Some(log)) = (response.pid, &response.log) {
        println!("pid {pid} log {log}");
    }
    // Exit codes outside 0..=255 (the agent's -1 for "unknown") become 255.
    Ok(ExitCode::from(u8::try_from(response.code).unwrap_or(255)))
}
