//go:build tools

// Package tools pins the Kubernetes control-plane binaries that the l4proxy
// operator tests run against. Nothing here is compiled; tools/build.sh builds
// the main packages by path (go build k8s.io/kubernetes/cmd/kube-apiserver).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
