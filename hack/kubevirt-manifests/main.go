// Command kubevirt-manifests prints the cluster objects virt-operator would install for
// KubeVirt, so the test bed can run virt-api and virt-controller without virt-operator.
//
// KubeVirt ships no CRD or webhook YAML: virt-operator builds these objects in code at
// install time. This program calls the same upstream constructors (the module version is
// whatever the wrapper module in hack/tools.sh pins) and writes one multi-document YAML
// file per kind of object into the directory given as its only argument:
//
//	crds.yaml         every CustomResourceDefinition, KubeVirt's own included
//	rbac.yaml         ServiceAccounts, (Cluster)Roles and bindings of virt-api,
//	                  virt-controller and virt-handler
//	webhooks.yaml     virt-api's validating and mutating webhook configurations
//	apiservices.yaml  the aggregated APIServices virt-api serves
//	vap.yaml          the ValidatingAdmissionPolicy (and binding) fencing virt-handler's
//	                  node updates
//
// Service references in webhooks and APIServices are left as upstream writes them; the
// harness rewrites them to reach the processes it starts.
package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac"
)

// namespace is where the harness runs KubeVirt; virt-api and virt-controller fall back to
// it when no service-account namespace file exists, so it cannot be chosen freely.
const namespace = "kubevirt"

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kubevirt-manifests OUTPUT_DIR")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "kubevirt-manifests:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	crds, err := allCRDs()
	if err != nil {
		return err
	}
	var rbacObjects []any
	for _, group := range [][]runtime.Object{
		rbac.GetAllCluster(),
		rbac.GetAllApiServer(namespace),
		rbac.GetAllController(namespace),
		rbac.GetAllHandler(namespace),
	} {
		for _, o := range group {
			rbacObjects = append(rbacObjects, o)
		}
	}
	var apiServices []any
	for _, a := range components.NewVirtAPIAPIServices(namespace) {
		apiServices = append(apiServices, a)
	}
	handlerUser := fmt.Sprintf("system:serviceaccount:%s:%s", namespace, components.HandlerServiceAccountName)
	// Upstream sets apiVersion "v1" on these two; virt-operator's typed client never reads
	// it, but anything applying the YAML needs the group.
	vap := components.NewHandlerV1ValidatingAdmissionPolicy(handlerUser)
	vap.APIVersion = admissionregistrationv1.SchemeGroupVersion.String()
	vapBinding := components.NewHandlerV1ValidatingAdmissionPolicyBinding()
	vapBinding.APIVersion = admissionregistrationv1.SchemeGroupVersion.String()
	files := []struct {
		name    string
		objects []any
	}{
		{"crds.yaml", crds},
		{"rbac.yaml", rbacObjects},
		{"webhooks.yaml", []any{
			components.NewVirtAPIValidatingWebhookConfiguration(namespace),
			components.NewVirtAPIMutatingWebhookConfiguration(namespace),
		}},
		{"apiservices.yaml", apiServices},
		{"vap.yaml", []any{vap, vapBinding}},
	}
	for _, f := range files {
		if err := write(filepath.Join(dir, f.name), f.objects); err != nil {
			return err
		}
	}
	return nil
}

// allCRDs is the list virt-operator's install strategy creates, plus the KubeVirt CRD
// itself (which the operator's own deployment installs).
func allCRDs() ([]any, error) {
	constructors := []func() (*extv1.CustomResourceDefinition, error){
		components.NewKubeVirtCrd,
		components.NewVirtualMachineInstanceCrd, components.NewPresetCrd, components.NewReplicaSetCrd,
		components.NewVirtualMachineCrd, components.NewVirtualMachineInstanceMigrationCrd,
		components.NewVirtualMachineSnapshotCrd, components.NewVirtualMachineSnapshotContentCrd,
		components.NewVirtualMachineRestoreCrd, components.NewVirtualMachineInstancetypeCrd,
		components.NewVirtualMachineClusterInstancetypeCrd, components.NewVirtualMachinePoolCrd,
		components.NewMigrationPolicyCrd, components.NewVirtualMachinePreferenceCrd,
		components.NewVirtualMachineClusterPreferenceCrd, components.NewVirtualMachineExportCrd,
		components.NewVirtualMachineCloneCrd,
	}
	var out []any
	for _, c := range constructors {
		crd, err := c()
		if err != nil {
			return nil, err
		}
		// The generated objects carry an empty status; the apiserver owns it.
		crd.Status = extv1.CustomResourceDefinitionStatus{}
		out = append(out, crd)
	}
	return out, nil
}

func write(path string, objects []any) error {
	var b bytes.Buffer
	for _, o := range objects {
		y, err := yaml.Marshal(o)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}
