// CoreDNS with only the plugins of the Corefile kubeadm deploys (errors, health, ready,
// kubernetes, prometheus, forward, cache, loop, reload, loadbalance), the way CoreDNS's own
// plugin.cfg selects plugins at build time. The full build (every plugin, with the AWS, Azure,
// Google Cloud and Datadog SDKs) took 26 minutes cold on two cores; the kind node image needs
// none of that. Built by scripts/kind-node-image.sh; nothing here is imported by Rust code.
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"

	"github.com/coredns/coredns/coremain"
)

func main() { coremain.Run() }
