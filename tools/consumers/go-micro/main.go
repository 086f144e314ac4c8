// go-micro consumer: resolves a service through go-micro's own etcd registry
// (go-micro.dev/v5/registry/etcd: GetService, then Watch), and registers one node the way
// go-micro's rpc server does (Register with RegisterTTL, again every RegisterInterval,
// Deregister on SIGTERM/SIGINT).
//
//	go-micro resolve --endpoints=http://127.0.0.1:2379 --service=<name>
//	go-micro register --endpoints=... --service=<name> --addr=127.0.0.x:PORT [--id=...] [--ttl=SECONDS] [--metadata=k=v,...] [--version=...]
//
// Every watch event makes it call GetService again, so each printed set is what
// GetService returns. An instance is one registry.Node (id, address, metadata) with its
// registry.Service's name and version; "addr" is the node's address. There is no
// --dial: go-micro's clients speak its own RPC protocols, not plain gRPC.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"reflect"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"go-micro.dev/v5/registry"
	"go-micro.dev/v5/registry/etcd"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "resolve" && os.Args[1] != "register") {
		fmt.Fprintln(os.Stderr, "usage: go-micro resolve|register --endpoints=... --service=... [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	endpoints := fs.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "service name")
	fs.Bool("dial", false, "ignored: go-micro has no plain gRPC client to dial through")
	dialAny := fs.Bool("dial-any", false, "register: allow an --addr that is not this machine's")
	addr := fs.String("addr", "", "register: the node's address")
	id := fs.String("id", "", "register: server id (node id is <service>-<id>; default a UUID, as go-micro's server)")
	ttl := fs.Int("ttl", 90, "register: RegisterTTL in seconds (go-micro's server default 90; re-registers every third of it)")
	metadata := fs.String("metadata", "", "register: k=v,... node metadata")
	version := fs.String("version", "latest", "register: service version")
	fs.Parse(os.Args[2:])
	if *service == "" {
		fmt.Fprintln(os.Stderr, "go-micro: --service is required")
		os.Exit(2)
	}
	// registry.Addrs takes host:port: a URL fails net.SplitHostPort and is silently dropped
	// (the registry then falls back to 127.0.0.1:2379).
	var hosts []string
	for _, e := range strings.Split(*endpoints, ",") {
		hosts = append(hosts, strings.TrimPrefix(strings.TrimPrefix(e, "http://"), "https://"))
	}
	reg := etcd.NewEtcdRegistry(registry.Addrs(hosts...))
	var err error
	if cmd == "resolve" {
		err = resolve(reg, *service)
	} else {
		err = register(reg, *service, *addr, *id, *version, *metadata, time.Duration(*ttl)*time.Second, *dialAny)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-micro:", err)
		os.Exit(1)
	}
}

type instance struct {
	Addr     string            `json:"addr"`
	ID       string            `json:"id"`
	Address  string            `json:"address"`
	Metadata map[string]string `json:"metadata"`
	Name     string            `json:"name"`
	Version  string            `json:"version"`
}

func resolve(reg registry.Registry, name string) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	var last []instance
	printed := false
	read := func() {
		svcs, err := reg.GetService(name)
		if err != nil && !errors.Is(err, registry.ErrNotFound) { // not found: no key under the prefix
			out.event("error", "GetService: "+err.Error())
			return
		}
		set := []instance{}
		for _, s := range svcs {
			for _, n := range s.Nodes {
				if n == nil {
					continue
				}
				set = append(set, instance{n.Address, n.Id, n.Address, n.Metadata, s.Name, s.Version})
			}
		}
		sort.SliceStable(set, func(i, j int) bool {
			if set[i].Addr != set[j].Addr {
				return set[i].Addr < set[j].Addr
			}
			return set[i].ID < set[j].ID
		})
		if printed && reflect.DeepEqual(set, last) {
			return
		}
		printed, last = true, set
		out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "instances": set})
	}

	read()
	for watching := false; ; {
		w, err := reg.Watch(registry.WatchService(name))
		if err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		if !watching {
			out.event("watching", name)
			watching = true
		}
		results := make(chan error)
		go func() {
			for {
				_, err := w.Next()
				results <- err
				if err != nil {
					return
				}
			}
		}()
		for err = nil; err == nil; {
			select {
			case <-sigs:
				w.Stop()
				return nil
			case err = <-results:
				if err == nil {
					read()
				}
			}
		}
		// The watch ended: watch again, as go-micro's registry cache does.
		out.event("error", "Watch.Next: "+err.Error())
		w.Stop()
		time.Sleep(time.Second)
		read()
	}
}

func register(reg registry.Registry, name, addr, id, version, metadata string, ttl time.Duration, dialAny bool) error {
	if addr == "" {
		return errors.New("--addr is required")
	}
	if !dialAny && !thisMachine(addr) {
		return fmt.Errorf("--addr %s: not an address of this machine (no --dial-any)", addr)
	}
	if id == "" {
		id = uuid.New().String()
	}
	md := map[string]string{"protocol": "mucp", "registry": reg.String()}
	for _, kv := range strings.Split(metadata, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			md[k] = v
		}
	}
	svc := &registry.Service{
		Name:    name,
		Version: version,
		Nodes:   []*registry.Node{{Id: name + "-" + id, Address: addr, Metadata: md}},
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	if err := reg.Register(svc, registry.RegisterTTL(ttl)); err != nil {
		return err
	}
	out.event("registered", svc.Nodes[0].Id)
	// As rpcServer.registrar: re-register every RegisterInterval (a renewal of the lease
	// with KeepAliveOnce while the node is unchanged).
	tick := time.NewTicker(ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if err := reg.Register(svc, registry.RegisterTTL(ttl)); err != nil {
				out.event("error", "Register: "+err.Error())
			}
		case <-sigs:
			return reg.Deregister(svc)
		}
	}
}

var out = &printer{}

type printer struct{ mu sync.Mutex }

func (p *printer) event(event, detail string) {
	p.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "event": event, "detail": detail})
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

func thisMachine(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return false
	}
	if ip.IsLoopback() {
		return true
	}
	// Loopback only: an address of one of this machine's interfaces could be reachable
	// from elsewhere.
	return false
}
