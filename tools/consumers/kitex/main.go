// kitex-consumer resolves a service through kitex-contrib/registry-etcd's own resolver, as a
// Kitex client does, and registers a Kitex server through that module's own registry. It
// checks that what podlease writes under kitex/registry-etcd/<svc>/ is what Kitex reads.
//
//	kitex-consumer resolve  --endpoints=http://127.0.0.1:2379 --service=user [--dial [--dial-any]]
//	kitex-consumer register --endpoints=... --service=user --addr=127.0.0.5:9000 [--ttl=S] [--metadata=k=v,...]
//
// The resolver has no watch: Kitex's client calls Resolve again every 5 s (lbcache's
// RefreshInterval) and keeps its last good result when Resolve fails. resolve polls the
// same Resolve every 100 ms and prints the set whenever it changes. An empty prefix is an
// error to this resolver ("no instance remains"); that prints as an error event and an
// empty set.
//
// --dial makes a real call every 200 ms through genericclient with the resolver
// (client.WithResolver), using binary generic calls so no IDL code is generated: the
// request and reply are thrift structs encoded by hand. register serves that method.
// Only addresses of this machine are dialled unless --dial-any is given.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudwego/gopkg/protocol/thrift"
	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/genericclient"
	"github.com/cloudwego/kitex/pkg/discovery"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/generic"
	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/pkg/registry"
	kitexnetpoll "github.com/cloudwego/kitex/pkg/remote/trans/netpoll"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"
	"github.com/cloudwego/kitex/server/genericserver"
	etcd "github.com/kitex-contrib/registry-etcd"
)

// The IDL service and method the generic client and server agree on (no IDL file exists).
const (
	idlService = "Echo"
	idlMethod  = "echo"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	endpoints := fs.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "service name (required)")
	dial := fs.Bool("dial", false, "resolve: also call the service every 200 ms")
	dialAny := fs.Bool("dial-any", false, "with --dial, dial any address (only inside a sealed network namespace)")
	addr := fs.String("addr", "", "register: host:port to serve and register")
	ttl := fs.Int("ttl", 0, "register: lease TTL in seconds (registry-etcd's KITEX_ETCD_REGISTRY_LEASE_TTL; default 60)")
	metadata := fs.String("metadata", "", "register: k=v,... registered as the instance's tags")
	fs.String("id", "", "register: ignored (Kitex instances have no id)")
	fs.String("version", "", "register: ignored (Kitex instances have no version)")
	fs.Parse(os.Args[2:])
	if *service == "" {
		usage()
	}
	eps := strings.Split(*endpoints, ",")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "resolve":
		err = resolve(ctx, eps, *service, *dial, *dialAny)
	case "register":
		err = register(eps, *service, *addr, *ttl, *metadata)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kitex-consumer:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kitex-consumer resolve|register --endpoints=... --service=NAME [flags]")
	os.Exit(2)
}

type instance struct {
	Addr    string            `json:"addr"`
	Network string            `json:"network"`
	Weight  int               `json:"weight"`
	Tags    map[string]string `json:"tags"`
}

func resolve(ctx context.Context, endpoints []string, service string, dial, dialAny bool) error {
	// The resolver's decode failures are klog warnings: surface them as error events.
	klog.SetOutput(klogEvents{})
	r, err := etcd.NewEtcdResolver(endpoints)
	if err != nil {
		return err
	}
	desc := r.Target(ctx, rpcinfo.NewEndpointInfo(service, idlMethod, nil, nil))
	if dial {
		cli, err := genericclient.NewClient(service, generic.BinaryThriftGenericV2(idlService),
			client.WithResolver(r),
			client.WithDialer(guardDialer{dialAny}),
			client.WithRPCTimeout(time.Second),
			client.WithMiddleware(answeredBy))
		if err != nil {
			return err
		}
		go callLoop(ctx, cli)
	}
	var last, lastErr string
	first := true
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		res, err := r.Resolve(ctx, desc)
		errText := ""
		if err != nil {
			errText = err.Error()
		}
		if errText != lastErr && errText != "" {
			out.event("error", errText)
		}
		lastErr = errText
		// "no instance remains" is how this resolver says the set is empty; on any other
		// error keep the last set, as the client's cache does.
		if err == nil || strings.HasPrefix(errText, "no instance remains") || first {
			set := instances(res.Instances)
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
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func instances(in []discovery.Instance) []instance {
	set := []instance{}
	for _, i := range in {
		inst := instance{Addr: i.Address().String(), Network: i.Address().Network(), Weight: i.Weight()}
		if t, ok := i.(interface{ Tags() map[string]string }); ok {
			inst.Tags = t.Tags()
		}
		set = append(set, inst)
	}
	sort.SliceStable(set, func(a, b int) bool { return set[a].Addr < set[b].Addr })
	return set
}

type calledKey struct{}

// answeredBy records the instance the load balancer picked, once the call has returned.
func answeredBy(next endpoint.Endpoint) endpoint.Endpoint {
	return func(ctx context.Context, req, resp any) error {
		err := next(ctx, req, resp)
		if p, ok := ctx.Value(calledKey{}).(*string); ok {
			if ri := rpcinfo.GetRPCInfo(ctx); ri != nil && ri.To() != nil && ri.To().Address() != nil {
				*p = ri.To().Address().String()
			}
		}
		return err
	}
}

func callLoop(ctx context.Context, cli genericclient.Client) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var addr string
		reply, err := cli.GenericCall(context.WithValue(ctx, calledKey{}, &addr), idlMethod, stringStruct(1, "ping"))
		if err != nil {
			out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "event": "error", "addr": addr, "detail": err.Error()})
			continue
		}
		b, _ := reply.([]byte)
		s, err := readStringStruct(b, 0)
		if err != nil {
			s = fmt.Sprintf("undecodable reply %x: %v", b, err)
		}
		out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "event": "called", "addr": addr, "detail": s})
	}
}

