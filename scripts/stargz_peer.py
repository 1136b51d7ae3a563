#!/usr/bin/env python3
"""containerd + stargz-snapshotter as a benchmark peer (lazy pulling of eStargz images).

    peer = StargzPeer(work, "127.0.0.1:PORT")   # everything lives under `work`
    peer.start()                                # private containerd + stargz daemon
    peer.mount("bench/realistic-estargz:latest", mnt)   # lazy rpull, then an overlay view on mnt
    ...                                         # read mnt/etc/os-release etc.
    peer.umount(mnt); peer.reset()              # cold again: the next mount fetches anew
    peer.stop()

The daemon is target/peers/containerd-stargz-grpc (scripts/stargz-peer-build); containerd, ctr
and ctr-remote are Debian's. The private containerd uses its own root, state, sockets and
config under `work`, so it does not touch a system containerd. Only 127.0.0.1 and unix sockets.

`python3 scripts/stargz_peer.py selftest [--oci DIR]` checks the whole thing end to end against
a throwaway registry (scripts/registry) and an eStargz image made by examples/bench_image.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "target/peers/containerd-stargz-grpc"
NAMESPACE = "default"


class PeerError(RuntimeError):
    pass


def _unescape(field):
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountpoints():
    """Mount points from /proc/self/mountinfo, in mount order, with their fs type."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            res.append((_unescape(left.split()[4]), right.split()[0]))
    return res


def _under(path, top):
    path, top = str(path), str(top).rstrip("/")
    return path == top or path.startswith(top + "/")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except OSError:
            return False


