// Command etcd is the upstream etcd server entry point, built from its pinned
// Go module so that the kubetune tests need no downloaded release binaries.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
