//! Wire protocol of the guest agent and the host-side client that speaks it.
//!
//! One JSON request per TCP connection, written as a single line; the agent answers with one
//! JSON line and closes. Keeping it one-shot means a client never has to frame a stream, and a
//! half-dead guest shows up as a connection that closes without an answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Exit code the agent reports when the command could not be started at all, as a shell does.
pub const SPAWN_FAILED_CODE: i32 = 127;

/// Port the agent listens on inside the guest; the host reaches it through a `hostfwd`.
pub const AGENT_GUEST_PORT: u16 = 7100;

/// A command for the agent to run inside the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up on the guest's `PATH`.
    pub argv: Vec<String>,
    /// Bytes written to the command's stdin (stdin is `/dev/null` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Start the command and answer at once with its pid; output goes to `log`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub background: bool,
    /// Extra environment variables (the agent's own environment is inherited).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Log file for a background command's stdout and stderr (default: under `/run/kvcsi-agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl ExecRequest {
    /// A foreground command with no stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Feeds `stdin` to the command.
    pub fn with_stdin(mut self, stdin: impl Into<String>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// Runs the command in the background, its output going to `log` (or a default file).
    pub fn in_background(mut self, log: Option<String>) -> Self {
        self.background = true;
        self.log = log;
        self
    }
}

/// The agent's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// Exit code; `128 + signal` when killed, [`SPAWN_FAILED_CODE`] when it never started,
    /// 0 for a background command that started.
    pub code: i32,
    /// Standard output, decoded as UTF-8 with invalid bytes replaced.
    #[serde(default)]
    pub stdout: String,
    /// Standard error, decoded the same way; also carries the agent's own error messages.
    #[serde(default)]
    pub stderr: String,
    /// Pid of a background command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Log file of a background command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl ExecResponse {
    /// Whether the command exited with 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// A command the agent started in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Background {
    /// Its pid inside the guest.
    pub pid: u32,
    /// Guest path of the file that receives its stdout and stderr.
    pub log: String,
}

/// Failures talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The TCP connection to the forwarded agent port failed.
    #[error("cannot connect to the guest agent at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed mid-way.
    #[error("i/o error talking to the guest agent at {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The connection closed without an answer: QEMU's user network accepts for a guest port
    /// nobody listens on yet, so this is what "agent not up yet" looks like.
    #[error("the guest agent at {addr} closed the connection without answering")]
    NoAnswer { addr: SocketAddr },
    /// The request could not be encoded (not expected for these plain types).
    #[error("cannot encode the request to the guest agent as json")]
    Encode(#[source] serde_json::Error),
    /// The answer was not the JSON we expect.
    #[error("the guest agent at {addr} sent an answer that is not valid json")]
    BadAnswer {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    /// No answer within the client's timeout.
    #[error("the guest agent at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// A command was required to succeed and did not.
    #[error("guest command {argv:?} exited with {code}: {stderr}")]
    Failed {
        argv: Vec<String>,
        code: i32,
        stderr: String,
    },
    /// The agent answered a background request without a pid.
    #[error("the guest agent did not report a pid for background command {argv:?}: {stderr}")]
    NoPid { argv: Vec<String>, stderr: String },
}

/// Host-side client of one guest agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    addr: SocketAddr,
    timeout: Duration,
}

impl AgentClient {
    /// Default bound on one request: long enough for `mkfs.xfs` on an emulated CPU.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// A client for the agent reachable at `addr` (the host end of the port forward).
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the agent is reached from the host.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and returns the answer, whatever the command's exit code.
    pub async fn request(&self, request: &ExecRequest) -> Result<ExecResponse, AgentError> {
        let addr = self.addr;
        match tokio::time::timeout(self.timeout, self.round_trip(request)).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Timeout {
                addr,
                timeout: self.timeout,
            }),
        }
    }

    async fn round_trip(&self, request: &ExecRequest) -> Result<ExecResponse, AgentError> {
        let addr = self.addr;
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| AgentError::Connect { addr, source })?;
        let mut line = serde_json::to_vec(request).map_err(AgentError::Encode)?;
        line.push(b'\n');
        let io = |source| AgentError::Io { addr, source };
        stream.write_all(&line).await.map_err(io)?;
        stream.shutdown().await.map_err(io)?;
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer).await {
            Ok(_) => {}
            // A reset before any byte arrived is the same "nobody listening yet" as a clean close.
            Err(e) if answer.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(AgentError::NoAnswer { addr });
            }
            Err(e) => return Err(io(e)),
        }
        if answer.iter().all(u8::is_ascii_whitespace) {
            return Err(AgentError::NoAnswer { addr });
        }
        serde_json::from_slice(&answer).map_err(|source| AgentError::BadAnswer { addr, source })
    }

    /// Runs `argv` in the foreground and returns its outcome, whatever the exit code.
    pub async fn exec<I, S>(&self, argv: I) -> Result<ExecResponse, AgentError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.request(&ExecRequest::new(argv)).await
    }

    /// Runs `argv` and returns its stdout, or [`AgentError::Failed`] on a non-zero exit.
    pub async fn exec_ok<I, S>(&self, argv: I) -> Result<String, AgentError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let request = ExecRequest::new(argv);
        let response = self.request(&request).await?;
        if response.success() {
            Ok(response.stdout)
        } else {
            Err(AgentError::Failed {
                argv: request.argv,
                code: response.code,
                stderr: response.stderr,
            })
        }
    }

    /// Starts `argv` in the background; its output goes to `log` or to a file the agent picks.
    pub async fn spawn_background<I, S>(
        &self,
        argv: I,
        log: Option<&str>,
    ) -> Result<Background, AgentError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let request = ExecRequest::new(argv).in_background(log.map(str::to_owned));
        let response = self.request(&request).await?;
        if !response.success() {
            return Err(AgentError::Failed {
                argv: request.argv,
                code: response.code,
                stderr: response.stderr,
            });
        }
        match (response.pid, response.log) {
            (Some(pid), Some(log)) => Ok(Background { pid, log }),
            _ => Err(AgentError::NoPid {
                argv: request.argv,
                stderr: response.stderr,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_request_is_just_argv() {
        let json = serde_json::to_string(&ExecRequest::new(["true"])).unwrap();
        assert_eq!(json, r#"{"argv":["true"]}"#);
    }

    #[test]
    fn request_with_only_argv_and_stdin_parses() {
        let request: ExecRequest =
            serde_json::from_str(r#"{"argv":["cat"],"stdin":"hi"}"#).unwrap();
        assert_eq!(request, ExecRequest::new(["cat"]).with_stdin("hi"));
    }

    #[test]
    fn response_without_optional_fields_parses() {
        let response: ExecResponse = serde_json::from_str(r#"{"code":3}"#).unwrap();
        assert_eq!(response.code, 3);
        assert!(response.stdout.is_empty() && response.pid.is_none());
    }
}
