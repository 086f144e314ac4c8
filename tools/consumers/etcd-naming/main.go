// etcd-resolve is a real consumer of podlease's etcd-naming format: it resolves
// etcd:///<service> through etcd's own gRPC naming resolver
// (go.etcd.io/etcd/client/v3/naming/resolver), exactly as a grpc-go client does
// (grpc.Dial with the resolver builder), and prints every state the resolver hands to the
// ClientConn as one JSON line on stdout:
//
//	{"t_unix_nanos":1700000000123456789,"addrs":["127.0.0.2:8080","127.0.0.3:8080"]}
//
// addrs is sorted and keeps duplicates. Other lines carry an "event" instead of "addrs":
// "watching" once the resolver's initial Get is done and its Watch runs (the resolver sends
// no update while the prefix is empty), "state" with the channel's connectivity under
// --dial, "refused_dial" for an address the dialer would not touch, "resolver_error" if the
// resolver reports one. The etcd client's warnings (e.g.
// "unmarshal endpoint update failed" for a value the resolver cannot decode) go to stderr
// as zap JSON lines.
//
// Without --dial the channel never opens a connection: its dialer refuses every address.
// With --dial it keeps the connection open through the round_robin balancer, so the
// channel dials what it resolves, as in production; even then it only dials addresses of
// this machine (loopback or a local interface's address) and refuses anything else, so it
// can never reach into a pod network. --dial-any lifts that for a consumer started inside a
// network namespace with no route off the machine (the node tests' sealed namespace, where
// pod addresses are real and no packet can leave): it then dials every address, as a
// client in the cluster would.
//
// `register` publishes one address as a grpc-go server using etcd's naming would: an
// endpoints.Manager AddEndpoint under a lease kept alive, serving the standard gRPC health
// service on --addr so that --dial connects; on SIGTERM/SIGINT it deletes the endpoint.
// It prints {"t_unix_nanos":N,"event":"registered","detail":"<key>"}.
//
//	etcd-resolve [resolve] --endpoints=127.0.0.1:2379 --service=<svc> [--dial [--dial-any]]
//	etcd-resolve register --endpoints=127.0.0.1:2379 --service=<svc> --addr=127.0.0.x:PORT [--ttl=SECONDS]
package main

import (
	"context"
	"encoding/json"
	"errors"
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

	clientv3 "go.etcd.io/etcd/client/v3"
	etcdresolver "go.etcd.io/etcd/client/v3/naming/resolver"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
)

func main() {
	// The subcommand is optional: without one, this resolves (as tests/support/consumer.rs runs it).
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "resolve":
			os.Args = append(os.Args[:1], os.Args[2:]...)
		case "register":
			os.Exit(registerMain(os.Args[2:]))
		}
	}
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := flag.String("service", "", "service name to resolve as etcd:///<service> (required)")
	dial := flag.Bool("dial", false, "keep a connection open through round_robin (dials only addresses of this machine)")
	dialAny := flag.Bool("dial-any", false, "with --dial, dial every resolved address: only inside a network namespace with no route off the machine")
	dialTimeout := flag.Duration("etcd-dial-timeout", 5*time.Second, "how long to wait for etcd at start")
	flag.Parse()
	if *dialAny && !*dial {
		fmt.Fprintln(os.Stderr, "etcd-resolve: --dial-any needs --dial")
		os.Exit(2)
	}
	if *service == "" {
		fmt.Fprintln(os.Stderr, "etcd-resolve: --service is required (the name after etcd:///)")
		os.Exit(2)
	}
	if err := run(strings.Split(*endpoints, ","), *service, *dial, *dialAny, *dialTimeout); err != nil {
		fmt.Fprintln(os.Stderr, "etcd-resolve:", err)
		os.Exit(1)
	}
}

