// Kratos consumer: resolves a service through Kratos's own etcd registry
// (contrib/registry/etcd: GetService, then Watch), and registers as a Kratos app does:
// kratos.New with a gRPC transport server on --addr and that registry as its Registrar.
//
//	kratos resolve --endpoints=http://127.0.0.1:2379 --service=<name> [--dial [--dial-any]]
//	kratos register --endpoints=... --service=<name> --addr=127.0.0.x:PORT [--id=...] [--ttl=SECONDS] [--metadata=k=v,...] [--version=...]
//
// Each instance prints the registry.ServiceInstance fields (id, name, version, metadata,
// endpoints) and "addr": the host of its insecure grpc:// endpoint, which is what Kratos's
// gRPC resolver hands to grpc ("" when it has none: that resolver skips the instance).
// --dial calls grpc.health.v1.Health/Check every 200 ms through a Kratos gRPC client
// (endpoint discovery:///<name>) and names the peer that answered. Kratos's logs go to
// stderr; its warnings and errors are also printed as error events.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"reflect"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	etcdreg "github.com/go-kratos/kratos/contrib/registry/etcd/v2"
	"github.com/go-kratos/kratos/v2"
	klog "github.com/go-kratos/kratos/v2/log"
	"github.com/go-kratos/kratos/v2/registry"
	kgrpc "github.com/go-kratos/kratos/v2/transport/grpc"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "resolve" && os.Args[1] != "register") {
		fmt.Fprintln(os.Stderr, "usage: kratos resolve|register --endpoints=... --service=... [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	endpoints := fs.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "service name")
	dial := fs.Bool("dial", false, "resolve: also call Health/Check through a Kratos gRPC client every 200 ms")
	dialAny := fs.Bool("dial-any", false, "with --dial, dial any address: only inside a sealed network namespace")
	addr := fs.String("addr", "", "register: ip:port the gRPC server listens on")
	id := fs.String("id", "", "register: instance id (default: Kratos's, a random UUID)")
	ttl := fs.Int("ttl", 15, "register: lease TTL in seconds (RegisterTTL)")
	metadata := fs.String("metadata", "", "register: k=v,... instance metadata")
	version := fs.String("version", "", "register: instance version")
	fs.Parse(os.Args[2:])
	if *service == "" {
		fmt.Fprintln(os.Stderr, "kratos: --service is required")
		os.Exit(2)
	}
	klog.SetLogger(errorEvents{klog.NewStdLogger(os.Stderr)})

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logger := zap.NewNop()
	etcd, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second, Logger: logger})
	if err != nil {
		fmt.Fprintln(os.Stderr, "kratos: etcd:", err)
		os.Exit(1)
	}
	defer etcd.Close()
	if cmd == "resolve" {
		err = resolve(ctx, etcd, *service, *dial, *dialAny)
	} else {
		stop() // kratos.App handles SIGTERM/SIGINT itself
		err = register(etcd, *service, *addr, *id, *version, *metadata, time.Duration(*ttl)*time.Second, *dialAny)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kratos:", err)
		os.Exit(1)
	}
}

type instance struct {
	Addr      string            `json:"addr"`
	ID        string            `json:"id"`
	Name      string            `json:"name"`
	Version   string            `json:"version"`
	Metadata  map[string]string `json:"metadata"`
	Endpoints []string          `json:"endpoints"`
}

