// containerd 1.6's snapshotter conformance suite (snapshots/testsuite), run against lazysnap
// through containerd's own proxy client, exactly as containerd would talk to it.
//
// Each subtest gets a fresh root from the suite; we start one `lazysnap serve` on it (the closest
// to how upstream runs its snapshotters) and stop it with SIGTERM in the cleanup, which must exit 0.
//
// Environment:
//
//	LAZYSNAP_SERVE  command line that starts the daemon, split on spaces (default "lazysnap serve");
//	                "--root ROOT --address SOCKET" are appended.
//	LAZYSNAP_CONFORMANCE_LOGS  directory to keep each daemon's log in (default: deleted with
//	                the subtest's temp dir).
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

const (
	startTimeout = 60 * time.Second
	stopTimeout  = 30 * time.Second
)

func serveCommand() []string {
	if cmd := strings.Fields(os.Getenv("LAZYSNAP_SERVE")); len(cmd) > 0 {
		return cmd
	}
	return []string{"lazysnap", "serve"}
}

// waitForSocket returns once the daemon accepts connections, or an error naming its log.
func waitForSocket(socket string, daemon *exec.Cmd, exited <-chan error, logPath string) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("lazysnap serve exited before listening on %s (%v); log %s:\n%s",
				socket, err, logPath, readLog(logPath))
		default:
		}
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("lazysnap serve did not listen on %s within %s; log %s:\n%s",
		socket, startTimeout, logPath, readLog(logPath))
}

func readLog(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return string(data)
}

func newLazysnap(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	// The suite's root is short-lived; keep the daemon's state and socket inside it so the
	// suite's RemoveAll cleans everything. Unix socket paths are limited to 108 bytes.
	state := filepath.Join(root, "lazysnap")
	socket := filepath.Join(root, "s.sock")
	// The suite deletes root's parent when the subtest ends: keep the daemon's log elsewhere
	// when asked to, named like that parent (which the suite prints for a failed subtest).
	logPath := filepath.Join(filepath.Dir(root), "lazysnap.log")
	if dir := os.Getenv("LAZYSNAP_CONFORMANCE_LOGS"); dir != "" {
		logPath = filepath.Join(dir, filepath.Base(filepath.Dir(root))+".log")
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	args := append(serveCommand(), "--root", state, "--address", socket)
	daemon := exec.Command(args[0], args[1:]...)
	daemon.Stdout = logFile
	daemon.Stderr = logFile
	// Own process group: a Ctrl-C of the test binary must not race our orderly SIGTERM.
	daemon.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := daemon.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("start %v: %w", args, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- daemon.Wait(); logFile.Close() }()

	stop := func() error {
		_ = daemon.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("lazysnap serve did not exit 0 on SIGTERM: %v; log:\n%s", err, readLog(logPath))
			}
			return nil
		case <-time.After(stopTimeout):
			_ = daemon.Process.Kill()
			<-exited
			return fmt.Errorf("lazysnap serve ignored SIGTERM for %s; killed; log:\n%s", stopTimeout, readLog(logPath))
		}
	}

	if err := waitForSocket(socket, daemon, exited, logPath); err != nil {
		_ = daemon.Process.Kill()
		return nil, nil, err
	}
	// Same dial options containerd uses for its proxy plugins.
	conn, err := grpc.Dial(dialer.DialAddress(socket), grpc.WithInsecure(),
		grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazysnap")
	cleanup := func() error {
		conn.Close()
		return stop()
	}
	return sn, cleanup, nil
}

func TestLazysnapConformance(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("must run as root: the suite mounts the snapshots it gets back")
	}
	testsuite.SnapshotterSuite(t, "lazysnap", newLazysnap)
}
