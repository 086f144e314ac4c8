// coredns-resolve asks a CoreDNS server (built from this module: see go.mod's tool line) what
// it serves for a name whose records podlease writes in the SkyDNS layout, as a DNS client in
// the cluster would: it queries SRV and A for the name every 100 ms and prints the instance
// set whenever it changes.
//
//	go build -o coredns ./coredns   # CoreDNS with the bind and etcd plugins (see coredns/main.go)
//	go build -o coredns-resolve .
//	coredns-resolve resolve --dns=127.0.0.1:1053 --service=user.shop.cluster.local
//
// A minimal Corefile for podlease's default zone and prefix (etcd plugin, SkyDNS layout):
//
//	cluster.local:1053 {
//	    etcd {
//	        path /skydns
//	        endpoint http://127.0.0.1:2379
//	    }
//	}
//
// Each instance is one SRV record: "addr" is the IP of its target (from the additional
// section, else an A/AAAA query for the target) joined with the SRV port; "target", "port",
// "priority", "weight" and "ttl" are the SRV record's; "a_ttl" is the TTL of that IP in the
// A (or AAAA) answer for the name itself. An IP the A answer holds but no SRV names, or the
// other way round, is an error event, as is a failed query (e.g. SERVFAIL).
//
// The TTL CoreDNS serves for a record whose key has a lease is
// min(clamp(remaining lease TTL, min-lease-ttl 30 s, max-lease-ttl 24 h), value's "ttl"),
// and the value's "ttl" alone (300 s if unset) for a key without a lease.
//
// Only a DNS server of this machine is queried unless --dial-any is given.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "resolve" {
		usage()
	}
	fs := flag.NewFlagSet("resolve", flag.ExitOnError)
	server := fs.String("dns", "127.0.0.1:53", "DNS server host:port (CoreDNS)")
	service := fs.String("service", "", "name to query, e.g. user.shop.cluster.local (required)")
	dialAny := fs.Bool("dial-any", false, "query a DNS server that is not on this machine (only inside a sealed network namespace)")
	fs.String("endpoints", "", "ignored: CoreDNS reads etcd, this program reads CoreDNS")
	fs.Bool("dial", false, "ignored: DNS has no RPC client to call")
	fs.Parse(os.Args[2:])
	if *service == "" {
		usage()
	}
	if !*dialAny && !thisMachine(*server) {
		out.event("error", fmt.Sprintf("refusing to query %s: not an address of this machine (use --dial-any only in a sealed namespace)", *server))
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	resolve(*server, dns.Fqdn(*service), sig)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: coredns-resolve resolve --dns=127.0.0.1:PORT --service=<fqdn>")
	os.Exit(2)
}

type instance struct {
	Addr     string `json:"addr"`
	Target   string `json:"target"`
	Port     uint16 `json:"port"`
	Priority uint16 `json:"priority"`
	Weight   uint16 `json:"weight"`
	TTL      uint32 `json:"ttl"`
	ATTL     uint32 `json:"a_ttl"`
}

func resolve(server, name string, stop <-chan os.Signal) {
	c := &dns.Client{Timeout: time.Second}
	var last, lastErr string
	first := true
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		set, err := lookup(c, server, name)
		errText := ""
		if err != nil {
			errText = err.Error()
		}
		if errText != lastErr && errText != "" {
			out.event("error", errText)
		}
		lastErr = errText
		if set != nil || first {
			if set == nil {
				set = []instance{}
			}
			b, _ := json.Marshal(set)
			if first || string(b) != last {
				out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "instances": set})
				last = string(b)
			}
			if first {
				out.event("watching", "")
				first = false
			}
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// lookup returns the set CoreDNS serves, or nil and an error when a query failed. An
// NXDOMAIN is an empty set: CoreDNS answers so when no key lies under the name.
func lookup(c *dns.Client, server, name string) ([]instance, error) {
	srv, err := query(c, server, name, dns.TypeSRV)
	if err != nil {
		return nil, err
	}
	addrs := map[string]dns.RR{} // IP -> A/AAAA record of the name itself
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m, err := query(c, server, name, t)
		if err != nil {
			return nil, err
		}
		for _, rr := range m.Answer {
			if ip := rrIP(rr); ip != "" {
				addrs[ip] = rr
			}
		}
	}
	extra := map[string][]string{} // target -> IPs from the additional section
	for _, rr := range srv.Extra {
		if ip := rrIP(rr); ip != "" {
			extra[rr.Header().Name] = append(extra[rr.Header().Name], ip)
		}
	}
	set := []instance{}
	var problems []string
	named := map[string]bool{}
	for _, rr := range srv.Answer {
		s, ok := rr.(*dns.SRV)
		if !ok {
			continue
		}
		ips := extra[s.Target]
		if len(ips) == 0 {
			ips = targetIPs(c, server, s.Target)
		}
		if len(ips) == 0 {
			problems = append(problems, fmt.Sprintf("SRV target %s has no address", s.Target))
			ips = []string{strings.TrimSuffix(s.Target, ".")}
		}
		for _, ip := range ips {
			inst := instance{Addr: net.JoinHostPort(ip, strconv.Itoa(int(s.Port))), Target: s.Target, Port: s.Port,
				Priority: s.Priority, Weight: s.Weight, TTL: s.Hdr.Ttl}
			if a, ok := addrs[ip]; ok {
				inst.ATTL = a.Header().Ttl
				named[ip] = true
			} else {
				problems = append(problems, fmt.Sprintf("%s (SRV target %s) is missing from the A/AAAA answer for %s", ip, s.Target, name))
			}
			set = append(set, inst)
		}
	}
	for ip := range addrs {
		if !named[ip] {
			problems = append(problems, fmt.Sprintf("%s is in the A/AAAA answer for %s but no SRV record names it", ip, name))
		}
	}
	sort.SliceStable(set, func(a, b int) bool { return set[a].Addr < set[b].Addr })
	if len(problems) > 0 {
		sort.Strings(problems)
		return set, fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return set, nil
}

func query(c *dns.Client, server, name string, t uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, t)
	r, _, err := c.Exchange(m, server)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v", dns.TypeToString[t], name, err)
	}
	if r.Rcode != dns.RcodeSuccess && r.Rcode != dns.RcodeNameError {
		return nil, fmt.Errorf("%s %s: %s", dns.TypeToString[t], name, dns.RcodeToString[r.Rcode])
	}
	return r, nil
}

func targetIPs(c *dns.Client, server, target string) []string {
	var ips []string
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		if m, err := query(c, server, target, t); err == nil {
			for _, rr := range m.Answer {
				if ip := rrIP(rr); ip != "" {
					ips = append(ips, ip)
				}
			}
		}
	}
	return ips
}

func rrIP(rr dns.RR) string {
	switch r := rr.(type) {
	case *dns.A:
		return r.A.String()
	case *dns.AAAA:
		return r.AAAA.String()
	}
	return ""
}

func thisMachine(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	ip := net.ParseIP(host)
	if err != nil || ip == nil {
		return false
	}
	if ip.IsLoopback() {
		return true
	}
	// Loopback only: an address of one of this machine's interfaces could be reachable
	// from elsewhere.
	return false
}

// printer writes each JSON line whole, in one write.
type printer struct{ mu sync.Mutex }

var out printer

func (p *printer) event(event, detail string) {
	m := map[string]any{"t_unix_nanos": time.Now().UnixNano(), "event": event}
	if detail != "" {
		m["detail"] = detail
	}
	p.line(m)
}

func (p *printer) line(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}
