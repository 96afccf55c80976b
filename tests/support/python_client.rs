//! A CSI client that is not Go's: grpcio, which sends the unix socket's path as `:authority`.
//! Included by the controller's and the node plugin's binary tests (`#[path]`), so both
//! plugins are checked by one piece of client code. Both crates sit one level below the
//! repository root, which the `../hack` paths rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Python gRPC client (grpcio, installed by hack/python-grpc.sh into the cache): its
/// interpreter, or a failed test saying why.
pub fn python_grpc() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/python-grpc.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script:?}: {e}"));
    assert!(
        out.status.success(),
        "{script:?} failed to install the Python gRPC client (see above)"
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// One unary call through grpcio, which sends the socket path as `:authority`.
pub fn python_call(python: &Path, target: &str, method: &str) -> Result<Vec<u8>, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/grpc-unary.py");
    let out = Command::new(python)
        .arg(&script)
        .args([target, method])
        .output()
        .expect("run the Python client");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let hex = String::from_utf8(out.stdout).expect("utf-8");
    let hex = hex.trim();
    Ok((0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect())
}
