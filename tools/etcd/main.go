// Command etcd is etcd v3.7.3 (go.etcd.io/etcd/server/v3/etcdmain) built as a
// dependency of this module, so that its version is pinned by go.mod/go.sum.
// It is the same entry point as etcd's own main package (server/main.go).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