// stringStruct encodes a thrift struct whose only field (id) is a string: an args struct
// (id 1) or a result struct (id 0, "success").
func stringStruct(id int16, s string) []byte {
	b := thrift.Binary.AppendFieldBegin(nil, thrift.STRING, id)
	b = thrift.Binary.AppendString(b, s)
	return thrift.Binary.AppendFieldStop(b)
}

func readStringStruct(b []byte, id int16) (string, error) {
	if len(b) < 3 || thrift.TType(b[0]) != thrift.STRING || int16(b[1])<<8|int16(b[2]) != id {
		return "", fmt.Errorf("not a struct with string field %d", id)
	}
	s, _, err := thrift.Binary.ReadString(b[3:])
	return s, err
}

func register(endpoints []string, service, addr string, ttl int, metadata string) error {
	tcp, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil || addr == "" {
		return fmt.Errorf("--addr must be host:port: %q", addr)
	}
	if ttl > 0 {
		// registry-etcd reads its lease TTL from this variable only.
		os.Setenv("KITEX_ETCD_REGISTRY_LEASE_TTL", fmt.Sprint(ttl))
	}
	tags := map[string]string{}
	for _, kv := range strings.Split(metadata, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			tags[k] = v
		}
	}
	r, err := etcd.NewEtcdRegistry(endpoints)
	if err != nil {
		return err
	}
	// The server has no IDL either: it takes every method as raw thrift (the way Kitex
	// recommends for binary generic servers, since a plain thrift request names no service).
	echo := func(ctx context.Context, svc, method string, req any) (any, error) {
		b, _ := req.([]byte)
		msg, err := readStringStruct(b, 1)
		if err != nil {
			return nil, err
		}
		return stringStruct(0, fmt.Sprintf("%s(%q) answered by %s", method, msg, addr)), nil
	}
	svr := genericserver.NewUnknownServiceOrMethodServer(&genericserver.UnknownServiceOrMethodHandler{DefaultHandler: echo},
		server.WithServiceAddr(tcp),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: service, Tags: tags}),
		server.WithRegistry(announced{r}),
		server.WithExitWaitTime(time.Second))
	// Run returns on SIGINT/SIGTERM after Stop, which deregisters through the registry.
	if err := svr.Run(); err != nil {
		return err
	}
	out.event("deregistered", "")
	return nil
}

// announced prints "registered" once Kitex's server has registered (a second after start).
type announced struct{ registry.Registry }

func (a announced) Register(info *registry.Info) error {
	if err := a.Registry.Register(info); err != nil {
		out.event("error", "register: "+err.Error())
		return err
	}
	out.event("registered", info.Addr.String())
	return nil
}

// guardDialer is Kitex's netpoll dialer, refusing any address not of this machine.
type guardDialer struct{ any bool }

func (g guardDialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	if !g.any && !thisMachine(address) {
		return nil, fmt.Errorf("refusing to dial %s: not an address of this machine (use --dial-any only in a sealed namespace)", address)
	}
	return kitexnetpoll.NewDialer().DialTimeout(network, address, timeout)
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

// klogEvents turns the resolver's warnings into error events (once while they repeat).
type klogEvents struct{}

var (
	klogMu   sync.Mutex
	klogSeen = map[string]time.Time{}
)

func (klogEvents) Write(p []byte) (int, error) {
	os.Stderr.Write(p)
	line := strings.TrimSpace(string(p))
	// Only the resolver's decode failures; retries and refresh failures stay on stderr.
	i := strings.Index(line, "fail to unmarshal")
	if i < 0 {
		return len(p), nil
	}
	detail := line[i:]
	klogMu.Lock()
	seen, ok := klogSeen[detail]
	klogSeen[detail] = time.Now()
	klogMu.Unlock()
	if !ok || time.Since(seen) > 2*time.Second {
		out.event("error", detail)
	}
	return len(p), nil
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
