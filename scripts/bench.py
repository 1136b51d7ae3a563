#!/usr/bin/env python3
"""The benchmark behind docs/benchmarks.md (run it through scripts/bench).

Builds the bench images in code (examples/bench_image.rs), serves them from a local registry
(distribution) on 127.0.0.1, and measures imagefs side by side with a peer in the same run:
A/B runs alternate, each side starts cold when the row says so (empty cache or output
directory, then `echo 3 > /proc/sys/vm/drop_caches`). Every figure is the median of RUNS
runs with its min and max; ratios are imagefs / peer medians (for throughput rows: peer time
/ imagefs time, i.e. imagefs speed as a fraction of the peer's). Rows C have three sides:
containerd with the imagefs snapshotter, with stargz-snapshotter, and alone (overlayfs).
Rows V convert images to eStargz registry to registry: `imagefs convert` against containerd's
`ctr content fetch` + `ctr-remote image convert` + `ctr image push`.
Everything it starts is stopped on exit.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from stargz_peer import StargzPeer, PeerError, mountpoints, umount_under, _terminate, _under  # noqa: E402
IMAGEFS = ROOT / "target/release/imagefs"
GEN = ROOT / "target/release/examples/bench_image"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    """Run a shell command; fail loudly."""
    r = subprocess.run(cmd, shell=True, executable="/bin/bash", text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if r.returncode != 0:
        raise SystemExit(f"bench: `{cmd}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def drop_caches():
    subprocess.run("sync", shell=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd):
    t = time.perf_counter()
    sh(cmd)
    return time.perf_counter() - t


class Ctd:
    """A private containerd (Debian's 1.6; own root, state, sockets and config under `work`,
    nothing on TCP) for rows C: with `snapshotter=True`, `imagefs snapshotter` beside it as
    its proxy plugin `imagefs` (cache and snapshotter root under `work`, default options),
    else only its built-in snapshotters (overlayfs, the default). stop() stops both, any shim
    left and unmounts everything under `work`."""

    def __init__(self, work, snapshotter, args=()):
        self.work = Path(work)
        self.snapshotter = snapshotter
        self.args = list(args)  # after `snapshotter`
        self.sock = self.work / "c.sock"
        self.procs = {}

    def _spawn(self, name, argv):
        with open(self.work / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log, start_new_session=True)

    def _wait(self, name, sock, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise PeerError(f"{name} exited while starting:\n{self.log(name)}")
            if sock.exists():
                return
            time.sleep(0.02)
        raise PeerError(f"{name} did not create {sock} in {timeout} s:\n{self.log(name)}")

    def log(self, name):
        try:
            return "\n".join((self.work / f"{name}.log").read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def start(self):
        self.work.mkdir(parents=True, exist_ok=True)
        w = self.work
        proxy = (f'[proxy_plugins.imagefs]\n  type = "snapshot"\n  address = "{w}/s.sock"\n'
                 if self.snapshotter else "")
        (w / "config.toml").write_text(f"""\
