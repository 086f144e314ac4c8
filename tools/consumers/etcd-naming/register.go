package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func registerMain(args []string) int {
	fs := flag.NewFlagSet("register", flag.ExitOnError)
	eps := fs.String("endpoints", "127.0.0.1:2379", "etcd endpoints, comma-separated")
	service := fs.String("service", "", "service name (the target's path, etcd:///<service>)")
	addr := fs.String("addr", "", "host:port to serve on and publish (loopback only)")
	ttl := fs.Int64("ttl", 10, "lease TTL, seconds")
	fs.Parse(args)
	if *service == "" || *addr == "" {
		fmt.Fprintln(os.Stderr, "etcd-resolve register: --service and --addr are required")
		return 2
	}
	if err := register(strings.Split(*eps, ","), *service, *addr, *ttl); err != nil {
		fmt.Fprintln(os.Stderr, "etcd-resolve register:", err)
		return 1
	}
	return 0
}

func register(eps []string, service, addr string, ttl int64) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	out := &printer{}
	if host, _, err := net.SplitHostPort(addr); err != nil || net.ParseIP(host) == nil || !net.ParseIP(host).IsLoopback() {
		return fmt.Errorf("--addr %q: only a loopback ip:port is served", addr)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(lis)
	defer srv.Stop()

	logger, err := warnLogger()
	if err != nil {
		return err
	}
	etcd, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: logger})
	if err != nil {
		return err
	}
	defer etcd.Close()
	em, err := endpoints.NewManager(etcd, service)
	if err != nil {
		return err
	}
	lease, err := etcd.Grant(ctx, ttl)
	if err != nil {
		return err
	}
	key := service + "/" + addr
	if err := em.AddEndpoint(ctx, key, endpoints.Endpoint{Addr: addr}, clientv3.WithLease(lease.ID)); err != nil {
		return err
	}
	ka, err := etcd.KeepAlive(ctx, lease.ID)
	if err != nil {
		return err
	}
	out.event("registered", key)
	for range ka {
	}
	if ctx.Err() == nil {
		return fmt.Errorf("lease %x keepalive ended", lease.ID)
	}
	dctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := em.DeleteEndpoint(dctx, key); err != nil {
		return err
	}
	_, err = etcd.Revoke(dctx, lease.ID)
	return err
}
