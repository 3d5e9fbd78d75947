//go:build tools

// Package tools pins CoreDNS, the cluster DNS of the single-node test cluster
// (tests/cluster): its own main package with its default plugin set
// (plugin.cfg). Nothing here is compiled; tools/build-node.sh builds the main
// package by path.
package tools

import (
	_ "github.com/coredns/coredns"
)