func run(endpoints []string, service string, dial, dialAny bool, dialTimeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	out := &printer{}

	logger, err := warnLogger()
	if err != nil {
		return err
	}
	etcd, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: dialTimeout, Logger: logger})
	if err != nil {
		return fmt.Errorf("connect to etcd %v: %w", endpoints, err)
	}
	defer etcd.Close()
	inner, err := etcdresolver.NewBuilder(etcd)
	if err != nil {
		return fmt.Errorf("etcd resolver builder: %w", err)
	}

	opts := []grpc.DialOption{
		grpc.WithResolvers(observedBuilder{inner: inner, out: out}),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// An idle channel closes its resolver: this one must watch for as long as it runs.
		grpc.WithIdleTimeout(0),
		grpc.WithNoProxy(),
	}
	if dial {
		opts = append(opts,
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				if dialAny {
					var d net.Dialer
					return d.DialContext(ctx, "tcp", addr)
				}
				conn, err := dialThisMachineOnly(ctx, addr)
				if err == errNotThisMachine {
					out.event("refused_dial", addr)
				}
				return conn, err
			}))
	} else {
		opts = append(opts, grpc.WithContextDialer(dialNothing))
	}
	// grpc.Dial (not NewClient) leaves idle mode at once, so the resolver is built now.
	cc, err := grpc.Dial("etcd:///"+service, opts...)
	if err != nil {
		return fmt.Errorf("dial etcd:///%s: %w", service, err)
	}
	defer cc.Close()
	if dial {
		cc.Connect()
		go func() {
			for s := cc.GetState(); ; s = cc.GetState() {
				out.event("state", s.String())
				if s == connectivity.Shutdown || !cc.WaitForStateChange(ctx, s) {
					return
				}
			}
		}()
	}
	<-ctx.Done()
	return nil
}

// warnLogger writes the etcd client's warnings and errors to stderr as JSON, unsampled,
// so that every value the resolver fails to decode shows.
func warnLogger() (*zap.Logger, error) {
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(zap.WarnLevel)
	cfg.Sampling = nil
	cfg.OutputPaths = []string{"stderr"}
	cfg.ErrorOutputPaths = []string{"stderr"}
	return cfg.Build()
}

// observedBuilder is etcd's builder, with a ClientConn in between that prints what the
// resolver reports before grpc sees it.
type observedBuilder struct {
	inner resolver.Builder
	out   *printer
}

func (b observedBuilder) Scheme() string { return b.inner.Scheme() }

func (b observedBuilder) Build(t resolver.Target, cc resolver.ClientConn, o resolver.BuildOptions) (resolver.Resolver, error) {
	r, err := b.inner.Build(t, observedConn{ClientConn: cc, out: b.out}, o)
	if err != nil {
		return nil, err
	}
	b.out.event("watching", t.URL.String())
	return r, nil
}

type observedConn struct {
	resolver.ClientConn
	out *printer
}

func (c observedConn) UpdateState(s resolver.State) error {
	addrs := []string{}
	for _, e := range s.Endpoints {
		for _, a := range e.Addresses {
			addrs = append(addrs, a.Addr)
		}
	}
	if len(s.Endpoints) == 0 {
		for _, a := range s.Addresses {
			addrs = append(addrs, a.Addr)
		}
	}
	sort.Strings(addrs)
	c.out.addrs(addrs)
	// grpc refuses an empty state (the balancer has nothing to pick); the etcd resolver
	// ignores that error, as a watch-based resolver may, so pass it on unchanged.
	return c.ClientConn.UpdateState(s)
}

func (c observedConn) ReportError(err error) {
	c.out.event("resolver_error", err.Error())
	c.ClientConn.ReportError(err)
}

// printer writes one JSON line per call, whole, in one write.
type printer struct{ mu sync.Mutex }

func (p *printer) addrs(addrs []string) {
	p.line(struct {
		T     int64    `json:"t_unix_nanos"`
		Addrs []string `json:"addrs"`
	}{time.Now().UnixNano(), addrs})
}

func (p *printer) event(event, detail string) {
	p.line(struct {
		T      int64  `json:"t_unix_nanos"`
		Event  string `json:"event"`
		Detail string `json:"detail"`
	}{time.Now().UnixNano(), event, detail})
}

func (p *printer) line(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only strings and integers: cannot fail
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

func dialNothing(_ context.Context, addr string) (net.Conn, error) {
	return nil, fmt.Errorf("not dialling %s: started without --dial", addr)
}

var errNotThisMachine = errors.New("not an address of this machine: only loopback and local interface addresses are dialled")

// dialThisMachineOnly dials loopback addresses and this machine's own interface addresses,
// and refuses any other (a pod IP, a hostname) before opening a socket.
func dialThisMachineOnly(ctx context.Context, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, errNotThisMachine
	}
	ip := net.ParseIP(host)
	if ip == nil || !isThisMachine(ip) {
		return nil, errNotThisMachine
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// isThisMachine: loopback only (an address of one of this machine's interfaces could be
// reachable from elsewhere).
func isThisMachine(ip net.IP) bool {
	return ip.IsLoopback()
}
