//! The node id, `<namespace>/<vm-name>`: which infra VM backs this guest node, so the
//! controller knows where to hotplug.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Node;

pub const PROVIDER_PREFIX: &str = "kubevirt://";
pub const CLUSTER_NAMESPACE_ANNOTATION: &str = "cluster.x-k8s.io/cluster-namespace";
pub const VM_NAME_ANNOTATION: &str = "csi.kubevirt.io/infra-vm-name";
pub const VM_NAMESPACE_ANNOTATION: &str = "csi.kubevirt.io/infra-vm-namespace";

/// An infra VM's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub namespace: String,
    pub vm: String,
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.vm)
    }
}

/// Why no node id could be had.
#[derive(Debug, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id {0:?} is not <namespace>/<vm-name> with DNS-1123 names")]
    Malformed(String),
    #[error(
        "node {node} names no infra VM: it needs providerID {PROVIDER_PREFIX}<vm> with annotation \
         {CLUSTER_NAMESPACE_ANNOTATION}, or annotations {VM_NAME_ANNOTATION} and {VM_NAMESPACE_ANNOTATION}"
    )]
    NotOnNode { node: String },
    #[error("no --node-id given and no --node-name (NODE_NAME) to look the Node up by")]
    NoSource,
    #[error("cannot build a Kubernetes client to read node {node}")]
    Client {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read node {node}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

impl NodeId {
    pub fn new(namespace: &str, vm: &str) -> Result<Self, NodeIdError> {
        if dns_label(namespace) && dns_subdomain(vm) {
            Ok(Self {
                namespace: namespace.to_owned(),
                vm: vm.to_owned(),
            })
        } else {
            Err(NodeIdError::Malformed(format!("{namespace}/{vm}")))
        }
    }

    /// Reads the id from a guest Node. The explicit csi.kubevirt.io annotations win over
    /// the providerID, so an operator can correct a node without touching its provider.
    pub fn from_node(node: &Node) -> Result<Self, NodeIdError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let ann = node.metadata.annotations.clone().unwrap_or_default();
        if let (Some(vm), Some(ns)) = (
            ann.get(VM_NAME_ANNOTATION),
            ann.get(VM_NAMESPACE_ANNOTATION),
        ) {
            return Self::new(ns, vm);
        }
        let provider_vm = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(|p| p.strip_prefix(PROVIDER_PREFIX));
        match (provider_vm, ann.get(CLUSTER_NAMESPACE_ANNOTATION)) {
            (Some(vm), Some(ns)) => Self::new(ns, vm),
            _ => Err(NodeIdError::NotOnNode { node: name }),
        }
    }

    /// The flag if given, otherwise the guest Node object read through the in-cluster
    /// (or kubeconfig) client.
    pub async fn resolve(
        flag: Option<NodeId>,
        node_name: Option<&str>,
    ) -> Result<Self, NodeIdError> {
        if let Some(id) = flag {
            return Ok(id);
        }
        let node = node_name
            .filter(|n| !n.is_empty())
            .ok_or(NodeIdError::NoSource)?;
        let client = kube::Client::try_default()
            .await
            .map_err(|source| NodeIdError::Client {
                node: node.to_owned(),
                source,
            })?;
        let api: kube::Api<Node> = kube::Api::all(client);
        let obj = api.get(node).await.map_err(|source| NodeIdError::Get {
            node: node.to_owned(),
            source,
        })?;
        Self::from_node(&obj)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, vm) = s
            .split_once('/')
            .ok_or_else(|| NodeIdError::Malformed(s.to_owned()))?;
        Self::new(ns, vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use std::collections::BTreeMap;

    fn node(provider: Option<&str>, ann: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("worker-1".into());
        n.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect::<BTreeMap<_, _>>(),
        );
        n.spec = Some(NodeSpec {
            provider_id: provider.map(Into::into),
            ..Default::default()
        });
        n
    }

    #[test]
    fn parses_flag_form() {
        assert_eq!(
            "tenant-a/vm-1".parse::<NodeId>().unwrap().to_string(),
            "tenant-a/vm-1"
        );
        assert!("no-slash".parse::<NodeId>().is_err());
        assert!("/vm".parse::<NodeId>().is_err());
        assert!("ns/".parse::<NodeId>().is_err());
        assert!("NS/vm".parse::<NodeId>().is_err());
        assert!("ns/vm/x".parse::<NodeId>().is_err());
    }

    #[test]
    fn reads_provider_id_with_cluster_namespace() {
        let n = node(
            Some("kubevirt://vm-7"),
            &[(CLUSTER_NAMESPACE_ANNOTATION, "clusters-a")],
        );
        assert_eq!(
            NodeId::from_node(&n).unwrap().to_string(),
            "clusters-a/vm-7"
        );
    }

    #[test]
    fn annotations_win_over_provider_id() {
        let n = node(
            Some("kubevirt://vm-7"),
            &[
                (CLUSTER_NAMESPACE_ANNOTATION, "clusters-a"),
                (VM_NAME_ANNOTATION, "vm-9"),
                (VM_NAMESPACE_ANNOTATION, "infra-b"),
            ],
        );
        assert_eq!(NodeId::from_node(&n).unwrap().to_string(), "infra-b/vm-9");
    }

    #[test]
    fn missing_namespace_or_foreign_provider_is_an_error() {
        assert!(matches!(
            NodeId::from_node(&node(Some("kubevirt://vm-7"), &[])),
            Err(NodeIdError::NotOnNode { .. })
        ));
        let n = node(
            Some("aws:///us-east-1a/i-1"),
            &[(CLUSTER_NAMESPACE_ANNOTATION, "c")],
        );
        assert!(matches!(
            NodeId::from_node(&n),
            Err(NodeIdError::NotOnNode { .. })
        ));
    }

    #[tokio::test]
    async fn flag_needs_no_cluster_and_nothing_is_an_error() {
        let id = NodeId::resolve(Some("a/b".parse().unwrap()), None)
            .await
            .unwrap();
        assert_eq!(id.to_string(), "a/b");
        assert!(matches!(
            NodeId::resolve(None, None).await,
            Err(NodeIdError::NoSource)
        ));
    }
}
