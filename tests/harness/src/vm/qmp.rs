//! A minimal QMP client: JSON lines over QEMU's unix socket.
//!
//! QMP interleaves asynchronous events with command replies on one stream, so a reader task
//! owns the read half, hands each reply to the command waiting on its `id`, and broadcasts
//! events. Callers that wait for an event subscribe *before* issuing the command that causes it,
//! so the event cannot slip past them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// An asynchronous QMP event such as `DEVICE_DELETED`.
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    /// Event name.
    pub event: String,
    /// Event payload (`null` when the event has none).
    #[serde(default)]
    pub data: Value,
}

/// Failures of the QMP connection or of a QMP command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection in time (QEMU died or never created it).
    #[error("cannot connect to the qmp socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("i/o error on the qmp socket")]
    Io(#[source] std::io::Error),
    /// QEMU sent something that is not a QMP message.
    #[error("qemu sent an unexpected qmp message: {0}")]
    Protocol(String),
    /// A message could not be encoded or decoded.
    #[error("invalid json on the qmp socket")]
    Json(#[source] serde_json::Error),
    /// QEMU rejected a command.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The connection closed (QEMU exited) while a command or wait was outstanding.
    #[error("the qmp connection closed")]
    Closed,
    /// An awaited event did not arrive in time.
    #[error("no qmp event {event} for {what} within {timeout:?}")]
    EventTimeout {
        event: String,
        what: String,
        timeout: Duration,
    },
}

type Reply = Result<Value, QmpError>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU creates the socket, up to `timeout`), reads the
    /// greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(QmpError::Io)?
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting).map_err(QmpError::Json)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let reader = tokio::spawn(read_loop(lines, Arc::clone(&pending), events.clone()));
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&message).map_err(QmpError::Json)?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        {
            let mut writer = self.writer.lock().await;
            if let Err(e) = writer.write_all(&line).await {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Io(e));
            }
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Ok(Err(other)) => Err(other),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Waits on `events` for an event named `event` whose data satisfies `matches`.
    pub async fn wait_event(
        events: &mut broadcast::Receiver<QmpEvent>,
        event: &str,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.event == event && matches(&e.data) => return Ok(e),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Closed),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::EventTimeout {
                event: event.to_owned(),
                what: what.to_owned(),
                timeout,
            })?
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent; keep going.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(%line, "ignoring a qmp line that is not json");
            continue;
        };
        if message.get("event").is_some() {
            if let Ok(event) = serde_json::from_value::<QmpEvent>(message) {
                tracing::debug!(event = %event.event, data = %event.data, "qmp event");
                // No subscriber is fine: nobody is waiting for this event.
                let _ = events.send(event);
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::warn!(%line, "ignoring a qmp reply without our id");
            continue;
        };
        let reply = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            let field = |name: &str| {
                error
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            Err(QmpError::Command {
                command: String::new(),
                class: field("class"),
                desc: field("desc"),
            })
        } else {
            Err(QmpError::Protocol(line.clone()))
        };
        if let Some(tx) = lock(&pending).remove(&id) {
            let _ = tx.send(reply);
        }
    }
    // Dropping the senders wakes every waiting command with `Closed`.
    lock(&pending).clear();
}
