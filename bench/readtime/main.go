// readtime FILE: read FILE sequentially in 1 MiB reads and print "BYTES NANOSECONDS".
//
// The startup benchmark's sequential-read workload runs it inside a busybox container: busybox
// has no clock finer than 10 ms, and a warm 200 MB read takes a few tens of milliseconds.
// Built static (CGO_ENABLED=0) so it runs in any image.
package main

import (
	"fmt"
	"io"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: readtime FILE")
		os.Exit(2)
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	buf := make([]byte, 1<<20)
	start := time.Now()
	var total int64
	for {
		n, err := f.Read(buf)
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
			os.Exit(1)
		}
	}
	fmt.Printf("%d %d\n", total, time.Since(start).Nanoseconds())
}
