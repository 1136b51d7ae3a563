// containerd-stargz-grpc for imagefs' benchmark: a minimal remote-snapshotter daemon built from
// Debian's packaged stargz-snapshotter library (golang-github-containerd-stargz-snapshotter-dev),
// which ships the library but not the daemon. It serves containerd's snapshots API over gRPC on a
// unix socket; containerd reaches it as a proxy plugin. Built by scripts/stargz-peer-build.
//
// It wires the fs and snapshot packages directly: the library's service and service/resolver
// packages import k8s.io/cri-api, which Debian 12 does not package. Registry hosts come from the
// config's [resolver] section (same layout as upstream's):
//
//	[[resolver.host."127.0.0.1:5000".mirrors]]
//	host = "127.0.0.1:5000"
//	insecure = true            # plain HTTP
//
// Anonymous pulls only (no keychain). Other top-level keys are stargz's fs config (fs/config).
//
// Flags: --address SOCKET, --root DIR, --config FILE (optional), --log-level LEVEL.
// SIGINT/SIGTERM stop serving, unmount every layer it mounted and exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

type mirror struct {
	Host       string `toml:"host"`
	Insecure   bool   `toml:"insecure"`
	TimeoutSec int    `toml:"request_timeout_sec"` // 0: 30 s; < 0: none
}

type config struct {
	fsconfig.Config
	Resolver struct {
		Host map[string]struct {
			Mirrors []mirror `toml:"mirrors"`
		} `toml:"host"`
	} `toml:"resolver"`
}

// registryHosts lists, for an image reference, the configured mirrors of its registry followed
// by the registry itself. Localhost / 127.0.0.1 and insecure mirrors are spoken to over HTTP.
func registryHosts(cfg *config) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		name := ref.Hostname()
		var hosts []docker.RegistryHost
		for _, m := range append(cfg.Resolver.Host[name].Mirrors, mirror{Host: name}) {
			client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
			switch {
			case m.TimeoutSec == 0:
				client.Timeout = 30 * time.Second
			case m.TimeoutSec > 0:
				client.Timeout = time.Duration(m.TimeoutSec) * time.Second
			}
			h := docker.RegistryHost{
				Client:       client,
				Host:         m.Host,
				Scheme:       "https",
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
			}
			if local, _ := docker.MatchLocalhost(h.Host); local || m.Insecure {
				h.Scheme = "http"
			}
			if h.Host == "docker.io" {
				h.Host = "registry-1.docker.io"
			}
			hosts = append(hosts, h)
		}
		return hosts, nil
	}
}

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve the snapshots API on")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory (snapshots and FUSE mounts)")
	configPath := flag.String("config", "", "optional TOML config file")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: bad --log-level: %v\n", err)
		os.Exit(2)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			log.G(ctx).WithError(err).Fatalf("cannot load config %q", *configPath)
		}
	}

	snRoot := filepath.Join(*root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0700); err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot create %q", snRoot)
	}
	if err := overlayutils.Supported(snRoot); err != nil {
		log.G(ctx).WithError(err).Fatalf("overlayfs is not usable under %q", snRoot)
	}
	opaque := layer.OverlayOpaqueTrusted
	if user, err := overlayutils.NeedsUserXAttr(snRoot); err == nil && user {
		opaque = layer.OverlayOpaqueUser
	}

	hosts := registryHosts(&cfg)
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg.Config,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(opaque))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the stargz filesystem")
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the snapshotter")
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the socket's directory")
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot listen on %q", *address)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.G(ctx).WithField("address", *address).Info("serving the snapshots API")

	select {
	case s := <-sigs:
		log.G(ctx).Infof("got %v; shutting down", s)
	case err := <-served:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	srv.Stop()
	// Close unmounts every layer this snapshotter mounted.
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing the snapshotter")
	}
	_ = os.Remove(*address)
	log.G(ctx).Info("exiting")
}
