//! The controller's errors and their one mapping to gRPC codes.
//!
//! Every variant is mapped explicitly (no catch-all arm), so a new failure forces a
//! decision about what the CSI sidecars should do with it: ABORTED, UNAVAILABLE and
//! DEADLINE_EXCEEDED make them retry; INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS and
//! FAILED_PRECONDITION tell them the request itself cannot succeed as it is.

use std::time::Duration;

use tonic::{Code, Status};

/// A failure talking to the infra cluster, classified by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    /// The object does not exist, or exists but does not belong to this tenant.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    /// An object sits under the name but was not made by this driver for this tenant (for
    /// instance a claim CDI did not create for our DataVolume); we refuse to act on it.
    #[error("{kind} {namespace}/{name} exists but was not created by this driver for this tenant")]
    NotOurs {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    /// Someone else changed the object first, or KubeVirt refused a duplicate hotplug.
    #[error("conflict on {kind} {name}: {message}")]
    Conflict {
        kind: &'static str,
        name: String,
        message: String,
    },
    /// The infra apiserver forbade the request: RBAC (the controller's Role lacks a verb)
    /// or an admission rule (e.g. the infra StorageClass does not allow expansion).
    #[error("the infra cluster forbids this on {kind} {name}: {message}{hint}")]
    Forbidden {
        kind: &'static str,
        name: String,
        message: String,
        /// Points at the Role when RBAC said no.
        hint: &'static str,
    },
    /// The infra apiserver rejected an object we sent.
    #[error("the infra cluster rejected {kind} {name}: {message}")]
    Rejected {
        kind: &'static str,
        name: String,
        message: String,
    },
    /// The infra apiserver (or an aggregated API such as virt-api) cannot be reached or
    /// answered with a server error.
    #[error("the infra cluster is unavailable while accessing {kind} {name}")]
    Unavailable {
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A wait on a watch ran out of time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
}

impl InfraError {
    /// Classifies a kube error for an operation on `kind`/`name`.
    pub fn from_kube(kind: &'static str, namespace: &str, name: &str, err: kube::Error) -> Self {
        match err {
            kube::Error::Api(s) => match s.code {
                404 => InfraError::NotFound {
                    kind,
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                },
                409 => InfraError::Conflict {
                    kind,
                    name: name.to_string(),
                    message: s.message,
                },
                401 | 403 => InfraError::Forbidden {
                    kind,
                    name: name.to_string(),
                    // RBAC denials read "User ... cannot <verb> resource ...".
                    hint: if s.message.contains(" cannot ") {
                        " (the controller's infra Role lacks this permission)"
                    } else {
                        ""
                    },
                    message: s.message,
                },
                // A failed JSON-patch `test` op (ours, or virt-api's own under concurrent
                // hotplugs) is 422 "Testing value … failed": the object moved, so re-read and
                // retry, as for any other conflict.
                422 if s.message.contains("Testing value") => InfraError::Conflict {
                    kind,
                    name: name.to_string(),
                    message: s.message,
                },
                400 | 422 => InfraError::Rejected {
                    kind,
                    name: name.to_string(),
                    message: s.message,
                },
                _ => InfraError::Unavailable {
                    kind,
                    name: name.to_string(),
                    source: Box::new(kube::Error::Api(s)),
                },
            },
            other => InfraError::Unavailable {
                kind,
                name: name.to_string(),
                source: Box::new(other),
            },
        }
    }
}

/// Why a controller RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller should start over (e.g. a pagination token we did not issue).
    #[error("{0}")]
    Aborted(String),
    /// Another operation on the same volume or snapshot is in flight.
    #[error("an operation on {0} is already in progress")]
    InProgress(String),
    /// The infra cluster failed; `context` says what we were doing.
    #[error("{context}")]
    Infra {
        context: String,
        #[source]
        source: InfraError,
    },
}

impl ControllerError {
    pub fn infra(context: impl Into<String>) -> impl FnOnce(InfraError) -> Self {
        let context = context.into();
        move |source| ControllerError::Infra { context, source }
    }

