// hertz-consumer resolves a service through hertz-contrib/registry/etcd's own resolver, as a
// Hertz client with the sd.Discovery middleware does, and registers a Hertz server through
// that module's own registry. It checks that what podlease writes under
// hertz/registry-etcd/<svc>/ is what Hertz reads.
//
//	hertz-consumer resolve  --endpoints=http://127.0.0.1:2379 --service=user [--dial [--dial-any]]
//	hertz-consumer register --endpoints=... --service=user --addr=127.0.0.5:9000 [--ttl=S] [--metadata=k=v,...]
//
// The resolver has no watch: the sd middleware's balancer cache calls Resolve again every
// 5 s (loadbalance.DefaultRefreshInterval) and keeps its last result when Resolve fails.
// resolve polls the same Resolve every 100 ms and prints the set whenever it changes.
//
// --dial makes a real GET / every 200 ms through a Hertz client with sd.Discovery(resolver)
// and config.WithSD(true); register serves that route. Only addresses of this machine are
// dialled unless --dial-any is given.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
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

	"github.com/cloudwego/hertz/pkg/app"
	"github.com/cloudwego/hertz/pkg/app/client"
	"github.com/cloudwego/hertz/pkg/app/client/discovery"
	"github.com/cloudwego/hertz/pkg/app/middlewares/client/sd"
	"github.com/cloudwego/hertz/pkg/app/server"
	"github.com/cloudwego/hertz/pkg/app/server/registry"
	"github.com/cloudwego/hertz/pkg/common/config"
	"github.com/cloudwego/hertz/pkg/common/hlog"
	"github.com/cloudwego/hertz/pkg/common/utils"
	"github.com/cloudwego/hertz/pkg/network"
	"github.com/cloudwego/hertz/pkg/network/dialer"
	"github.com/cloudwego/hertz/pkg/protocol"
	etcd "github.com/hertz-contrib/registry/etcd"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	endpoints := fs.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "service name (required)")
	dial := fs.Bool("dial", false, "resolve: also GET / every 200 ms")
	dialAny := fs.Bool("dial-any", false, "with --dial, dial any address (only inside a sealed network namespace)")
	addr := fs.String("addr", "", "register: host:port to serve and register")
	ttl := fs.Int("ttl", 0, "register: lease TTL in seconds (the registry's HERTZ_ETCD_REGISTRY_LEASE_TTL; default 60)")
	metadata := fs.String("metadata", "", "register: k=v,... registered as the instance's tags")
	fs.String("id", "", "register: ignored (Hertz instances have no id)")
	fs.String("version", "", "register: ignored (Hertz instances have no version)")
	fs.Parse(os.Args[2:])
	if *service == "" {
		usage()
	}
	eps := strings.Split(*endpoints, ",")
	var err error
	switch os.Args[1] {
	case "resolve":
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err = resolve(ctx, eps, *service, *dial, *dialAny)
	case "register":
		err = register(eps, *service, *addr, *ttl, *metadata)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hertz-consumer:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: hertz-consumer resolve|register --endpoints=... --service=NAME [flags]")
	os.Exit(2)
}

type instance struct {
	Addr    string            `json:"addr"`
	Network string            `json:"network"`
	Weight  int               `json:"weight"`
	Tags    map[string]string `json:"tags"`
}

func resolve(ctx context.Context, endpoints []string, service string, dial, dialAny bool) error {
	// The resolver's decode failures are hlog warnings: surface them as error events.
	hlog.SetOutput(hlogEvents{})
	r, err := etcd.NewEtcdResolver(endpoints)
	if err != nil {
		return err
	}
	// The sd middleware takes the request's host as the target.
	desc := r.Target(ctx, &discovery.TargetInfo{Host: service})
	if dial {
		cli, err := client.NewClient(client.WithDialer(guardDialer{dialer.DefaultDialer(), dialAny}),
			client.WithDialTimeout(time.Second), client.WithClientReadTimeout(time.Second))
		if err != nil {
			return err
		}
		cli.Use(sd.Discovery(r))
		go callLoop(ctx, cli, service)
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
		// On an error keep the last set, as the balancer cache does.
		if err == nil || first {
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
		set = append(set, instance{Addr: i.Address().String(), Network: i.Address().Network(), Weight: i.Weight(), Tags: tags(i)})
	}
	sort.SliceStable(set, func(a, b int) bool { return set[a].Addr < set[b].Addr })
	return set
}

// tags reads the instance's tag map. Hertz's Instance only offers Tag(key), so the map the
// client holds is read (not changed) through reflection.
func tags(i discovery.Instance) map[string]string {
	v := reflect.ValueOf(i)
	if v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil
	}
	f := v.FieldByName("tags")
	if !f.IsValid() || f.Kind() != reflect.Map || f.IsNil() {
		return nil
	}
	m := map[string]string{}
	for it := f.MapRange(); it.Next(); {
		m[it.Key().String()] = it.Value().String()
	}
	return m
}

