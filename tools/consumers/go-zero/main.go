// go-zero consumer: resolves a service through go-zero's own core/discov Subscriber (the
// one its zrpc etcd resolver is built on), and registers through a zrpc server, whose
// publisher writes `<key>/<lease id>` = listen address, as every go-zero RPC service does.
//
//	go-zero resolve --endpoints=http://127.0.0.1:2379 --service=<key> [--dial [--dial-any]]
//	go-zero register --endpoints=... --service=<key> --addr=127.0.0.x:PORT [--id=N] [--ttl=SECONDS]
//
// The Subscriber hands out only the distinct values under `<key>/`, so an instance is just
// {"addr"}. --dial calls grpc.health.v1.Health/Check every 200 ms through a zrpc client
// (target etcd, p2c_ewma balancer, as configured by RpcClientConf) and names the peer
// that answered. go-zero's own logs go to stderr; its error-level logs (the subscriber
// cannot read etcd, a watch fails) are also printed as error events.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/zeromicro/go-zero/core/conf"
	"github.com/zeromicro/go-zero/core/discov"
	"github.com/zeromicro/go-zero/core/logx"
	"github.com/zeromicro/go-zero/core/proc"
	"github.com/zeromicro/go-zero/zrpc"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "resolve" && os.Args[1] != "register") {
		fmt.Fprintln(os.Stderr, "usage: go-zero resolve|register --endpoints=... --service=... [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	endpoints := fs.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "the discov key (the service name)")
	dial := fs.Bool("dial", false, "resolve: also call Health/Check through a zrpc client every 200 ms")
	dialAny := fs.Bool("dial-any", false, "with --dial, dial any address: only inside a sealed network namespace")
	addr := fs.String("addr", "", "register: ip:port to listen on and publish")
	id := fs.Int64("id", 0, "register: key suffix instead of the lease id (EtcdConf.ID)")
	ttl := fs.Int64("ttl", 0, "register: lease TTL in seconds (discov.TimeToLive; default go-zero's 10)")
	fs.String("metadata", "", "register: ignored, go-zero publishes only the address")
	fs.String("version", "", "register: ignored, go-zero publishes only the address")
	fs.Parse(os.Args[2:])
	if *service == "" {
		fmt.Fprintln(os.Stderr, "go-zero: --service is required")
		os.Exit(2)
	}
	setupLogs()
	// go-zero takes etcd hosts as host:port (the zrpc target is etcd://h1,h2/key).
	var hosts []string
	for _, e := range strings.Split(*endpoints, ",") {
		hosts = append(hosts, strings.TrimPrefix(strings.TrimPrefix(e, "http://"), "https://"))
	}
	var err error
	if cmd == "resolve" {
		err = resolve(hosts, *service, *dial, *dialAny)
	} else {
		err = register(hosts, *service, *addr, *id, *ttl, *dialAny)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-zero:", err)
		os.Exit(1)
	}
}

func resolve(hosts []string, key string, dial, dialAny bool) error {
	sub, err := discov.NewSubscriber(hosts, key)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	var last []string
	printed := false
	emit := func() {
		vals := slices.Clone(sub.Values())
		slices.Sort(vals)
		mu.Lock()
		defer mu.Unlock()
		if printed && slices.Equal(vals, last) {
			return
		}
		printed, last = true, vals
		insts := make([]map[string]any, 0, len(vals))
		for _, v := range vals {
			insts = append(insts, map[string]any{"addr": v})
		}
		out.line(map[string]any{"t_unix_nanos": time.Now().UnixNano(), "instances": insts})
	}
	// NewSubscriber returns after its initial prefix Get, with the watch started.
	out.event("watching", key, "")
	sub.AddListener(emit)
	emit()

	if dial {
		var c zrpc.RpcClientConf
		if err := conf.FillDefault(&c); err != nil {
			return err
		}
		c.Etcd = discov.EtcdConf{Hosts: hosts, Key: key}
		// Its only effect is an error log per failed call, which would repeat our error events.
		c.Middlewares.Duration = false
		cli, err := zrpc.NewClient(c, zrpc.WithDialOption(grpc.WithContextDialer(dialer(dialAny))))
		if err != nil {
			return err
		}
		health := healthpb.NewHealthClient(cli.Conn())
		go func() {
			for range time.Tick(200 * time.Millisecond) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				var p peer.Peer
				resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p))
				cancel()
				if err != nil {
					out.event("error", "call: "+err.Error(), "")
					continue
				}
				out.event("called", resp.GetStatus().String(), p.Addr.String())
			}
		}()
	}
	<-proc.Done()
	return nil
}

func register(hosts []string, key, addr string, id, ttl int64, dialAny bool) error {
	if err := canServe(addr, dialAny); err != nil {
		return err
	}
	if ttl > 0 {
		discov.TimeToLive = ttl
	}
	var c zrpc.RpcServerConf
	if err := conf.FillDefault(&c); err != nil {
		return err
	}
	c.Name = key
	c.ListenOn = addr
	c.Etcd = discov.EtcdConf{Hosts: hosts, Key: key, ID: id}
	c.Health = true // zrpc registers grpc.health.v1 itself
	// On by default: an HTTP server on :6060 (all interfaces), which a second instance on
	// this machine could not bind.
	c.DevServer.Enabled = false
	c.Log = logx.LogConf{Mode: "console", Encoding: "json", Level: "info"}
	srv, err := zrpc.NewServer(c, func(*grpc.Server) {
		// Called after the publisher's KeepAlive put the key, before Serve.
		out.event("registered", key, addr)
	})
	if err != nil {
		return err
	}
	// go-zero handles SIGTERM/SIGINT itself: wrap-up listeners stop the publisher (which
	// revokes its lease), then after 1 s the server stops gracefully and Start returns.
	srv.Start()
	return nil
}

// setupLogs sends logx to stderr (its console mode writes to stdout, which is ours), and
// copies error-level logs to stdout as error events.
func setupLogs() {
	logx.SetUp(logx.LogConf{Mode: "console", Encoding: "json", Level: "info"})
	logx.SetWriter(errorEvents{logx.NewWriter(os.Stderr)})
}

type errorEvents struct{ logx.Writer }

func (w errorEvents) Error(v any, fields ...logx.LogField) {
	out.event("error", fmt.Sprint(v), "")
	w.Writer.Error(v, fields...)
}

func (w errorEvents) Severe(v any) {
	out.event("error", fmt.Sprint(v), "")
	w.Writer.Severe(v)
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

func canServe(addr string, dialAny bool) error {
	if addr == "" {
		return errors.New("--addr is required")
	}
	if !dialAny && !thisMachine(addr) {
		return fmt.Errorf("--addr %s: %w", addr, errNotThisMachine)
	}
	return nil
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
