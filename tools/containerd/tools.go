//go:build tools

// Package tools pins containerd 2.x (the daemon, the runc v2 shim and ctr)
// for the single-node test cluster (tests/cluster). Nothing here is
// compiled; tools/build-node.sh builds the main packages by path.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
