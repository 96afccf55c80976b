//! Test harness for kubevirt-csi: real processes, cleaned up on drop.
//!
//! - [`cluster::ControlPlane`]: etcd + kube-apiserver with client-cert auth, RBAC,
//!   service-account signing and the aggregation layer configured;
//! - [`crds`]: installs the upstream KubeVirt, CDI and snapshot CRDs;
//! - [`kubevirt::KubeVirt`]: KubeVirt's own virt-api and virt-controller, installed as
//!   virt-operator would, with node stand-ins ([`kubevirt_node`]);
//! - [`proxy::TcpProxy`]: a loopback TCP proxy that can cut every connection, to test
//!   how clients survive lost watches;
//! - [`tools`]: where the pinned external tools and the workspace binaries live.
#![forbid(unsafe_code)]

pub mod certs;
pub mod cluster;
pub mod crds;
pub mod csi;
pub mod fixtures;
pub mod grpc_router;
pub mod guest;
pub mod kubelet;
pub mod kubevirt;
pub mod kubevirt_node;
pub mod process;
pub mod proxy;
pub mod sidecars;
pub mod stack;
pub mod standin;
pub mod tools;
pub mod vm;