func callLoop(ctx context.Context, cli *client.Client, service string) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		req, resp := protocol.AcquireRequest(), protocol.AcquireResponse()
		req.SetRequestURI("http://" + service + "/")
		req.SetMethod("GET")
		req.SetOptions(config.WithSD(true))
		err := cli.Do(ctx, req, resp)
		// sd.Discovery has replaced the host with the instance it picked.
		addr := string(req.Host())
		m := map[string]any{"t_unix_nanos": time.Now().UnixNano(), "addr": addr}
		switch {
		case err != nil:
			m["event"], m["detail"] = "error", err.Error()
		case resp.StatusCode() != 200:
			m["event"], m["detail"] = "error", fmt.Sprintf("HTTP %d: %s", resp.StatusCode(), resp.Body())
		default:
			m["event"], m["detail"] = "called", string(resp.Body())
		}
		out.line(m)
		protocol.ReleaseRequest(req)
		protocol.ReleaseResponse(resp)
	}
}

func register(endpoints []string, service, addr string, ttl int, metadata string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("--addr must be host:port: %q", addr)
	}
	if ttl > 0 {
		// The registry reads its lease TTL from this variable only.
		os.Setenv("HERTZ_ETCD_REGISTRY_LEASE_TTL", fmt.Sprint(ttl))
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
	h := server.New(server.WithHostPorts(addr),
		server.WithExitWaitTime(time.Second),
		server.WithRegistry(announced{r}, &registry.Info{
			ServiceName: service,
			Addr:        utils.NewNetAddr("tcp", addr),
			Weight:      registry.DefaultWeight,
			Tags:        tags,
		}))
	h.GET("/", func(ctx context.Context, c *app.RequestContext) {
		c.String(200, "GET / answered by %s", addr)
	})
	// Spin registers a second after start and, on SIGINT/SIGTERM, deregisters in Shutdown.
	h.Spin()
	out.event("deregistered", "")
	return nil
}

// announced prints "registered" once Hertz has registered the instance.
type announced struct{ registry.Registry }

func (a announced) Register(info *registry.Info) error {
	if err := a.Registry.Register(info); err != nil {
		out.event("error", "register: "+err.Error())
		return err
	}
	out.event("registered", info.Addr.String())
	return nil
}

// guardDialer is Hertz's default dialer, refusing any address not of this machine.
type guardDialer struct {
	network.Dialer
	any bool
}

func (g guardDialer) check(address string) error {
	if !g.any && !thisMachine(address) {
		return fmt.Errorf("refusing to dial %s: not an address of this machine (use --dial-any only in a sealed namespace)", address)
	}
	return nil
}

func (g guardDialer) DialConnection(n, address string, timeout time.Duration, tlsConfig *tls.Config) (network.Conn, error) {
	if err := g.check(address); err != nil {
		return nil, err
	}
	return g.Dialer.DialConnection(n, address, timeout, tlsConfig)
}

func (g guardDialer) DialTimeout(n, address string, timeout time.Duration, tlsConfig *tls.Config) (net.Conn, error) {
	if err := g.check(address); err != nil {
		return nil, err
	}
	return g.Dialer.DialTimeout(n, address, timeout, tlsConfig)
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

// hlogEvents turns the resolver's decode warnings into error events (once while they repeat).
type hlogEvents struct{}

var (
	hlogMu   sync.Mutex
	hlogSeen = map[string]time.Time{}
)

func (hlogEvents) Write(p []byte) (int, error) {
	os.Stderr.Write(p)
	line := strings.TrimSpace(string(p))
	i := strings.Index(line, "fail to unmarshal")
	if i < 0 {
		return len(p), nil
	}
	detail := line[i:]
	hlogMu.Lock()
	seen, ok := hlogSeen[detail]
	hlogSeen[detail] = time.Now()
	hlogMu.Unlock()
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
