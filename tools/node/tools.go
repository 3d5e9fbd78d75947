//go:build tools

// Package tools pins the Kubernetes node and controller binaries that the
// single-node test cluster (tests/cluster) runs: the same k8s.io/kubernetes
// version as tools/kube's kube-apiserver. Nothing here is compiled;
// tools/build-node.sh builds the main packages by path.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