func resolve(ctx context.Context, etcd *clientv3.Client, name string, dial, dialAny bool) error {
	reg := etcdreg.New(etcd)
	var last []instance
	printed := false
	show := func(ins []*registry.ServiceInstance) {
		set := make([]instance, 0, len(ins))
		for _, in := range ins {
			set = append(set, instance{grpcAddr(in.Endpoints), in.ID, in.Name, in.Version, in.Metadata, in.Endpoints})
		}
		sort.SliceStable(set, func(i, j int) bool { return set[i].Addr < set[j].Addr })
		if printed && reflect.DeepEqual(set, last) {
			return
		}
		printed, last = true, set
		out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "instances": set})
	}

	ins, err := reg.GetService(ctx, name)
	if err != nil {
		// One value under the prefix that is not a ServiceInstance fails the whole call.
		out.event("error", "GetService: "+err.Error(), "")
	} else {
		show(ins)
	}
	w, err := reg.Watch(ctx, name)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	defer w.Stop()
	out.event("watching", name, "")

	if dial {
		conn, err := kgrpc.DialInsecure(ctx,
			kgrpc.WithEndpoint("discovery:///"+name),
			kgrpc.WithDiscovery(reg),
			kgrpc.WithOptions(grpc.WithContextDialer(dialer(dialAny))),
		)
		if err != nil {
			return fmt.Errorf("dial discovery:///%s: %w", name, err)
		}
		defer conn.Close()
		go callLoop(ctx, healthpb.NewHealthClient(conn))
	}

	// The first Next is the watcher's own initial Get; then one Get per watch event.
	for {
		ins, err := w.Next()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			out.event("error", "Watch.Next: "+err.Error(), "")
			continue
		}
		show(ins)
	}
}

func callLoop(ctx context.Context, h healthpb.HealthClient) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		var p peer.Peer
		resp, err := h.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			out.event("error", "call: "+err.Error(), "")
			continue
		}
		out.event("called", resp.GetStatus().String(), p.Addr.String())
	}
}

// grpcAddr is what Kratos's gRPC resolver dials for an insecure client: the host of the
// first endpoint with scheme "grpc" (internal/endpoint.ParseEndpoint).
func grpcAddr(endpoints []string) string {
	for _, e := range endpoints {
		u, err := url.Parse(e)
		if err != nil {
			return ""
		}
		if u.Scheme == "grpc" {
			return u.Host
		}
	}
	return ""
}

func register(etcd *clientv3.Client, name, addr, id, version, metadata string, ttl time.Duration, dialAny bool) error {
	if addr == "" {
		return errors.New("--addr is required")
	}
	if !dialAny && !thisMachine(addr) {
		return fmt.Errorf("--addr %s: %w", addr, errNotThisMachine)
	}
	md := map[string]string{}
	for _, kv := range strings.Split(metadata, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			md[k] = v
		}
	}
	srv := kgrpc.NewServer(kgrpc.Address(addr)) // serves grpc.health.v1 itself
	opts := []kratos.Option{
		kratos.Name(name),
		kratos.Version(version),
		kratos.Metadata(md),
		kratos.Server(srv),
		kratos.Registrar(etcdreg.New(etcd, etcdreg.RegisterTTL(ttl))),
		kratos.AfterStart(func(context.Context) error {
			out.event("registered", name, addr)
			return nil
		}),
	}
	if id != "" {
		opts = append(opts, kratos.ID(id))
	}
	// Run registers after the servers start, and on SIGTERM/SIGINT deregisters, then stops them.
	return kratos.New(opts...).Run()
}

type errorEvents struct{ klog.Logger }

func (l errorEvents) Log(level klog.Level, keyvals ...any) error {
	if level >= klog.LevelWarn {
		out.event("error", level.String()+": "+fmt.Sprint(keyvals...), "")
	}
	return l.Logger.Log(level, keyvals...)
}

var out = &printer{}

type printer struct{ mu sync.Mutex }

func (p *printer) event(event, detail, addr string) {
	m := map[string]any{"t_unix_nanos": time.Now().UnixNano(), "event": event}
	if detail != "" {
		m["detail"] = detail
	}
	if addr != "" {
		m["addr"] = addr
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

var errNotThisMachine = errors.New("not an address of this machine: refusing to dial it (no --dial-any)")

// dialer refuses, before any socket is opened, every address that is not this machine's.
func dialer(dialAny bool) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		if !dialAny && !thisMachine(addr) {
			out.event("error", "refused_dial: "+errNotThisMachine.Error(), addr)
			return nil, errNotThisMachine
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
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