version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/opt"
{proxy}""")
        try:
            if self.snapshotter:
                self._spawn("snapshotter", [str(IMAGEFS), "--cache-dir", str(w / "cache"),
                                            "snapshotter", "--address", str(w / "s.sock")] + self.args)
                self._wait("snapshotter", w / "s.sock")
            self._spawn("containerd", ["containerd", "--config", str(w / "config.toml"),
                                       "--log-level", "warn"])
            self._wait("containerd", self.sock)
            want = "imagefs" if self.snapshotter else "overlayfs"
            deadline = time.monotonic() + 30
            while True:
                out = subprocess.run(["ctr", "--address", str(self.sock), "plugins", "ls"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
                if any(l.split()[:2] == ["io.containerd.snapshotter.v1", want] and l.split()[-1] == "ok"
                       for l in out.splitlines()):
                    break
                if time.monotonic() > deadline:
                    raise PeerError(f"containerd does not list the {want} snapshotter as ok:\n{out}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        stop_ctd(self.sock, self.work, self.procs.pop("containerd", None))
        p = self.procs.pop("snapshotter", None)
        if p is not None:  # SIGTERM: it unmounts its views
            _terminate(p.pid, 15, p)
        umount_under(self.work)


def stop_ctd(sock, work, popen):
    """Kill the tasks a containerd at `sock` still runs, stop it (if `popen`), and any shim
    of it left (a shim's command line names the socket, which is under `work`)."""
    if Path(sock).exists() and (popen is None or popen.poll() is None):
        ctr = ["ctr", "--address", str(sock)]

        def q(*a):
            try:
                return subprocess.run(ctr + list(a), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, timeout=60).stdout
            except subprocess.TimeoutExpired:
                return ""
        for tid in q("task", "ls", "-q").split():
            log(f"killing a task left in the containerd in {work}: {tid}")
            q("task", "kill", "-s", "SIGKILL", tid)
            time.sleep(0.2)
            q("task", "delete", "-f", tid)
    if popen is not None:
        _terminate(popen.pid, 15, popen)
    needle = str(work).encode()
    for pid, argv in processes():
        if argv[0].endswith(b"containerd-shim-runc-v2") and any(needle in a for a in argv):
            log(f"stopping a shim left by the containerd in {work}: {pid}")
            _terminate(pid, 15)


def processes():
    """(pid, argv) of every process whose command line can be read."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0]:
            yield int(d.name), argv


class Stat:
    def __init__(self, samples):
        self.samples = list(samples)
        self.median = statistics.median(self.samples)
        self.min = min(self.samples)
        self.max = max(self.samples)

    def fmt(self, unit="s", scale=1.0, digits=3):
        f = lambda v: f"{v * scale:.{digits}f}"
        return f"{f(self.median)} {unit} ({f(self.min)}–{f(self.max)})"


class Bench:
    def __init__(self, args):
        self.args = args
        self.runs = args.runs
        self.work = Path(tempfile.mkdtemp(prefix="imagefs-bench.", dir="/var/tmp"))
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()
        self.fresh = 0
        self.new_cache()
        self.registry_dir = self.work / "registry"
        self.addr = None
        self.rows = {}
        self.commands = {}
        self.pushed = 0

    # -- plumbing ---------------------------------------------------------------------------

    def new_dir(self, kind):
        """An empty directory no earlier run used. Cold runs get new directories and nothing is
        deleted until the end: on ext4 without a journal (these machines), creating inodes
        right after deleting thousands makes the allocator skip every recently deleted one
        (`find_inode_bit` → `recently_deleted`, half of a run's time in a profile), which
        would measure the benchmark's own clean-up rather than either side."""
        self.fresh += 1
        d = self.work / "runs" / f"{kind}-{self.fresh}"
        d.parent.mkdir(exist_ok=True)
        return d

    def new_cache(self):
        """Point every imagefs command at a new, empty cache."""
        self.cache = self.new_dir("cache")
        os.environ["IMAGEFS_CACHE_DIR"] = str(self.cache)

    def cleanup(self):
        self.umount_all()
        if getattr(self, "ctd", None):
            try:
                self.ctd.stop()
            except Exception as e:  # keep cleaning up
                log(f"stopping a containerd: {e}")
        if getattr(self, "peer", None):
            try:
                self.peer.stop()
            except Exception as e:  # keep cleaning up
                log(f"stopping the stargz peer: {e}")
        if self.addr:
            subprocess.run(["bash", str(ROOT / "scripts/registry"), "stop", str(self.registry_dir)])
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def mounted(self, path):
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)

    def umount_all(self):
        for p in [self.mnt, self.work / "sq"]:
            if p.exists() and self.mounted(p):
                subprocess.run(["fusermount3", "-u", str(p)], stderr=subprocess.DEVNULL)
                if self.mounted(p):
                    subprocess.run(["umount", "-l", str(p)], stderr=subprocess.DEVNULL)
        # The daemon exits when its session ends; wait so the next run starts clean.
        for _ in range(100):
            if not self.mount_pids():
                break
            time.sleep(0.05)

    def mount_pids(self):
        """The mount's processes: its keeper and the keeper's child, the server."""
        needle = str(self.mnt).encode()
        return [pid for pid, argv in processes()
                if argv[0].endswith(b"imagefs") and b"mount" in argv and needle in argv]

    def imagefs(self, args):
        return f"{IMAGEFS} {args}"

    def ref(self, tag):
        return f"{self.addr}/bench/{tag}:latest"

    def access_log_lines(self):
        return (self.registry_dir / "registry.log").read_text(errors="replace").count(
            "response completed")

    def blob_bytes_served(self, since_line, digests):
        """Bytes the registry wrote for GETs of the given blobs, after log line since_line."""
        total = 0
        lines = (self.registry_dir / "registry.log").read_text(errors="replace").splitlines()
        count = 0
        for line in lines:
            if "response completed" not in line:
                continue
            count += 1
            if count <= since_line:
                continue
            m = re.search(r"http.request.method=GET .*http.request.uri=\S*/blobs/(sha256:[0-9a-f]+)", line)
            if m and m.group(1) in digests:
                w = re.search(r"http.response.written=(\d+)", line)
                total += int(w.group(1)) if w else 0
        return total

    def requests_since(self, since_line):
        return self.access_log_lines() - since_line

    # -- setup ------------------------------------------------------------------------------

    def setup(self):
        log(f"work dir {self.work}")
        images = self.work / "images"
        t = time.perf_counter()
        sh(f"{GEN} {images}" + (" --skip-big" if self.args.quick else ""))
        log(f"images written in {time.perf_counter() - t:.1f} s")
        self.addr = sh(f"bash {ROOT}/scripts/registry start {self.registry_dir}").strip()
        index = json.loads((images / "index.json").read_text())
        self.tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        self.manifests = {}
        for m in index["manifests"]:
            tag = m["annotations"]["org.opencontainers.image.ref.name"]
            manifest = json.loads((images / "blobs/sha256" / m["digest"][7:]).read_text())
            self.manifests[tag] = (m["digest"], manifest)
            t = time.perf_counter()
            sh(f"skopeo copy -q --dest-tls-verify=false oci:{images}:{tag} docker://{self.ref(tag)}")
            log(f"pushed {tag} in {time.perf_counter() - t:.1f} s")
        shutil.rmtree(images)

    def layer_digests(self, tag):
        return {l["digest"] for l in self.manifests[tag][1]["layers"]}

    def blob_size(self, tag):
        return sum(l["size"] for l in self.manifests[tag][1]["layers"])

    def by_digest(self, tag):
        return f"{self.addr}/bench/{tag}@{self.manifests[tag][0]}"

    # -- the two sides ----------------------------------------------------------------------

    def peer_pull_unpack(self, tag, then=""):
        oci, bundle = self.new_dir("peer-oci"), self.new_dir("peer-bundle")
        drop_caches()
        cmd = (f"skopeo copy -q --src-tls-verify=false docker://{self.ref(tag)} oci:{oci}:{tag} && "
               f"umoci unpack --image {oci}:{tag} {bundle} >/dev/null" +
               (f" && {then.replace('BUNDLE', str(bundle))}" if then else ""))
        t = timed(cmd)
        return t, cmd

    def imagefs_cold(self, cmd):
        self.umount_all()
        self.new_cache()
        drop_caches()
        t = timed(cmd)
        self.umount_all()
        return t

    def ab(self, name, a, b, labels=("imagefs", "peer")):
        """Alternate a() and b() RUNS times; each returns seconds."""
        xs, ys = [], []
        # One untimed round first: the registry keeps per-repository state in memory (blob
        # descriptors), and whichever side ran first would pay for it.
        a()
        b()
        for i in range(self.runs):
            xs.append(a())
            ys.append(b())
            log(f"{name} run {i + 1}: {labels[0]} {xs[-1]:.3f} s, {labels[1]} {ys[-1]:.3f} s")
        return Stat(xs), Stat(ys)

    # -- rows -------------------------------------------------------------------------------

    def row_first_read(self, key, tag, extra=""):
        cat = f"cat {self.mnt}/etc/os-release >/dev/null"
        a_cmd = self.imagefs(f"mount {extra}{self.ref(tag)} {self.mnt}") + f" && {cat}"
        peer_cmd = [None]

        def b():
            t, cmd = self.peer_pull_unpack(tag, then="cat BUNDLE/rootfs/etc/os-release >/dev/null")
            peer_cmd[0] = cmd
            return t

        a, b = self.ab(key, lambda: self.imagefs_cold(a_cmd), b)
        self.rows[key] = (a, b, a.median / b.median)
        self.commands[key] = (f"{a_cmd}  (then umount; cache emptied, caches dropped)", peer_cmd[0])

    def row_single(self):
        """Row 1s: first read of a single-layer gzip image against skopeo + umoci and against
        its floor, the layer downloaded and gunzipped with nothing written."""
        tag = "single-gzip"
        self.row_first_read("1s", tag)
        layer = self.manifests[tag][1]["layers"][0]["digest"]
        floor = f"curl -sf http://{self.addr}/v2/bench/{tag}/blobs/{layer} | gunzip >/dev/null"
        a_cmd = self.commands["1s"][0].split("  (")[0]
        a, f = self.ab("1s-floor", lambda: self.imagefs_cold(a_cmd),
                       lambda: (drop_caches(), timed(floor))[1])
        self.rows["1s-floor"] = (a, f, a.median / f.median)
        self.commands["1s-floor"] = ("as row 1s", floor)

    def row_materialise(self):
        tag = "realistic-gzip"
        a_cmd = self.imagefs(f"pull -q {self.ref(tag)}")
        peer_cmd = [None]

        def b():
            t, cmd = self.peer_pull_unpack(tag)
            peer_cmd[0] = cmd
            return t

        a, b = self.ab("3", lambda: self.imagefs_cold(a_cmd), b)
        self.rows["3"] = (a, b, a.median / b.median)
        self.commands["3"] = (a_cmd, peer_cmd[0])

    def row_bytes(self):
        tag = "realistic-estargz"
        fracs, served = [], []
        cmd = (self.imagefs(f"mount --prefetch none {self.ref(tag)} {self.mnt}") +
               f" && chroot {self.mnt} /bin/sh -c 'cat /etc/os-release' >/dev/null")
        total = self.blob_size(tag)
        for _ in range(self.runs):
            self.umount_all()
            self.new_cache()
            since = self.access_log_lines()
            sh(cmd)
            self.umount_all()
            time.sleep(0.2)  # the registry logs a response a moment after its last byte
            n = self.blob_bytes_served(since, self.layer_digests(tag))
            served.append(n)
            fracs.append(n / total)
        self.rows["4"] = (Stat(served), total, statistics.median(fracs))
        self.commands["4"] = (cmd + "  (bytes from the registry's access log)", f"blob size: {total} bytes")

    def wait_filled(self, tag, timeout=300):
        """Until `imagefs layers` shows every layer of `tag` local (the background fill done)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            states = [l.split("\t")[4] for l in sh(self.imagefs(f"layers {self.ref(tag)}")).splitlines()]
            if all(s in ("local", "cached") for s in states):
                return
            time.sleep(0.2)
        raise SystemExit(f"bench: the background fill of {tag} did not finish in {timeout} s")

    def row_fill_bytes(self):
        """Row 4b: every byte fetched once, with the default prefetch, a big read racing the
        background fill."""
        tag = "bigfile-estargz"
        total = self.blob_size(tag)
        fracs, served, rss = [], [], []
        cmd = (self.imagefs(f"mount {self.ref(tag)} {self.mnt}") +
               f" && cat {self.mnt}/big.bin >/dev/null")
        for i in range(self.runs):
            self.umount_all()
            self.new_cache()
            drop_caches()
            since = self.access_log_lines()
            sh(cmd)
            self.wait_filled(tag)
            rss.append(self.daemon_rss_mib())
            self.umount_all()
            time.sleep(0.2)
            n = self.blob_bytes_served(since, self.layer_digests(tag))
            served.append(n)
            fracs.append(n / total)
            log(f"4b run {i + 1}: {n:,} bytes from the registry, {n / total:.4f}× the blobs")
        self.rows["4b"] = (Stat(served), total, statistics.median(fracs), max(fracs), Stat(rss))
        self.commands["4b"] = (cmd + "; then `imagefs layers` polled until every layer is local "
                               "(bytes from the registry's access log)", f"sum of the layer blobs: {total} bytes")

    def row_readers_first(self):
        """Row 4c: the background fill yields to a reader: a cold read of the big file with the
        default prefetch against the same read with `--prefetch none`."""
        tag = "bigfile-estargz"
        read = f"dd if={self.mnt}/big.bin of=/dev/null bs=1M status=none"

        def side(extra):
            def run():
                self.umount_all()
                self.new_cache()
                drop_caches()
                sh(self.imagefs(f"mount {extra}{self.ref(tag)} {self.mnt}"))
                t = timed(read)
                self.umount_all()
                return t
            return run

        a, b = self.ab("4c", side(""), side("--prefetch none "))
        self.rows["4c"] = (a, b, a.median / b.median)
        self.commands["4c"] = (f"mount {self.ref(tag)} MNT (default prefetch), then timed: {read}",
                               f"the same with `mount --prefetch none`")
        # Row 4d: the floor of that read — the big file's layer fetched in one request and
        # gunzipped, no verification, nothing written.
        big_layer = self.manifests[tag][1]["layers"][-1]["digest"]
        floor = (f"curl -sf http://{self.addr}/v2/bench/{tag}/blobs/{big_layer} | gunzip >/dev/null")
        a, f = self.ab("4d", side("--prefetch none "), lambda: (drop_caches(), timed(floor))[1])
        self.rows["4d"] = (a, f, a.median / f.median)
        self.commands["4d"] = (f"as row 4c with --prefetch none", floor)

    def row_warm_lazy(self):
        """Row 4e: once every chunk of a lazy file is local, a warm re-read against the native
        disk (a copy of the file on the same filesystem, also warm)."""
        tag = "bigfile-estargz"
        self.umount_all()
        self.new_cache()
        sh(self.imagefs(f"mount {self.ref(tag)} {self.mnt}") + f" && cat {self.mnt}/big.bin >/dev/null")
        self.wait_filled(tag)
        native = self.new_dir("native-lazy")
        native.mkdir()
        sh(f"cp {self.mnt}/big.bin {native}/big.bin")
        read = "dd if={} of=/dev/null bs=1M status=none"
        mine, theirs = read.format(f"{self.mnt}/big.bin"), read.format(f"{native}/big.bin")
        sh(mine)
        sh(theirs)
        a, b = self.ab("4e", lambda: timed(mine), lambda: timed(theirs))
        self.umount_all()
        self.rows["4e"] = (a, b, b.median / a.median)
        self.commands["4e"] = (f"(mounted by default, big.bin read and the fill finished) {mine}", theirs)

    def daemon_rss_mib(self):
        """The mount's memory: its server's VmRSS plus what its keeper adds (RssAnon: the
        keeper's file-backed pages are the binary's, mapped by the server too)."""
        pids = self.mount_pids()
        total = None
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            # The server is the keeper's child; a lone process is a server of its own.
            key = "VmRSS:" if ppid in pids or len(pids) == 1 else "RssAnon:"
            for line in status.splitlines():
                if line.startswith(key):
                    total = (total or 0) + int(line.split()[1]) / 1024
        if total is None:
            raise SystemExit("bench: no VmRSS for the mount daemon")
        return total

    def daemon_read(self, path, cold):
        if cold:
            drop_caches()
        return timed(f"dd if={path} of=/dev/null bs=1M status=none")

    def row_big(self):
        tag = "big1g"
        self.umount_all()
        self.new_cache()
        sh(self.imagefs(f"pull -q {self.ref(tag)}"))
        native = self.work / "native"
        native.mkdir(exist_ok=True)
        sh(self.imagefs(f"--offline mount {self.by_digest(tag)} {self.mnt}"))
        sh(f"cp {self.mnt}/big.bin {native}/big.bin")
        self.umount_all()
        sq_img, sq = self.work / "big.squashfs", self.work / "sq"
        sq.mkdir(exist_ok=True)
        sh(f"mksquashfs {native} {sq_img} -noI -noD -noF -noX -quiet -no-progress >/dev/null")
        sh(f"squashfuse {sq_img} {sq}")
        sh(self.imagefs(f"--offline mount {self.by_digest(tag)} {self.mnt}"))
        res = {}
        for mode in ["cold", "warm"]:
            xs, ns, qs = [], [], []
            cold = mode == "cold"
            for i in range(self.runs):
                if not cold:
                    for p in [f"{self.mnt}/big.bin", f"{native}/big.bin", f"{sq}/big.bin"]:
                        sh(f"dd if={p} of=/dev/null bs=1M status=none")
                xs.append(self.daemon_read(f"{self.mnt}/big.bin", cold))
                ns.append(self.daemon_read(f"{native}/big.bin", cold))
                qs.append(self.daemon_read(f"{sq}/big.bin", cold))
                log(f"5 {mode} run {i + 1}: imagefs {xs[-1]:.3f} s, native {ns[-1]:.3f} s, squashfuse {qs[-1]:.3f} s")
            x, n, q = Stat(xs), Stat(ns), Stat(qs)
            res[mode] = (x, n, q, n.median / x.median, q.median / x.median)
        self.umount_all()
        (self.work / "native/big.bin").unlink()
        sq_img.unlink()
        self.rows["5"] = res
        self.commands["5"] = (
            "dd if=MNT/big.bin of=/dev/null bs=1M (mounted --offline by digest after `imagefs pull`; cold: caches dropped before each read)",
            f"dd if={native}/big.bin …; the same on squashfuse of `mksquashfs -noI -noD -noF -noX` of the file")

    def row_tree(self):
        tag = "tree20k"
        self.umount_all()
        self.new_cache()
        sh(self.imagefs(f"pull -q {self.ref(tag)}"))
        native = self.work / "native-tree"
        shutil.rmtree(native, ignore_errors=True)
        native.mkdir()
        sh(self.imagefs(f"--offline mount {self.by_digest(tag)} {self.mnt}"))
        sh(f"tar -C {self.mnt} -cf - tree | tar -C {native} -xf -")
        find = "find {d}/tree -printf '%s %m %u %T@\\n' >/dev/null"
        tar = "cd {d}/tree && tar cf - . | cat >/dev/null"
        res = {}
        # Default mount (passthrough), then `--no-passthrough` (zero-message opens).
        for mode in ["", "--no-passthrough"]:
            if mode:
                self.umount_all()
                sh(self.imagefs(f"--offline mount {mode} {self.by_digest(tag)} {self.mnt}"))
            for key, cmd in [("find", find), ("tar", tar)]:
                # Warm: one untimed pass each first.
                sh(cmd.format(d=self.mnt))
                sh(cmd.format(d=native))
                a, b = self.ab(f"6 {key} {mode}", lambda: timed(cmd.format(d=self.mnt)),
                               lambda: timed(cmd.format(d=native)))
                res[key + mode] = (a, b, a.median / b.median)
                self.commands[f"6{key}{mode}"] = (
                    f"(mounted {mode or 'by default'}) " + cmd.format(d="MNT"), cmd.format(d=str(native)))
        # Row 8 on the same mount: the daemon's resident set after walking everything.
        rss = [self.daemon_rss_mib()]
        self.umount_all()
        # (deleted with the work directory at the end; see `new_dir`)
        self.rows["6"] = res
        # Also the realistic image, walked and every file read.
        sh(self.imagefs(f"mount {self.ref('realistic-gzip')} {self.mnt}"))
        sh(f"tar -C {self.mnt} -cf - . | cat >/dev/null")
        rss.append(self.daemon_rss_mib())
        self.umount_all()
        self.rows["8"] = rss
        self.commands["8"] = ("VmRSS of the mount daemon after `find`+`tar` over the tree20k mount; "
                              "and after `tar cf - .` of the whole realistic-gzip mount", "")

    def row_remount(self):
        tag = "realistic-gzip"
        self.umount_all()
        self.new_cache()
        sh(self.imagefs(f"pull -q {self.ref(tag)}"))
        cmd = self.imagefs(f"mount {self.by_digest(tag)} {self.mnt}") + f" && cat {self.mnt}/etc/os-release >/dev/null"
        xs, reqs = [], []
        for i in range(self.runs):
            self.umount_all()
            drop_caches()
            since = self.access_log_lines()
            xs.append(timed(cmd))
            self.umount_all()
            time.sleep(0.1)
            reqs.append(self.requests_since(since))
            log(f"7 run {i + 1}: {xs[-1]:.3f} s, {reqs[-1]} registry requests")
        self.rows["7"] = (Stat(xs), max(reqs))
        self.commands["7"] = (cmd + "  (after `imagefs pull`; page caches dropped before each run)", "")

    def row_many(self):
        """Row 9: a layer of a million entries: the daemon's resident set and mount + `find`,
        cold, against `find` on the same tree extracted to the native disk, cold."""
        tag = "many1m"
        layer = self.manifests[tag][1]["layers"][0]["digest"]
        native = self.new_dir("native-many")
        native.mkdir()
        t = timed(f"curl -sf http://{self.addr}/v2/bench/{tag}/blobs/{layer} | tar -xzf - -C {native}")
        log(f"9: native tree extracted in {t:.1f} s")
        find = "find {d}/many >/dev/null"
        a_cmd = self.imagefs(f"mount {self.ref(tag)} {self.mnt}") + " && " + find.format(d=self.mnt)
        rss = []

        def a():
            self.umount_all()
            self.new_cache()
            drop_caches()
            t = timed(a_cmd)
            rss.append(self.daemon_rss_mib())
            self.umount_all()
            return t

        def b():
            drop_caches()
            return timed(find.format(d=native))

        x, n = self.ab("9", a, b)
        # The cost per entry: against the same walk of the 20,001-entry tree20k.
        base = []
        for _ in range(3):
            self.umount_all()
            self.new_cache()
            sh(self.imagefs(f"mount {self.ref('tree20k')} {self.mnt}") + f" && find {self.mnt} >/dev/null")
            base.append(self.daemon_rss_mib())
        self.umount_all()
        per_entry = (Stat(rss[1:]).median - statistics.median(base)) * 1048576 / (1_001_001 - 20_001)
        self.rows["9"] = (x, n, x.median / n.median, Stat(rss[1:]), statistics.median(base), per_entry)
        self.commands["9"] = (a_cmd + "  (cold: empty cache, caches dropped; then VmRSS of the daemon)",
                              find.format(d=native) + "  (caches dropped; the layer extracted with tar)")

    # -- containerd + stargz-snapshotter, side by side ----------------------------------------

    def stargz_rows(self):
        """Rows S: the eStargz rows against containerd + stargz-snapshotter 0.12 (default
        configuration: prefetch and background fetch on), on the same registry."""
        peer_bin = sh(f"bash {ROOT}/scripts/stargz-peer-build").strip()
        log(f"stargz peer: {peer_bin}")
        pm = self.work / "pm"
        res = {}

        def peer_done(mnt):
            # Unmounting the view leaves the layers mounted in the stargz daemon, whose
            # background fetch would go on into the next measurement: stop it.
            self.peer.umount(mnt)
            self.peer.stop()

        def peer_cold(ref_tag, then):
            # Cold: a new peer with empty state in a new directory (like imagefs' new cache:
            # nothing is deleted until the end, see `new_dir`), then caches dropped.
            self.peer = StargzPeer(self.new_dir("sgz"), self.addr)
            self.peer.start()
            drop_caches()
            t0 = time.perf_counter()
            self.peer.mount(f"bench/{ref_tag}:latest", pm)
            t1 = time.perf_counter()
            sh(then.format(d=pm))
            return t0, t1, time.perf_counter()

        def mine_cold(ref_tag, then, extra=""):
            self.umount_all()
            self.new_cache()
            drop_caches()
            t0 = time.perf_counter()
            sh(self.imagefs(f"mount {extra}{self.ref(ref_tag)} {self.mnt}"))
            t1 = time.perf_counter()
            sh(then.format(d=self.mnt))
            return t0, t1, time.perf_counter()

        def pair(ref_tag, then, from_mount, rss_a=None, rss_b=None):
            """The two sides of a cold row: each mounts `ref_tag` cold and runs `then`, and
            returns the seconds from the mount (from_mount) or from the end of the mount to
            the end of `then`; with rss lists, appends each daemon's RSS after it."""
            def side(cold, rss_of, rss, done):
                def run():
                    t0, t1, t2 = cold(ref_tag, then)
                    if rss is not None:
                        rss.append(rss_of())
                    done()
                    return t2 - (t0 if from_mount else t1)
                return run
            return (side(mine_cold, self.daemon_rss_mib, rss_a, self.umount_all),
                    side(peer_cold, lambda: self.peer.daemon_rss_mib(), rss_b, lambda: peer_done(pm)))

        # S2: mount → first small file.
        cat = "cat {d}/etc/os-release >/dev/null"
        res["2"] = self.ab("S2", *pair("realistic-estargz", cat, from_mount=True))

        # S4c: cold read of big.bin right after mount (both with their default prefetch).
        dd = "dd if={d}/big.bin of=/dev/null bs=1M status=none"
        res["4c"] = self.ab("S4c", *pair("bigfile-estargz", dd, from_mount=False))

        # S4b: registry bytes for mount + big read + the background fetch to the end; the
        # daemon's RSS then; and S4e: the warm re-read afterwards.
        tag = "bigfile-estargz"
        total = self.blob_size(tag)
        digests = self.layer_digests(tag)
        bytes_a, bytes_b, rss_a, rss_b, warm_a, warm_b = [], [], [], [], [], []

        def settle(since):
            """Registry bytes once they stop growing for 5 s (the peer has no `layers`)."""
            last, still = -1, 0
            deadline = time.perf_counter() + 300
            while time.perf_counter() < deadline:
                time.sleep(0.5)
                n = self.blob_bytes_served(since, digests)
                still = still + 1 if n == last else 0
                last = n
                if still >= 10:
                    return n
            raise SystemExit("bench: the peer's background fetch did not settle in 300 s")

        for i in range(self.runs):
            since = self.access_log_lines()
            mine_cold(tag, "cat {d}/big.bin >/dev/null")
            self.wait_filled(tag)
            rss_a.append(self.daemon_rss_mib())
            sh(dd.format(d=self.mnt))
            warm_a.append(timed(dd.format(d=self.mnt)))
            self.umount_all()
            time.sleep(0.2)
            bytes_a.append(self.blob_bytes_served(since, digests))
            since = self.access_log_lines()
            peer_cold(tag, "cat {d}/big.bin >/dev/null")
            bytes_b.append(settle(since))
            rss_b.append(self.peer.daemon_rss_mib())
            sh(dd.format(d=pm))
            warm_b.append(timed(dd.format(d=pm)))
            peer_done(pm)
            log(f"S4b run {i + 1}: imagefs {bytes_a[-1]:,} B {rss_a[-1]:.1f} MiB warm {warm_a[-1]:.3f} s; "
                f"stargz {bytes_b[-1]:,} B {rss_b[-1]:.1f} MiB warm {warm_b[-1]:.3f} s")
        res["4b"] = (Stat(bytes_a), Stat(bytes_b), total)
        res["4b'"] = (Stat(rss_a), Stat(rss_b))
        res["4e"] = (Stat(warm_a), Stat(warm_b))

        # S6: the 20k-entry eStargz image: mount, walk, read every file (cold), and the
        # daemon's RSS after.
        walk = "cd {d}/tree && find . -printf '%s %m %u %T@\\n' >/dev/null && tar cf - . | cat >/dev/null"
        rss6_a, rss6_b = [], []
        res["6"] = self.ab("S6", *pair("tree20k-estargz", walk, True, rss6_a, rss6_b))
        # The untimed first round of `ab` also recorded an RSS: keep the timed runs'.
        res["6'"] = (Stat(rss6_a[1:]), Stat(rss6_b[1:]))
        self.peer.stop()
        self.rows["S"] = res
        self.commands["S"] = (
            "as rows 2, 4b, 4c, 4e (default prefetch); S6: mount tree20k-estargz, then "
            + walk.format(d="MNT"),
            "containerd 1.6 + containerd-stargz-grpc (stargz-snapshotter 0.12 library, "
            "scripts/peers/stargz-grpc) with its default config: `ctr-remote images rpull "
            "--plain-http --snapshotter stargz REF`, `ctr snapshots view` of the top chain id and "
            "`mount -t overlay` of it; cold = its state and caches deleted and daemons restarted "
            "(a new StargzPeer on empty directories), caches dropped")

    # -- containerd: imagefs snapshotter, stargz-snapshotter, overlayfs -------------------------

    def ctd_first_output(self, sock, pull, snapshotter, ref, log_file):
        """`pull` (argv after `--address SOCK`), then `ctr run [--snapshotter S] --rm REF c cat
        /etc/os-release`: seconds from the start of the pull to the container's first output
        byte. The container runs to its end (and is deleted) before this returns."""
        pfx = ["--address", str(sock)]
        with open(log_file, "ab") as err:
            t0 = time.perf_counter()
            r = subprocess.run([pull[0]] + pfx + pull[1:], stdin=subprocess.DEVNULL,
                               stdout=err, stderr=err, timeout=600)
            if r.returncode != 0:
                raise PeerError(f"`{' '.join(pull)}` failed ({r.returncode}); see {log_file}")
            tp = time.perf_counter()
            snap = ["--snapshotter", snapshotter] if snapshotter else []
            p = subprocess.Popen(["ctr"] + pfx + ["run"] + snap + ["--rm", ref, "c", "cat", "/etc/os-release"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            try:
                first = p.stdout.read(1)
                t1 = time.perf_counter()
                out = first + p.stdout.read()
                p.wait(timeout=120)
            except BaseException:
                p.kill()
                p.wait()
                raise
        if p.returncode != 0 or b"imagefs-bench" not in out:
            raise PeerError(f"`ctr run … cat /etc/os-release` ({snapshotter or 'overlayfs'}) failed "
                            f"({p.returncode}), output {out[:200]!r}; see {log_file}")
        log(f"  {snapshotter or 'overlayfs'}: pull {tp - t0:.3f} s + run to the first output {t1 - tp:.3f} s")
        return t1 - t0

    def containerd_rows(self, keys):
        """Rows C1 (realistic-estargz) and C2 (realistic-gzip): containerd with the imagefs
        snapshotter (default options: prefetch landmark) against containerd with
        stargz-snapshotter (default config) and containerd's own pull + unpack into overlayfs:
        from the start of the pull to the first output of `ctr run … cat /etc/os-release`,
        cold; and the layer blob bytes the registry served. Each side of each run gets new
        daemons on new directories; they are stopped as soon as the container has exited."""
        sh(f"bash {ROOT}/scripts/stargz-peer-build")
        tags = [(k, t) for k, t in [("C1", "realistic-estargz"), ("C2", "realistic-gzip")] if k in keys]
        res = {}
        for key, tag in tags:
            ref = self.ref(tag)
            digests = self.layer_digests(tag)

            def side(start, stop, sock, pull, snapshotter, d):
                def run():
                    start()
                    drop_caches()
                    since = self.access_log_lines()
                    try:
                        t = self.ctd_first_output(sock(), pull, snapshotter, ref, d / "ctr.log")
                    finally:
                        stop()
                    time.sleep(0.2)  # the registry logs a response a moment after its last byte
                    return t, self.blob_bytes_served(since, digests)
                return run

            def imagefs_side():
                d = self.new_dir("ctd-imagefs")
                self.ctd = Ctd(d, snapshotter=True)
                return side(self.ctd.start, self.ctd.stop, lambda: self.ctd.sock,
                            ["ctr-remote", "image", "rpull", "--plain-http", "--snapshotter", "imagefs", ref],
                            "imagefs", d)()

            def stargz_side():
                d = self.new_dir("ctd-sgz")
                self.peer = StargzPeer(d, self.addr)

                def stop():
                    stop_ctd(self.peer.ctd_sock, d, None)  # tasks and shims; the rest is the peer's
                    self.peer.stop()
                return side(self.peer.start, stop, lambda: self.peer.ctd_sock,
                            ["ctr-remote", "image", "rpull", "--plain-http", "--snapshotter", "stargz", ref],
                            "stargz", d)()

            def overlay_side():
                d = self.new_dir("ctd-overlay")
                self.ctd = Ctd(d, snapshotter=False)
                return side(self.ctd.start, self.ctd.stop, lambda: self.ctd.sock,
                            ["ctr", "image", "pull", "--plain-http", ref], None, d)()

            sides = [imagefs_side, stargz_side, overlay_side]
            # One untimed round first, as in `ab`.
            for f in sides:
                f()
            got = [[] for _ in sides]
            for i in range(self.runs):
                for f, g in zip(sides, got):
                    g.append(f())
                log(f"{key} run {i + 1}: " + ", ".join(
                    f"{n} {g[-1][0]:.3f} s {g[-1][1]:,} B" for n, g in zip(["imagefs", "stargz", "overlayfs"], got)))
            res[key] = ([Stat(t for t, _ in g) for g in got], [Stat(b for _, b in g) for g in got],
                        self.blob_size(tag))
        self.ctd = None
        self.peer = None
        left = [mp for mp, _ in mountpoints() if _under(mp, self.work)]
        if left:
            raise SystemExit(f"bench: left mounted after rows C: {left}")
        self.rows["C"] = res
        version = sh("containerd --version").split()[2]
        self.commands["C"] = (
            f"imagefs --cache-dir NEW snapshotter --address SOCK (defaults: prefetch landmark) as "
            f"proxy_plugins.imagefs of a private containerd {version}; timed: ctr-remote image rpull "
            f"--plain-http --snapshotter imagefs REF, then ctr run --snapshotter imagefs --rm REF c cat "
            f"/etc/os-release up to its first output byte",
            "the same with containerd-stargz-grpc (default config, scripts/peers/stargz-grpc) as "
            "proxy_plugins.stargz and --snapshotter stargz; and containerd alone: ctr image pull "
            "--plain-http REF (fetch + unpack into overlayfs), then ctr run --rm REF c cat "
            "/etc/os-release. Every side of every run: new daemons on new directories (containerd "
            "root and state, imagefs cache, stargz root), then caches dropped; bytes: layer blob "
            "bytes in the registry's access log from the start of the pull until the daemons were "
            "stopped, right after the container exited")

    # -- conversion to eStargz: imagefs convert, containerd + ctr-remote ---------------------

    def conv_ref(self, kind):
        """A destination in a repository no run pushed to yet: nothing is "already there"."""
        self.pushed += 1
        return f"{self.addr}/bench/conv-{kind}-{self.pushed}:latest"

    def pushed_layers(self, ref):
        """(sum of the layer blob sizes, layers, layers with a TOC digest annotation) of the
        manifest the registry serves for `ref`."""
        m = json.loads(sh(f"skopeo inspect --raw --tls-verify=false docker://{ref}"))
        toc = sum(1 for l in m["layers"] if any(k.endswith("stargz/toc.digest")
                                                for k in l.get("annotations", {})))
        return sum(l["size"] for l in m["layers"]), len(m["layers"]), toc

    def convert_rows(self, keys):
        """Rows V1 (realistic-gzip) and V2 (many-layers): registry-to-registry conversion to
        eStargz, cold. imagefs: `imagefs convert SRC DST` on an empty cache. Peer: a private
        containerd 1.6 on new directories (started before the clock, stopped after), timed over
        `ctr content fetch` + `ctr-remote image convert --oci --estargz` + `ctr image push`.
        Both use their defaults (gzip level 9, 4 MiB chunks) and push to a new repository each
        run; bytes: the layer blobs of the manifest pushed."""
        tags = [(k, t) for k, t in [("V1", "realistic-gzip"), ("V2", "many-layers")] if k in keys]
        res = {}
        for key, tag in tags:
            src = self.ref(tag)

            def imagefs_side():
                self.new_cache()
                dst = self.conv_ref("imagefs")
                cmd = self.imagefs(f"convert -q {src} {dst}")
                drop_caches()
                t = time.perf_counter()
                out = sh(cmd)
                t = time.perf_counter() - t
                if "Digest: sha256:" not in out:
                    raise SystemExit(f"bench: `{cmd}` printed no digest:\n{out}")
                return t, self.pushed_layers(dst)

            def peer_side():
                d = self.new_dir("ctd-conv")
                self.ctd = Ctd(d, snapshotter=False)
                self.ctd.start()
                dst = self.conv_ref("peer")
                pfx = f"--address {self.ctd.sock}"
                out = f">>{d}/ctr.log"
                cmd = (f"ctr {pfx} content fetch --plain-http {src} {out} && "
                       f"ctr-remote {pfx} image convert --oci --estargz {src} {dst} {out} && "
                       f"ctr {pfx} image push --plain-http {dst} {out}")
                try:
                    drop_caches()
                    t = timed(cmd)
                finally:
                    self.ctd.stop()
                return t, self.pushed_layers(dst)

            # One untimed round first, as in `ab`.
            imagefs_side()
            peer_side()
            got = [[], []]
            for i in range(self.runs):
                for f, g in zip([imagefs_side, peer_side], got):
                    g.append(f())
                log(f"{key} run {i + 1}: " + ", ".join(
                    f"{n} {g[-1][0]:.3f} s, {g[-1][1][0]:,} B in {g[-1][1][1]} layers "
                    f"({g[-1][1][2]} with a TOC digest)" for n, g in zip(["imagefs", "peer"], got)))
            times = [Stat(t for t, _ in g) for g in got]
            pushed = [Stat(b[0] for _, b in g) for g in got]
            layers = [(g[-1][1][1], g[-1][1][2]) for g in got]
            res[key] = (times, pushed, layers, self.blob_size(tag))
        self.ctd = None
        self.rows["V"] = res
        version = sh("containerd --version").split()[2]
        self.commands["V"] = (
            self.imagefs(f"convert -q SRC {self.addr}/bench/conv-imagefs-N:latest") +
            "  (SRC = bench/realistic-gzip or bench/many-layers; new empty cache, caches dropped)",
            f"a private containerd {version} on new directories, started before the clock; timed: "
            "ctr content fetch --plain-http SRC && ctr-remote image convert --oci --estargz SRC DST && "
            f"ctr image push --plain-http DST (each with --address SOCK; DST = "
            f"{self.addr}/bench/conv-peer-N:latest; caches dropped)")

    def row_prioritized(self):
        """Row V3: the first read of a converted image with and without a recorded prefetch
        list. realistic-gzip is converted once as it is; a mount of that with `--record` runs
        the workload; the image is converted again with `--prioritize` the record. Then, cold,
        mount + the workload on each, interleaved."""
        tag = "realistic-gzip"
        # No /dev in the image: the output is thrown away outside the chroot.
        work = ("chroot {d} /bin/sh -c 'cat /etc/os-release /etc/passwd && cat /usr/bin/tool00 "
                "/usr/bin/tool01 /usr/lib/lib01.so.1 /usr/lib/lib02.so.1 /usr/share/locale/l00/m00.mo "
                "/opt/app/lib/m00/f00.py' >/dev/null")
        plain, prio = self.conv_ref("v3-plain"), self.conv_ref("v3-prio")
        self.umount_all()
        self.new_cache()
        sh(self.imagefs(f"convert -q {self.ref(tag)} {plain}"))
        record = self.work / "v3-record.txt"
        self.new_cache()
        sh(self.imagefs(f"mount --record {record} {plain} {self.mnt}") + " && " + work.format(d=self.mnt))
        self.umount_all()
        recorded = record.read_text().splitlines()
        log(f"V3: {len(recorded)} files recorded: {' '.join(recorded)}")
        self.new_cache()
        sh(self.imagefs(f"convert -q --prioritize {record} {self.ref(tag)} {prio}"))
        reqs = {plain: [], prio: []}

        def side(ref):
            def run():
                self.umount_all()
                self.new_cache()
                drop_caches()
                since = self.access_log_lines()
                t = timed(self.imagefs(f"mount {ref} {self.mnt}") + " && " + work.format(d=self.mnt))
                self.umount_all()
                time.sleep(0.2)  # the registry logs a response a moment after its last byte
                reqs[ref].append(self.requests_since(since))
                return t
            return run

        b, a = self.ab("V3", side(prio), side(plain), labels=("with the list", "without"))
        # The untimed first round of `ab` also counted requests: keep the timed runs'.
        self.rows["V3"] = (b, a, b.median / a.median, Stat(reqs[prio][1:]), Stat(reqs[plain][1:]),
                           len(recorded))
        self.commands["V3"] = (
            f"imagefs convert --prioritize RECORD {self.ref(tag)} DST2, RECORD from imagefs mount "
            f"--record RECORD DST1 MNT + the workload on the image converted without it (DST1); "
            f"timed: imagefs mount DST2 MNT && {work.format(d='MNT')} (cold: new cache, caches dropped)",
            "the same on DST1 (converted without --prioritize)")

    # -- criterion --------------------------------------------------------------------------

    def criterion(self):
        if self.args.quick:
            return None
        cmd = "cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 3"
        out = sh(f"cd {ROOT} && {cmd} 2>&1")
        # Criterion prints `NAME time: [low median high]` (NAME on its own line when long),
        # then `thrpt: [low median high]`, then a `change:` block with more of both.
        rows, name, in_change = [], None, False
        middle = lambda inner: " ".join(inner.split()[2:4])
        for line in out.splitlines():
            m = re.match(r"^(\S.*?)?\s*time:\s+\[(.*)\]", line)
            if m and not in_change:
                name = (m.group(1) or name or "?").strip()
                rows.append([name, middle(m.group(2)), ""])
                continue
            if re.match(r"^\s+change:", line):
                in_change = True
                continue
            m = re.match(r"^\s+thrpt:\s+\[(.*)\]", line)
            if m and not in_change and rows and not rows[-1][2]:
                rows[-1][2] = middle(m.group(1))
                continue
            if line and not line[0].isspace():
                in_change = False
                if not line.startswith(("Benchmarking", "Found", "Gnuplot", "Running", "Compiling",
                                        "Finished", "warning", "WARNING")):
                    name = line.strip()
        return cmd, rows

    # -- report -----------------------------------------------------------------------------

    def machine(self):
        cpu = "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
        return (f"{os.cpu_count()} × {cpu}, {mem} GiB RAM, kernel {platform.release()}, "
                f"{sh('df -h /var/tmp | tail -1').split()[0]} for /var/tmp")

    def write(self, crit, started):
        r = self.rows
        ok = lambda cond: "✅" if cond else "❌"
        lines = []
        lines.append("# Benchmarks\n")
        lines.append(f"Written by `scripts/bench` on {datetime.date.today().isoformat()} "
                     f"(run took {time.perf_counter() - started:.0f} s). Machine: {self.machine()}. "
                     f"{sh(f'{IMAGEFS} --version').strip()} (release build); "
                     f"{sh('skopeo --version').strip()}; {sh('umoci --version').strip()}; "
                     f"registry: distribution {sh('docker-registry --version').split()[2]} on 127.0.0.1.\n")
        lines.append(f"Every figure: median of {self.runs} runs (min–max). A/B runs alternate. "
                     "*Cold* = empty imagefs cache / empty peer output directories and "
                     "`echo 3 > /proc/sys/vm/drop_caches` before each run, for both sides. "
                     "Ratios: time(imagefs) / time(peer) — lower is better — except row 5, "
                     "which is speed(imagefs) / speed(peer) — higher is better.\n")
        g = self.blob_size("realistic-gzip")
        e = self.blob_size("realistic-estargz")
        lines.append("Images (built in code by `examples/bench_image.rs`, pushed with skopeo): "
                     f"**realistic** — 4 layers, 5,650 files (5,600 small text files, 50 binaries of "
                     f"0.2–3 MiB, two 24 MiB data files, busybox as /bin/sh, whiteouts in the last "
                     f"layer), ≈150 MB uncompressed, {g:,} bytes as gzip, {e:,} bytes as eStargz; "
                     "**tree20k** — 20,000 files in 200 directories; **big1g** — one 1 GiB file; "
                     f"**bigfile-estargz** — realistic-estargz plus a layer with one 128 MiB file, "
                     f"{self.blob_size('bigfile-estargz'):,} bytes; **single-gzip** — realistic's "
                     f"first two layers as one gzip layer, {self.blob_size('single-gzip'):,} bytes; "
                     f"**tree20k-estargz** — tree20k as eStargz; **many-layers** — 40 gzip layers of "
                     f"30–80 small files and one 0.2–0.8 MB binary each, whiteouts in two, "
                     f"{self.blob_size('many-layers'):,} bytes" +
                     (f"; **many1m** — 1,000 directories of 1,000 empty files, "
                      f"{self.blob_size('many1m'):,} bytes" if "many1m" in self.manifests else "") +
                     ".\n")
        lines.append("| # | metric | imagefs | peer | ratio | target | met |")
        lines.append("|---|---|---|---|---|---|---|")
        if "1" in r:
            a, b, q = r["1"]
            lines.append(f"| 1 | mount → `cat /etc/os-release`, gzip, cold | {a.fmt()} | skopeo copy + umoci unpack + cat: {b.fmt()} | {q:.3f}× | ≤ 0.3× | {ok(q <= 0.3)} |")
        if "1s" in r:
            a, b, q = r["1s"]
            lines.append(f"| 1s | same, single-layer gzip image (single-gzip), cold | {a.fmt()} | skopeo copy + umoci unpack + cat: {b.fmt()} | {q:.3f}× | ≤ 0.15× | {ok(q <= 0.15)} |")
            a, f, q = r["1s-floor"]
            lines.append(f"| 1s′ | the same first read against its floor | {a.fmt()} | `curl` of the layer blob `\\| gunzip`: {f.fmt()} | {q:.2f}× | ≤ 1.3× | {ok(q <= 1.3)} |")
        if "2" in r:
            a, b, q = r["2"]
            lines.append(f"| 2 | same, eStargz, cold | {a.fmt()} | {b.fmt()} | {q:.3f}× | ≤ 0.05× | {ok(q <= 0.05)} |")
        if "3" in r:
            a, b, q = r["3"]
            lines.append(f"| 3 | full materialisation (`imagefs pull`), cold | {a.fmt()} | skopeo copy + umoci unpack: {b.fmt()} | {q:.3f}× | ≤ 0.5× | {ok(q <= 0.5)} |")
        if "4" in r:
            s, total, frac = r["4"]
            lines.append(f"| 4 | registry bytes for `chroot MNT /bin/sh -c 'cat /etc/os-release'`, eStargz, `--prefetch none` | {s.median:,.0f} B ({s.min:,.0f}–{s.max:,.0f}) | blob size {total:,} B | {frac * 100:.2f} % | ≤ 10 % | {ok(frac <= 0.10)} |")
        if "4b" in r:
            s, total, frac, worst, rss = r["4b"]
            lines.append(f"| 4b | registry bytes for mount + `cat big.bin` (128 MiB) + the background fill to the end, eStargz, default prefetch | {s.median:,.0f} B ({s.min:,.0f}–{s.max:,.0f}) | sum of the layer blobs {total:,} B | {frac:.4f}× (worst {worst:.4f}×) | ≤ 1.02× | {ok(worst <= 1.02)} |")
            lines.append(f"| 4b′ | daemon RSS at the end of that workload | {rss.fmt('MiB', digits=1)} | — | — | ≤ 64 MB | {ok(rss.max <= 64 / 1.048576)} |")
        if "4c" in r:
            a, b, q = r["4c"]
            spread = a.max / a.median
            lines.append(f"| 4c | cold read of big.bin (128 MiB eStargz) right after mount, default prefetch | {a.fmt()} | `--prefetch none`: {b.fmt()} | {q:.2f}× (max/median {spread:.2f}) | ≤ 1.1×, max ≤ 1.5× median | {ok(q <= 1.1 and spread <= 1.5)} |")
        if "4d" in r:
            a, f, q = r["4d"]
            lines.append(f"| 4d | the same read, `--prefetch none`, against its floor | {a.fmt()} | `curl` of the layer blob `\\| gunzip`: {f.fmt()} | {q:.2f}× | ≤ 1.5× | {ok(q <= 1.5)} |")
        if "4e" in r:
            a, b, q = r["4e"]
            lines.append(f"| 4e | warm re-read of big.bin (128 MiB, lazy eStargz, every chunk local) | {a.fmt()} | native disk: {b.fmt()} | {q:.2f}× native speed | ≥ 0.9× native | {ok(q >= 0.9)} |")
        if "5" in r:
            for mode in ["cold", "warm"]:
                x, n, q, rn, rq = r["5"][mode]
                gib = lambda s: f"{1 / s.median:.2f} GiB/s"
                lines.append(f"| 5 | sequential read of 1 GiB, {mode} | {x.fmt()} = {gib(x)} | native disk: {n.fmt()} = {gib(n)}; squashfuse: {q.fmt()} = {gib(q)} | {rn:.2f}× native; {rq:.2f}× squashfuse | ≥ 0.9× native | {ok(rn >= 0.9)} |")
        if "6" in r:
            a, b, q = r["6"]["find"]
            lines.append(f"| 6a | `find` + stat of 20,000 entries, warm | {a.fmt()} | native disk: {b.fmt()} | {q:.2f}× | ≤ 1.3× | {ok(q <= 1.3)} |")
            a, b, q = r["6"]["find--no-passthrough"]
            lines.append(f"| 6a′ | same, `mount --no-passthrough` | {a.fmt()} | native disk: {b.fmt()} | {q:.2f}× | ≤ 1.3× | {ok(q <= 1.3)} |")
            a, b, q = r["6"]["tar"]
            lines.append(f"| 6b | `tar cf - . \\| cat >/dev/null`, 20,000 small files, warm | {a.fmt()} | native disk: {b.fmt()} | {q:.2f}× | ≤ 1.5× | {ok(q <= 1.5)} |")
            a, b, q = r["6"]["tar--no-passthrough"]
            lines.append(f"| 6b′ | same, `mount --no-passthrough` | {a.fmt()} | native disk: {b.fmt()} | {q:.2f}× | ≤ 1.5× | {ok(q <= 1.5)} |")
        if "7" in r:
            s, reqs = r["7"]
            lines.append(f"| 7 | cached remount (by digest) → first read | {s.fmt()}, {reqs} registry requests | — | — | ≤ 0.2 s, 0 requests | {ok(s.median <= 0.2 and reqs == 0)} |")
        if "8" in r:
            rss = r["8"]
            lines.append(f"| 8 | daemon RSS after mounting and walking the 20k-entry image | {rss[0]:.1f} MiB (realistic image, every file read: {rss[1]:.1f} MiB) | — | — | ≤ 64 MB | {ok(rss[0] <= 64 / 1.048576)} |")
        if "9" in r:
            x, n, q, rss, base, per = r["9"]
            lines.append(f"| 9 | mount + `find` of a 1,001,001-entry layer (many1m), cold | {x.fmt()} | native disk, `find`, cold: {n.fmt()} | {q:.2f}× | — | — |")
            lines.append(f"| 9′ | daemon RSS after it | {rss.fmt('MiB', digits=1)}; tree20k after `find`: {base:.1f} MiB → {per:.0f} B per added entry | — | — | ≤ 128 B/entry | {ok(per <= 128)} |")
        if "S" in r:
            s = r["S"]
            lines.append("\n### Against containerd + stargz-snapshotter (same registry, same run)\n")
            lines.append("| # | metric | imagefs | stargz-snapshotter | ratio | target | met |")
            lines.append("|---|---|---|---|---|---|---|")
            a, b = s["2"]
            lines.append(f"| S2 | mount → `cat /etc/os-release`, realistic-estargz, cold | {a.fmt()} | {b.fmt()} | {a.median / b.median:.2f}× | < 1× | {ok(a.median < b.median)} |")
            a, b = s["4c"]
            lines.append(f"| S4c | cold read of big.bin (128 MiB) right after mount | {a.fmt()} | {b.fmt()} | {a.median / b.median:.2f}× | < 1× | {ok(a.median < b.median)} |")
            a, b, total = s["4b"]
            lines.append(f"| S4b | registry bytes: mount + `cat big.bin` + background fetch to the end | {a.median:,.0f} B = {a.median / total:.4f}× the blobs | {b.median:,.0f} B = {b.median / total:.4f}× | {a.median / b.median:.2f}× | ≤ 1× | {ok(a.median <= b.median)} |")
            a, b = s["4b'"]
            lines.append(f"| S4b′ | daemon RSS at the end of that | {a.fmt('MiB', digits=1)} | {b.fmt('MiB', digits=1)} | {a.median / b.median:.2f}× | < 1× | {ok(a.median < b.median)} |")
            a, b = s["4e"]
            lines.append(f"| S4e | warm re-read of big.bin | {a.fmt()} | {b.fmt()} | {a.median / b.median:.2f}× | < 1× | {ok(a.median < b.median)} |")
            a, b = s["6"]
            lines.append(f"| S6 | tree20k-estargz: mount + `find` + `tar` of every file, cold | {a.fmt()} | {b.fmt()} | {a.median / b.median:.2f}× | < 1× | {ok(a.median < b.median)} |")
            a, b = s["6'"]
            lines.append(f"| S6′ | daemon RSS after it | {a.fmt('MiB', digits=1)} | {b.fmt('MiB', digits=1)} | {a.median / b.median:.2f}× | ≤ 64 MB, < 1× | {ok(a.max <= 64 / 1.048576 and a.median < b.median)} |")
        if "C" in r:
            lines.append("\n### containerd: imagefs snapshotter, stargz-snapshotter, overlayfs (same registry, same run)\n")
            lines.append("From the start of the pull (`ctr-remote image rpull` for the two remote snapshotters, "
                         "`ctr image pull` for overlayfs) to the first output of `ctr run … cat /etc/os-release`, "
                         "cold: new containerd root and state, new imagefs cache, new stargz root, caches dropped; "
                         "runs interleave the three. Bytes: layer blob bytes the registry served from the start "
                         "of the pull until the daemons were stopped, right after the container exited "
                         "(background fetches cut there).\n")
            lines.append("| # | metric | imagefs | stargz-snapshotter | overlayfs (`ctr image pull`) | imagefs / stargz | imagefs / overlayfs | target | met |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for key, what in [("C1", "realistic-estargz"), ("C2", "realistic-gzip")]:
                if key not in r["C"]:
                    continue
                (a, b, c), (ba, bb, bc), total = r["C"][key]
                qs, qo = a.median / b.median, a.median / c.median
                target, met = ("< 1× stargz, ≤ 0.3× overlayfs", qs < 1 and qo <= 0.3) if key == "C1" else \
                    ("< 1× stargz", qs < 1)
                lines.append(f"| {key} | pull → first output of `ctr run … cat /etc/os-release`, {what}, cold | "
                             f"{a.fmt()} | {b.fmt()} | {c.fmt()} | {qs:.2f}× | {qo:.2f}× | {target} | {ok(met)} |")
                fb = lambda s: f"{s.median:,.0f} B = {s.median / total:.3f}× ({s.min:,.0f}–{s.max:,.0f})"
                rb = lambda x, y: f"{x.median / y.median:.2f}×" if y.median else "—"
                lines.append(f"| {key}′ | registry bytes for it (layer blobs: {total:,} B) | {fb(ba)} | {fb(bb)} | "
                             f"{fb(bc)} | {rb(ba, bb)} | {rb(ba, bc)} | — | — |")
        if "V" in r or "V3" in r:
            lines.append("\n### Conversion to eStargz: `imagefs convert` and containerd + ctr-remote (same registry, same run)\n")
            lines.append("Registry to registry, cold: `imagefs convert SRC DST` on an empty cache, against a "
                         "private containerd (new root and state each run, started before the clock) running "
                         "`ctr content fetch` + `ctr-remote image convert --oci --estargz` + `ctr image push`, "
                         "the same job in three commands; both with their defaults (gzip level 9, 4 MiB "
                         "chunks), caches dropped, each run pushing to a new repository; runs interleave the "
                         "two. Bytes pushed: the sizes of the layer blobs in the manifest each pushed, read "
                         "back from the registry. V3: mount + a small workload on realistic-gzip converted "
                         "by imagefs, cold, with the files a recorded run of the same workload read put "
                         "first (`mount --record` → `convert --prioritize`) against without.\n")
            lines.append("| # | metric | imagefs | containerd + ctr-remote | ratio | target | met |")
            lines.append("|---|---|---|---|---|---|---|")
            for key, what in [("V1", "realistic-gzip"), ("V2", "many-layers")]:
                if key not in r.get("V", {}):
                    continue
                (a, b), (pa, pb), (la, lb), total = r["V"][key]
                q = a.median / b.median
                lines.append(f"| {key} | convert to eStargz, registry to registry, {what} ({total:,} B of gzip), cold | "
                             f"{a.fmt()} | {b.fmt()} | {q:.2f}× | ≤ 0.5× | {ok(q <= 0.5)} |")
                fb = lambda s, l: f"{s.median:,.0f} B ({s.min:,.0f}–{s.max:,.0f}), {l[0]} layers, {l[1]} with a TOC digest"
                lines.append(f"| {key}′ | layer blob bytes pushed | {fb(pa, la)} | {fb(pb, lb)} | "
                             f"{pa.median / pb.median:.3f}× | — | — |")
            if "V3" in r:
                b, a, q, rb, ra, n = r["V3"]
                lines.append(f"| V3 | mount → workload ({n} files), realistic-gzip converted by imagefs, cold, "
                             f"with the recorded list (`--prioritize`) | {b.fmt()}, {rb.median:.0f} registry requests | "
                             f"without: {a.fmt()}, {ra.median:.0f} registry requests | {q:.2f}× | < 1× | {ok(q < 1)} |")
        lines.append("\n## Commands\n")
        for key, (a, b) in self.commands.items():
            lines.append(f"- row {key}: imagefs: `{a}`" + (f"; peer: `{b}`" if b else ""))
        if crit:
            cmd, rows = crit
            lines.append("\n## Hot paths (criterion)\n")
            lines.append(f"`{cmd}` — median time per iteration and throughput.\n")
            lines.append("| benchmark | time | throughput |")
            lines.append("|---|---|---|")
            for name, t, thr in rows:
                lines.append(f"| {name} | {t} | {thr} |")
        notes = ROOT / "docs/benchmarks-notes.md"
        if notes.exists():
            lines.append("\n" + notes.read_text())
        out = Path(self.args.out)
        out.write_text("\n".join(lines) + "\n")
        log(f"wrote {out}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    p.add_argument("--quick", action="store_true", help="skip the 1 GiB image and criterion")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--only", default="", help="comma-separated rows to run, e.g. 1,7 or S,C1,C2 or V1,V2,V3")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (FUSE mounts, chroot, drop_caches)")
    started = time.perf_counter()
    b = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    want = set(args.only.split(",")) if args.only else None
    run = lambda k: want is None or k in want
    try:
        b.setup()
        if run("1"):
            b.row_first_read("1", "realistic-gzip")
        if run("1s"):
            b.row_single()
        if run("2"):
            b.row_first_read("2", "realistic-estargz")
        if run("3"):
            b.row_materialise()
        if run("4"):
            b.row_bytes()
        if run("4b"):
            b.row_fill_bytes()
        if run("4c") or run("4d"):
            b.row_readers_first()
        if run("4e"):
            b.row_warm_lazy()
        if run("5") and not args.quick:
            b.row_big()
        if run("6") or run("8"):
            b.row_tree()
        if run("7"):
            b.row_remount()
        if run("9") and not args.quick:
            b.row_many()
        if run("S"):
            b.stargz_rows()
        if run("C1") or run("C2"):
            b.containerd_rows([k for k in ("C1", "C2") if run(k)])
        if run("V1") or run("V2"):
            b.convert_rows([k for k in ("V1", "V2") if run(k)])
        if run("V3"):
            b.row_prioritized()
        crit = b.criterion() if want is None else None
        b.write(crit, started)
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