    pub fn code(&self) -> Code {
        match self {
            ControllerError::InvalidArgument(_) => Code::InvalidArgument,
            ControllerError::NotFound(_) => Code::NotFound,
            ControllerError::AlreadyExists(_) => Code::AlreadyExists,
            ControllerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControllerError::OutOfRange(_) => Code::OutOfRange,
            ControllerError::ResourceExhausted(_) => Code::ResourceExhausted,
            ControllerError::Aborted(_) => Code::Aborted,
            ControllerError::InProgress(_) => Code::Aborted,
            ControllerError::Infra { source, .. } => match source {
                InfraError::NotFound { .. } => Code::NotFound,
                InfraError::NotOurs { .. } => Code::FailedPrecondition,
                InfraError::Conflict { .. } => Code::Aborted,
                InfraError::Forbidden { .. } => Code::FailedPrecondition,
                InfraError::Rejected { .. } => Code::FailedPrecondition,
                InfraError::Unavailable { .. } => Code::Unavailable,
                InfraError::Timeout { .. } => Code::DeadlineExceeded,
            },
        }
    }
}

/// The message keeps the whole source chain, so the sidecar's event shows the cause, bounded
/// so it fits the gRPC trailer whatever id the caller sent.
impl From<ControllerError> for Status {
    fn from(err: ControllerError) -> Self {
        Status::new(err.code(), kubevirt_csi_common::status_message(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("boom", "Reason")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn kube_errors_map_to_the_codes_the_sidecars_expect() {
        let cases = [
            (404, Code::NotFound),
            (409, Code::Aborted),
            (403, Code::FailedPrecondition),
            (422, Code::FailedPrecondition),
            (500, Code::Unavailable),
            (503, Code::Unavailable),
        ];
        for (http, want) in cases {
            let err = ControllerError::Infra {
                context: "creating datavolume x".into(),
                source: InfraError::from_kube("DataVolume", "ns", "x", api(http)),
            };
            assert_eq!(err.code(), want, "HTTP {http}");
        }
    }

    #[test]
    fn failed_patch_tests_are_conflicts_other_422s_rejections() {
        let status = |msg: &str| {
            kube::Error::Api(
                kube::core::Status::failure(msg, "Invalid")
                    .with_code(422)
                    .boxed(),
            )
        };
        assert!(matches!(
            InfraError::from_kube(
                "VirtualMachine",
                "ns",
                "w",
                status("Testing value /metadata/uid failed")
            ),
            InfraError::Conflict { .. }
        ));
        assert!(matches!(
            InfraError::from_kube(
                "VirtualMachine",
                "ns",
                "w",
                status("spec.template.spec.domain.devices.disks[1].disk.bus: Unsupported value")
            ),
            InfraError::Rejected { .. }
        ));
    }

    #[test]
    fn forbidden_points_at_the_role_only_for_rbac_denials() {
        let forbidden = |msg: &str| {
            let status = kube::core::Status::failure(msg, "Forbidden")
                .with_code(403)
                .boxed();
            InfraError::from_kube("DataVolume", "ns", "x", kube::Error::Api(status)).to_string()
        };
        let rbac = forbidden("User \"sa\" cannot patch resource \"datavolumes\"");
        assert!(
            rbac.ends_with("(the controller's infra Role lacks this permission)"),
            "{rbac}"
        );
        let admission = forbidden("only dynamically provisioned pvc can be resized");
        assert!(!admission.contains("Role"), "{admission}");
    }

    #[test]
    fn huge_messages_are_cut_on_a_char_boundary() {
        let st: Status =
            ControllerError::NotFound(format!("volume {} does not exist", "é".repeat(40_000)))
                .into();
        assert!(
            st.message().len() < kubevirt_csi_common::MAX_STATUS_MESSAGE + 64,
            "{}",
            st.message().len()
        );
        assert!(st.message().ends_with("bytes, truncated)"));
        assert_eq!(st.code(), Code::NotFound);
    }

    #[test]
    fn status_message_keeps_the_chain() {
        let err = ControllerError::infra("attaching volume v to vm ns/w")(InfraError::Timeout {
            what: "volume v to become Ready on ns/w".into(),
            waited: Duration::from_secs(10),
        });
        let st: Status = err.into();
        assert_eq!(st.code(), Code::DeadlineExceeded);
        assert!(
            st.message()
                .starts_with("attaching volume v to vm ns/w: timed out after 10s"),
            "{}",
            st.message()
        );
    }
}