def _socket_answers(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def umount_under(top):
    """Unmount everything mounted at or below `top`, last mounted first; PeerError if
    anything stays."""
    for mp, _ in reversed(mountpoints()):
        if _under(mp, top):
            _umount(mp)
    left = [mp for mp, _ in mountpoints() if _under(mp, top)]
    if left:
        raise PeerError(f"still mounted after stop: {left}")


class StargzPeer:
    def __init__(self, work: Path, registry_addr: str, log_level: str = "info",
                 extra_stargz_config: str = ""):
        self.work = Path(work).resolve()
        self.registry_addr = registry_addr
        self.log_level = log_level
        self.extra_stargz_config = extra_stargz_config
        w = self.work
        self.ctd_root, self.ctd_state = w / "containerd/root", w / "containerd/state"
        self.ctd_sock, self.ctd_config = w / "containerd/c.sock", w / "containerd/config.toml"
        self.ctd_log = w / "containerd/containerd.log"
        self.sgz_root, self.sgz_sock = w / "stargz/root", w / "stargz/s.sock"
        self.sgz_config, self.sgz_log = w / "stargz/config.toml", w / "stargz/stargz.log"
        for sock in (self.ctd_sock, self.sgz_sock):
            if len(str(sock)) > 100:  # sun_path is 108 bytes; containerd adds ".ttrpc"
                raise PeerError(f"socket path too long for a unix socket: {sock}; use a shorter work dir")
        self.procs = {}      # name -> Popen
        self.mounted = []    # mount points made by mount(), possibly outside work

    # --- lifecycle -------------------------------------------------------------------------

    def _write_configs(self):
        for d in (self.ctd_root, self.ctd_state, self.sgz_root):
            d.mkdir(parents=True, exist_ok=True)
        q = lambda p: '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'
        self.ctd_config.write_text(f"""\
version = 2
root = {q(self.ctd_root)}
state = {q(self.ctd_state)}
# No CRI (this containerd only pulls and mounts); no snapshotters that need other setups.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = {q(self.ctd_sock)}
[ttrpc]
  address = {q(str(self.ctd_sock) + ".ttrpc")}
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = {q(self.work / "containerd/opt")}

[proxy_plugins.stargz]
  type = "snapshot"
  address = {q(self.sgz_sock)}
""")
        self.sgz_config.write_text(f"""\
# The local plain-HTTP registry (127.0.0.1 is spoken to over HTTP anyway; insecure says so).
[[resolver.host."{self.registry_addr}".mirrors]]
host = "{self.registry_addr}"
insecure = true
{self.extra_stargz_config}
""")

    def _spawn(self, name, argv, logfile):
        with open(logfile, "ab") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
        self.procs[name] = p
        (self.work / f"{name}.pid").write_text(f"{p.pid}\n")
        return p

    def _wait_socket(self, name, sock, logfile, timeout=30):
        p = self.procs[name]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if p.poll() is not None:
                raise PeerError(f"{name} exited ({p.returncode}) while starting; {logfile}:\n"
                                + _tail(logfile))
            if _socket_answers(sock):
                return
            time.sleep(0.02)
        raise PeerError(f"{name} did not answer on {sock} within {timeout} s; {logfile}:\n"
                        + _tail(logfile))

    def _kill_stale(self):
        """Kill daemons a previous run of this peer left behind (their pids are under work)."""
        for name, binary in (("containerd", "containerd"), ("stargz", DAEMON.name)):
            pidfile = self.work / f"{name}.pid"
            try:
                pid = int(pidfile.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if (Path(cmdline[0].decode()).name == binary
                    and any(str(self.work).encode() in a for a in cmdline)):
                _terminate(pid, 10)
            pidfile.unlink(missing_ok=True)

    def start(self):
        if not DAEMON.exists():
            raise PeerError(f"{DAEMON} is missing: run scripts/stargz-peer-build")
        for tool in ("containerd", "ctr", "ctr-remote"):
            if not shutil.which(tool):
                raise PeerError(f"{tool} not found: run scripts/stargz-peer-build")
        self.work.mkdir(parents=True, exist_ok=True)
        self._kill_stale()
        self._write_configs()
        self._spawn("stargz", [str(DAEMON), "--address", str(self.sgz_sock),
                               "--root", str(self.sgz_root), "--config", str(self.sgz_config),
                               "--log-level", self.log_level], self.sgz_log)
        try:
            self._wait_socket("stargz", self.sgz_sock, self.sgz_log)
            self._spawn("containerd", ["containerd", "--config", str(self.ctd_config),
                                       "--log-level", "warn"], self.ctd_log)
            self._wait_socket("containerd", self.ctd_sock, self.ctd_log)
            # The grpc socket is up only after all plugins loaded; check the proxy plugin too.
            out = self._ctr("ctr", "plugins", "ls")
            if not any(l.split()[:2] == ["io.containerd.snapshotter.v1", "stargz"]
                       and l.split()[-1] == "ok" for l in out.splitlines()):
                raise PeerError(f"containerd does not list the stargz snapshotter as ok:\n{out}")
        except BaseException:
            self.stop()
            raise

    def stop(self):
        for mnt in reversed(self.mounted):
            _umount(mnt)
        self.mounted.clear()
        # Views on the stargz layers (the mount points may be outside work; those are tracked
        # above) and anything else under work except the daemon's own FUSE layers.
        for mp, fstype in reversed(mountpoints()):
            if _under(mp, self.work) and not _under(mp, self.sgz_root):
                _umount(mp)
        for name in ("containerd", "stargz"):  # stargz unmounts its layers on SIGTERM
            p = self.procs.pop(name, None)
            if p is not None:
                _terminate(p.pid, 15, p)
                (self.work / f"{name}.pid").unlink(missing_ok=True)
        self._kill_stale()  # daemons of an earlier StargzPeer on this work dir
        umount_under(self.work)

    def reset(self):
        """Cold state: stop, delete containerd's and stargz' state (content, snapshots, caches),
        start again, so the next mount fetches from the registry."""
        self.stop()
        for d in (self.work / "containerd", self.work / "stargz"):
            if d.exists():
                shutil.rmtree(d)
        self.start()

    # --- images ----------------------------------------------------------------------------

    def _ctr(self, tool, *args):
        argv = [tool, "--address", str(self.ctd_sock), "--namespace", NAMESPACE, *args]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise PeerError(f"`{' '.join(argv)}` failed ({r.returncode}):\n{r.stdout}")
        return r.stdout

    def full_ref(self, ref):
        """`bench/x:latest` -> `127.0.0.1:PORT/bench/x:latest`; full references stay."""
        first = ref.split("/", 1)[0]
        if "/" in ref and ("." in first or ":" in first or first == "localhost"):
            return ref
        return f"{self.registry_addr}/{ref}"

    def _blob(self, digest):
        algo, _, hexd = digest.partition(":")
        return (self.ctd_root / "io.containerd.content.v1.content/blobs" / algo / hexd).read_bytes()

    def top_chain_id(self, ref):
        """The chain id of the image's top layer (what the view snapshot is made from)."""
        return self.chain_ids(ref)[-1]

    def chain_ids(self, ref):
        """The chain ids of the image's layers, bottom first: the manifest digest from
        containerd, manifest and config from its content store."""
        out = self._ctr("ctr", "images", "ls", f"name=={ref}")
        rows = [l.split() for l in out.splitlines()[1:] if l.split()[:1] == [ref]]
        if not rows:
            raise PeerError(f"containerd does not know image {ref}:\n{out}")
        doc = json.loads(self._blob(rows[0][2]))
        if "manifests" in doc:  # an index: this machine's platform
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
            doc = json.loads(self._blob(next(
                m["digest"] for m in doc["manifests"]
                if m.get("platform", {}).get("os") == "linux"
                and m.get("platform", {}).get("architecture") == arch)))
        chain = []
        for diff_id in json.loads(self._blob(doc["config"]["digest"]))["rootfs"]["diff_ids"]:
            chain.append(diff_id if not chain else
                         "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
        return chain

    def mount(self, ref, mnt: Path) -> None:
        """Lazy pull REF through the stargz snapshotter and mount a read-only overlay view of
        its top layer chain on mnt (view key: the mount point's path)."""
        ref, mnt = self.full_ref(ref), Path(mnt).resolve()
        mnt.mkdir(parents=True, exist_ok=True)
        self._ctr("ctr-remote", "images", "rpull", "--plain-http", "--snapshotter", "stargz", ref)
        chain = self.top_chain_id(ref)
        # (ctr 1.6's `images mount` would do this in one call, but it ignores its --snapshotter
        # flag and unpacks into overlayfs instead.)
        view = ["snapshots", "--snapshotter", "stargz", "view", "--mounts", str(mnt), chain]
        try:
            out = self._ctr("ctr", *view)
        except PeerError as e:
            if "already exists" not in str(e):
                raise
            self._ctr("ctr", "snapshots", "--snapshotter", "stargz", "rm", str(mnt))
            out = self._ctr("ctr", *view)
        mounts = json.loads(out)
        if len(mounts) != 1:
            raise PeerError(f"expected one mount for the view, got {mounts}")
        m = mounts[0]
        r = subprocess.run(["mount", "-t", m["Type"], "-o", ",".join(m["Options"]), m["Source"],
                            str(mnt)], stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise PeerError(f"mounting the view on {mnt} failed: {r.stderr.strip()} ({m})")
        self.mounted.append(mnt)
        # The view is bookkeeping only: its mount is the parents' (committed, kept alive by
        # the image) layer directories, so if containerd's GC collects the unlabelled view
        # (it can, after the next pull's lease ends) the mount is unaffected.

    def umount(self, mnt: Path) -> None:
        mnt = Path(mnt).resolve()
        _umount(mnt)
        if mnt in self.mounted:
            self.mounted.remove(mnt)
        try:
            self._ctr("ctr", "snapshots", "--snapshotter", "stargz", "rm", str(mnt))
        except PeerError as e:
            if "not found" not in str(e):  # already garbage-collected
                raise

    # --- observation -----------------------------------------------------------------------

    def daemon_pid(self):
        p = self.procs.get("stargz")
        return p.pid if p is not None and p.poll() is None else None

    def daemon_rss_mib(self):
        pid = self.daemon_pid()
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None

    def layer_mounts(self):
        """The daemon's FUSE layer mounts (one per lazily mounted layer)."""
        return [mp for mp, t in mountpoints() if _under(mp, self.sgz_root) and t.startswith("fuse")]

    def remote_layers(self, ref):
        """For each layer of the pulled image: is its snapshot a stargz remote (lazy) one?
        The snapshotter labels those containerd.io/snapshot/remote="remote snapshot"."""
        res = []
        for chain in self.chain_ids(self.full_ref(ref)):
            info = json.loads(self._ctr("ctr", "snapshots", "--snapshotter", "stargz", "info", chain))
            res.append((chain, "containerd.io/snapshot/remote" in (info.get("Labels") or {})))
        return res

    def content_digests(self):
        """Digests in containerd's content store (a lazy pull leaves the layer blobs out)."""
        out = self._ctr("ctr", "content", "ls", "-q")
        return [l.strip() for l in out.splitlines() if l.strip()]


def _tail(path, n=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _terminate(pid, timeout, popen=None):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if popen is not None and popen.poll() is not None:
            return
        if popen is None and not _alive(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        popen.wait()
    else:
        while _alive(pid):
            time.sleep(0.02)


def _umount(mp):
    mp = str(mp)
    while any(m == mp for m, _ in mountpoints()):
        if subprocess.run(["umount", mp], stderr=subprocess.DEVNULL).returncode != 0:
            if subprocess.run(["umount", "-l", mp]).returncode != 0:
                raise PeerError(f"cannot unmount {mp}")


# --- selftest ------------------------------------------------------------------------------

def _expected_files(oci, tag, names):
    """sha256 and size of the final version of each name (path in the rootfs) and of the
    largest regular file of the image, read from the OCI layout's layer tarballs."""
    def blob(d):
        return oci / "blobs" / d.replace(":", "/")
    index = json.loads((oci / "index.json").read_text())
    desc = next((m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag), None)
    if desc is None:
        raise PeerError(f"{oci} has no tag {tag}")
    manifest = json.loads(blob(desc["digest"]).read_text())
    files = {}
    for layer in manifest["layers"]:
        with tarfile.open(blob(layer["digest"]), "r:gz") as tf:
            for m in tf:
                name = m.name.lstrip("./").lstrip("/")
                base = os.path.basename(name)
                if name in ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"):
                    continue  # eStargz metadata, hidden by the snapshotter
                if base.startswith(".wh."):
                    files.pop(os.path.join(os.path.dirname(name), base[4:]), None)
                    continue
                if m.isreg():
                    h = hashlib.sha256()
                    f = tf.extractfile(m)
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                    files[name] = (h.hexdigest(), m.size)
                else:
                    files.pop(name, None)
    biggest = max(files, key=lambda n: files[n][1])
    return {n: files[n] for n in list(names) + [biggest]}, manifest


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def selftest(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="stargz_peer.py selftest")
    ap.add_argument("--oci", type=Path, help="reuse an OCI layout made by examples/bench_image")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    say = lambda m: print(f"stargz-peer selftest: {m}", file=sys.stderr, flush=True)
    tag = "realistic-estargz"

    r = subprocess.run(["bash", str(ROOT / "scripts/stargz-peer-build")],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise PeerError("scripts/stargz-peer-build failed")
    work = Path(tempfile.mkdtemp(prefix="stargz-peer.", dir="/var/tmp"))
    regdir = work / "registry"
    peer, reg_up, ok = None, False, False
    try:
        oci = args.oci
        if oci is None:
            gen = ROOT / "target/release/examples/bench_image"
            if not gen.exists():
                raise PeerError(f"{gen} is missing (cargo build --release --examples)")
            oci = work / "oci"
            say(f"making test images with {gen.name}")
            subprocess.run([str(gen), str(oci), "--skip-big"], check=True,
                           stdout=subprocess.DEVNULL)
        want, manifest = _expected_files(oci, tag, ["etc/os-release"])
        nlayers = len(manifest["layers"])
        missing = [l["digest"] for l in manifest["layers"]
                   if "containerd.io/snapshot/stargz/toc.digest" not in l.get("annotations", {})]
        if missing:
            say(f"warning: layers without the containerd.io/snapshot/stargz/toc.digest "
                f"annotation (stargz cannot verify them and falls back): {missing}")

        addr = subprocess.run(["bash", str(ROOT / "scripts/registry"), "start", str(regdir)],
                              check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
        reg_up = True
        ref = f"{addr}/bench/{tag}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{oci}:{tag}",
                        f"docker://{ref}"], check=True)
        say(f"pushed {ref}")

        peer = StargzPeer(work / "peer", addr)
        mnt = work / "mnt"
        t = time.perf_counter()
        peer.start()
        say(f"started containerd + stargz daemon in {time.perf_counter() - t:.3f} s "
            f"(daemon pid {peer.daemon_pid()})")
        for round_ in ("cold (fresh)", "cold (after reset)"):
            if round_ != "cold (fresh)":
                peer.reset()
            log_mark = peer.sgz_log.stat().st_size
            t0 = time.perf_counter()
            peer.mount(f"bench/{tag}:latest", mnt)
            t1 = time.perf_counter()
            data = (mnt / "etc/os-release").read_bytes()
            t2 = time.perf_counter()
            say(f"{round_}: mount {t1 - t0:.3f} s + first read of etc/os-release "
                f"{t2 - t1:.3f} s = {t2 - t0:.3f} s; daemon RSS {peer.daemon_rss_mib():.1f} MiB")

            # Lazy? One FUSE mount per layer, no layer blob in containerd's content store,
            # and no remote-snapshot failure in the daemon's log.
            fuse = peer.layer_mounts()
            content = set(peer.content_digests())
            fetched = [l["digest"] for l in manifest["layers"] if l["digest"] in content]
            with open(peer.sgz_log, "rb") as f:
                f.seek(log_mark)
                new_log = f.read().decode(errors="replace")
            # The snapshotter logs "remote-snapshot-prepared":"false" (warn) when it falls back.
            failures = [l for l in new_log.splitlines()
                        if '"remote-snapshot-prepared":"false"' in l or '"level":"error"' in l]
            remote = sum(r for _, r in peer.remote_layers(f"bench/{tag}:latest"))
            say(f"  {remote}/{nlayers} layer snapshots labelled remote, {len(fuse)} FUSE-mounted "
                f"by stargz; layer blobs in containerd's content store: {len(fetched)}; "
                f"remote-snapshot failures logged: {len(failures)}")
            if failures or fetched or len(fuse) != nlayers or remote != nlayers:
                raise PeerError("layers were not mounted lazily (fallback to a full pull):\n"
                                + "\n".join(failures[:10]))

            for name, (digest, size) in want.items():
                t = time.perf_counter()
                got = _sha256(mnt / name)
                if got != digest:
                    raise PeerError(f"{name}: sha256 {got}, expected {digest}")
                say(f"  {name}: {size:,} bytes, content ok ({time.perf_counter() - t:.3f} s)")
            if hashlib.sha256(data).hexdigest() != want["etc/os-release"][0]:
                raise PeerError("etc/os-release: first read returned other content")
            peer.umount(mnt)
        peer.stop()
        ok = True
        say("ok")
    finally:
        if peer is not None:
            try:
                peer.stop()
            except PeerError as e:
                say(f"cleanup: {e}")
                ok = False
        if reg_up:
            subprocess.run(["bash", str(ROOT / "scripts/registry"), "stop", str(regdir)])
        if any(_under(mp, work) for mp, _ in mountpoints()):
            say(f"left mounted under {work}; not deleting it")
        elif args.keep or not ok:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work)
    return 0 if ok else 1


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "selftest":
        try:
            return selftest(sys.argv[2:])
        except (PeerError, subprocess.CalledProcessError) as e:
            print(f"stargz-peer selftest: FAILED: {e}", file=sys.stderr)
            return 1
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
