// coredns is CoreDNS (github.com/coredns/coredns, the version go.mod pins) with only the
// plugins the tests' Corefile uses: bind and etcd. Upstream's main package compiles in every
// plugin (the cloud providers' SDKs, Kubernetes' client among them), several minutes of a cold
// build for code nothing here runs. The etcd plugin is upstream's own, unchanged.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/etcd"
)

func init() {
	// In upstream's order (plugin.cfg): bind sets up the listener, etcd answers.
	dnsserver.Directives = []string{"bind", "etcd"}
}

func main() {
	coremain.Run()
}
