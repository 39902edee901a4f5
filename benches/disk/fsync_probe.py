#!/usr/bin/env python3
"""fdatasync latency of this disk, the ways the durable log could write (docs/perf/durable.md).

usage: python3 benches/disk/fsync_probe.py DIR   (DIR on the disk the agent's data_dir is on)

Each line: p50 / p90 / p99 in microseconds over 400 operations. Python's own overhead per call
is a few microseconds (see "buffered pwrite only").
"""
import mmap
import os
import sys
import threading
import time

N = 400
REC = b"\x07" * 200


def pct(xs):
    xs = sorted(xs)
    n = len(xs)
    return "p50 %4d us  p90 %4d  p99 %4d  mean %4d" % (
        xs[n // 2] * 1e6, xs[int(n * .9)] * 1e6, xs[min(n - 1, int(n * .99))] * 1e6,
        sum(xs) / n * 1e6)


def timed(f):
    ts = []
    for i in range(N):
        t = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t)
    return pct(ts)


def main(d):
    p = os.path.join(d, "fsync-probe")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    print("(a) append 200 B + fdatasync:          ",
          timed(lambda i: (os.pwrite(fd, REC, i * 200), os.fdatasync(fd))))
    os.close(fd)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, b"\0" * (8 << 20), 0)
    os.fsync(fd)
    print("(b) overwrite zero-filled 200 B + fdatasync:",
          timed(lambda i: (os.pwrite(fd, REC, i * 200), os.fdatasync(fd))))
    print("    fdatasync with nothing dirty:      ", timed(lambda i: os.fdatasync(fd)))
    print("    buffered pwrite only:              ",
          timed(lambda i: os.pwrite(fd, REC, (1 << 20) + i * 200)))
    os.fdatasync(fd)
    os.close(fd)
    fd = os.open(p, os.O_RDWR | os.O_DSYNC)
    print("(c) O_DSYNC pwrite 200 B (overwrite):  ",
          timed(lambda i: os.pwrite(fd, REC, (2 << 20) + i * 200)))
    os.close(fd)
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(b"\x05" * 4096)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    print("    O_DIRECT 4 KiB pwrite, no flush:   ",
          timed(lambda i: os.pwritev(fd, [buf], (3 << 20) + i * 4096)))
    print("    O_DIRECT 4 KiB pwrite + fdatasync: ",
          timed(lambda i: (os.pwritev(fd, [buf], (5 << 20) + i * 4096), os.fdatasync(fd))))
    os.close(fd)
    for k in (1, 2, 4):
        fd = os.open(p, os.O_RDWR)
        res, lock = [], threading.Lock()

        def w(j):
            loc = []
            for i in range(N // k):
                t = time.perf_counter()
                os.pwrite(fd, REC, (7 << 20) + (j * 1000 + i) * 200)
                os.fdatasync(fd)
                loc.append(time.perf_counter() - t)
            with lock:
                res.extend(loc)

        t0 = time.perf_counter()
        th = [threading.Thread(target=w, args=(j,)) for j in range(k)]
        for x in th:
            x.start()
        for x in th:
            x.join()
        print("    overwrite + fdatasync, %d threads:  %5.0f syncs/s, %s" % (
            k, len(res) / (time.perf_counter() - t0), pct(res)))
        os.close(fd)
    os.unlink(p)


if __name__ == "__main__":
    main(sys.argv[1])
