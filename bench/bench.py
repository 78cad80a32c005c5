#!/usr/bin/env python3
"""blockvault side-by-side benchmark (issue 5). Started by bench/run.sh.

Measures blockvault, restic, borg, Benji (and optionally rustic) on the same
data -- an ext4 image holding a Debian minbase root filesystem, a "day 2" copy
of it with packages installed, a random image and a mostly sparse image -- and,
when a Ceph cluster is reachable, `rbd export-diff` against blockvault's RBD
incremental. Writes a markdown table (bench/results.md, or
bench/out/results-smoke.md for --smoke) and raw samples (bench/out/results.json).

Everything here is standard library only so it runs on any Python 3.7+.
"""
import argparse
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
CACHE = os.path.join(BENCH, "cache")
OUT = os.path.join(BENCH, "out")
GNU_TIME = "/usr/bin/time"
BENJI_VERSION = "0.17.0"
PASSWORD = "blockvault-bench"  # throwaway repositories only

T0 = time.monotonic()


BUDGET_S = None   # seconds for the whole run (--budget), None = unlimited


BUDGET_T0 = T0    # reset after the one-time setup (data, installs, build)


def budget_left():
    return float("inf") if BUDGET_S is None else BUDGET_S - (time.monotonic() - BUDGET_T0)


def log(msg):
    el = time.monotonic() - T0
    print("[bench %3d:%02d] %s" % (el // 60, el % 60, msg), file=sys.stderr, flush=True)


def sh(cmd, check=True, **kw):
    """Run a command (argv list or shell string), return CompletedProcess with text output."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, universal_newlines=True, **kw)


def out_of(cmd):
    try:
        return sh(cmd).stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return ""


def tail(text, n=4):
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:])[-400:]


def rmtree(path):
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def du_sb(paths):
    total = 0
    for p in paths:
        if os.path.exists(p):
            r = sh(["du", "-sb", p], check=False)
            if r.returncode == 0 and r.stdout.split():
                total += int(r.stdout.split()[0])
    return total


def apt_install(pkgs):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = sh(["apt-get", "install", "-y", "-qq"] + pkgs, check=False, env=env)
    if r.returncode != 0:
        sh(["apt-get", "update", "-qq"], check=False, env=env)
        r = sh(["apt-get", "install", "-y", "-qq"] + pkgs, check=False, env=env)
    return r.returncode == 0, tail(r.stderr)


# ----------------------------------------------------------------------------
# Page cache

class Cache:
    can_drop = None

    @classmethod
    def drop(cls):
        if cls.can_drop is False:
            return
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            cls.can_drop = True
        except OSError:
            cls.can_drop = False


# ----------------------------------------------------------------------------
# Timing one command with /usr/bin/time -v

def run_timed(argv, logbase, env=None, cwd=None, stdout_path=None, drop=True):
    """Run argv under /usr/bin/time -v. Returns a sample dict:
    wall (s, monotonic clock), cpu (user+sys s, incl. children), rss_kib (peak
    of the largest process), ok, error."""
    if drop:
        Cache.drop()
    tfile = logbase + ".time"
    out = open(stdout_path or (logbase + ".out"), "wb")
    err = open(logbase + ".err", "wb")
    t = time.monotonic()
    try:
        p = subprocess.run([GNU_TIME, "-v", "-o", tfile] + argv, env=env, cwd=cwd,
                           stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        rc = p.returncode
    finally:
        wall = time.monotonic() - t
        out.close()
        err.close()
    s = {"wall": wall, "cpu": None, "rss_kib": None, "ok": rc == 0, "rc": rc}
    try:
        with open(tfile) as f:
            tv = f.read()
        user = float(re.search(r"User time \(seconds\): ([\d.]+)", tv).group(1))
        system = float(re.search(r"System time \(seconds\): ([\d.]+)", tv).group(1))
        s["cpu"] = user + system
        s["rss_kib"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv).group(1))
    except (OSError, AttributeError):
        pass
    if rc != 0:
        with open(logbase + ".err", errors="replace") as f:
            s["error"] = "exit %d: %s" % (rc, tail(f.read()))
    return s


# ----------------------------------------------------------------------------
# Tools. Each instance owns one fresh repository under `work`.

class Tool:
    name = "?"
    available = True
    skip_reason = ""
    version = ""

    def __init__(self, work, src):
        self.work = work
        self.src = src
        os.makedirs(work, exist_ok=True)

    env = None

    def init(self):
        return []

    def backup(self, tag):
        raise NotImplementedError

    def after_backup(self, tag, logbase):
        pass

    def restore(self, dest_dir):
        """-> (argv, cwd, path where the restored image will be)"""
        raise NotImplementedError

    def store_paths(self):
        return [os.path.join(self.work, "repo")]


class Blockvault(Tool):
    name = "blockvault"
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target"),
                          "release", "blockvault")

    def __init__(self, work, src, source_url=None, extra_env=None):
        super().__init__(work, src)
        self.cfg = os.path.join(work, "blockvault.toml")
        self.store = os.path.join(work, "store")
        self.catalog = os.path.join(work, "catalog.sqlite")
        url = source_url or ("file:" + src)
        with open(self.cfg, "w") as f:
            f.write('[store]\npath = "%s"\n\n[catalog]\npath = "%s"\n\n'
                    '[[image]]\nname = "disk"\nsource = "%s"\n' % (self.store, self.catalog, url))
        self.env = dict(os.environ, **(extra_env or {}))

    no_progress = False

    def base(self):
        return [self.binary, "--config", self.cfg] + (["--no-progress"] if self.no_progress else [])

    def init(self):
        return [self.base() + ["init"]]

    def backup(self, tag):
        return self.base() + ["backup", "disk"]

    def restore(self, dest_dir):
        dest = os.path.join(dest_dir, "disk.img")
        return self.base() + ["restore", "disk", "--to", dest, "--force"], None, dest

    def store_paths(self):
        return [self.store, self.catalog, self.catalog + "-wal", self.catalog + "-shm"]


class Restic(Tool):
    name = "restic"

    def __init__(self, work, src):
        super().__init__(work, src)
        self.repo = os.path.join(work, "repo")
        self.env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=self.repo,
                        RESTIC_CACHE_DIR=os.path.join(work, "cache"))

    def init(self):
        return [["restic", "init", "--repository-version", "2"]]

    def backup(self, tag):
        return ["restic", "backup", "--compression", "auto", "--tag", tag, self.src]

    def restore(self, dest_dir):
        return (["restic", "restore", "latest", "--target", dest_dir], None,
                os.path.join(dest_dir, self.src.lstrip("/")))


class Rustic(Tool):
    name = "rustic"

    def __init__(self, work, src):
        super().__init__(work, src)
        self.repo = os.path.join(work, "repo")
        self.env = dict(os.environ, RUSTIC_PASSWORD=PASSWORD, RUSTIC_REPOSITORY=self.repo,
                        RUSTIC_CACHE_DIR=os.path.join(work, "cache"), RUSTIC_NO_PROGRESS="true")

    def init(self):
        return [["rustic", "init"]]

    def backup(self, tag):
        return ["rustic", "backup", "--tag", tag, self.src]

    def restore(self, dest_dir):
        # where rustic puts the single file depends on its version: found afterwards
        return ["rustic", "restore", "latest", dest_dir], None, None


class Borg(Tool):
    name = "borg"

    def __init__(self, work, src):
        super().__init__(work, src)
        self.repo = os.path.join(work, "repo")
        self.env = dict(os.environ, BORG_BASE_DIR=os.path.join(work, "home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        self.last = None

    def init(self):
        return [["borg", "init", "--encryption", "none", self.repo]]

    def backup(self, tag):
        self.last = tag
        return ["borg", "create", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                "%s::%s" % (self.repo, tag), self.src]

    def restore(self, dest_dir):
        return (["borg", "extract", "--sparse", "%s::%s" % (self.repo, self.last)], dest_dir,
                os.path.join(dest_dir, self.src.lstrip("/")))


class Benji(Tool):
    name = "benji"
    venv = os.path.join(CACHE, "benji-venv")
    binary = os.path.join(venv, "bin", "benji")

    def __init__(self, work, src):
        super().__init__(work, src)
        self.cfg = os.path.join(work, "benji.yaml")
        self.store = os.path.join(work, "store")
        self.db = os.path.join(work, "benji.sqlite")
        with open(self.cfg, "w") as f:
            f.write("""configurationVersion: '1'
databaseEngine: sqlite:///%s
defaultStorage: store
blockSize: 4194304
logFile: %s
storages:
  - name: store
    storageId: 1
    module: file
    configuration:
      path: %s
      activeTransforms: [zstd]
transforms:
  - name: zstd
    module: zstd
    configuration:
      level: 3
ios:
  - name: file
    module: file
""" % (self.db, os.path.join(work, "benji.log"), self.store))
        self.env = dict(os.environ)
        self.uids = []

    def init(self):
        return [[self.binary, "-c", self.cfg, "database-init"]]

    def backup(self, tag):
        argv = [self.binary, "-m", "-c", self.cfg, "--log-level", "WARNING", "backup"]
        if self.uids:
            argv += ["-f", self.uids[-1]]
        return argv + ["file:" + self.src, "disk"]

    def after_backup(self, tag, logbase):
        with open(logbase + ".out") as f:
            self.uids.append(json.load(f)["versions"][0]["uid"])

    def restore(self, dest_dir):
        dest = os.path.join(dest_dir, "disk.img")
        return ([self.binary, "-c", self.cfg, "--log-level", "WARNING", "restore", "--sparse",
                 self.uids[-1], "file:" + dest], None, dest)

    def store_paths(self):
        return [self.store, self.db]


# ----------------------------------------------------------------------------
# Tool setup

def setup_tools(args, logdir):
    """Return {name: (cls or None, version, reason)} in display order."""
    res = {}
    want = [t.strip() for t in args.tools.split(",") if t.strip()]

    if "blockvault" in want:
        res["blockvault"] = setup_blockvault(args, logdir)
    if "restic" in want:
        res["restic"] = setup_apt_tool(Restic, "restic", "restic", ["restic", "version"])
    if "borg" in want:
        res["borg"] = setup_apt_tool(Borg, "borg", "borgbackup", ["borg", "--version"])
    if "benji" in want:
        res["benji"] = setup_benji(logdir)
    if "rustic" in want or os.environ.get("BENCH_RUSTIC") == "1":
        res["rustic"] = setup_rustic(logdir)
    return res


def setup_blockvault(args, logdir):
    if os.environ.get("BLOCKVAULT"):
        Blockvault.binary = os.path.abspath(os.environ["BLOCKVAULT"])
    elif not args.no_build:
        log("cargo build --release -p blockvault")
        with open(os.path.join(logdir, "cargo-build.log"), "w") as f:
            r = subprocess.run(["cargo", "build", "--release", "-p", "blockvault"], cwd=REPO,
                               stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            with open(os.path.join(logdir, "cargo-build.log"), errors="replace") as f:
                return None, "", "cargo build --release -p blockvault failed: " + tail(f.read(), 3)
    if not os.access(Blockvault.binary, os.X_OK):
        return None, "", "no binary at " + Blockvault.binary
    h = sh([Blockvault.binary, "--help"], check=False)
    missing = [c for c in ("init", "backup", "restore") if not re.search(r"^\s+%s\b" % c, h.stdout, re.M)]
    if h.returncode != 0 or missing:
        return None, "", "CLI not ready (`blockvault --help` lacks %s): %s" % (
            ", ".join(missing) or "?", tail(h.stdout + h.stderr, 2))
    Blockvault.no_progress = "--no-progress" in h.stdout
    v = out_of([Blockvault.binary, "--version"]) or out_of(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    return Blockvault, v, ""


def setup_apt_tool(cls, binary, pkg, version_cmd):
    if not shutil.which(binary):
        log("apt-get install " + pkg)
        ok, err = apt_install([pkg])
        if not ok or not shutil.which(binary):
            return None, "", "apt-get install %s failed: %s" % (pkg, err)
    return cls, out_of(version_cmd).splitlines()[0] if out_of(version_cmd) else "", ""


def benji_pythons():
    cands = []
    root = os.path.expanduser("~/.pyenv/versions")
    if os.path.isdir(root):
        vers = sorted(os.listdir(root), key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")])
        # 3.9 first (what Benji 0.17 was used with), then the other 3.x up to 3.11
        for pref in ("3.9.", "3.8.", "3.10.", "3.11.", "3.7."):
            for v in reversed(vers):
                if v.startswith(pref):
                    cands.append(os.path.join(root, v, "bin", "python3"))
    for p in ("/usr/bin/python3", shutil.which("python3")):
        if p and p not in cands:
            cands.append(p)
    return [c for c in cands if os.access(c, os.X_OK)]


def setup_benji(logdir):
    venv = Benji.venv
    marker = os.path.join(CACHE, "benji-venv.ok")
    failed = os.path.join(CACHE, "benji-install.failed")
    if os.path.exists(marker) and os.access(Benji.binary, os.X_OK):
        return Benji, "benji " + open(marker).read().strip(), ""
    if os.path.exists(failed):
        return None, "", "not installable (cached, delete %s to retry): %s" % (
            os.path.relpath(failed, REPO), open(failed).read().strip())
    reasons = []
    for py in benji_pythons():
        rmtree(venv)
        log("installing Benji %s from PyPI into a venv with %s" % (BENJI_VERSION, py))
        r = sh([py, "-m", "venv", venv], check=False)
        if r.returncode != 0:
            reasons.append("%s: venv failed: %s" % (py, tail(r.stderr, 1)))
            continue
        pip = os.path.join(venv, "bin", "pip")
        r = sh([pip, "install", "-q", "benji==" + BENJI_VERSION, "zstandard"], check=False)
        if r.returncode == 0:
            chk = sh([os.path.join(venv, "bin", "python"), "-c", "import benji, zstandard"], check=False)
            if chk.returncode == 0 and os.access(Benji.binary, os.X_OK):
                pyv = out_of([py, "--version"])
                with open(marker, "w") as f:
                    f.write("%s (%s)\n" % (BENJI_VERSION, pyv))
                return Benji, "benji %s (%s)" % (BENJI_VERSION, pyv), ""
            r = chk
        reasons.append("%s: %s" % (py, tail(r.stderr, 1)))
    rmtree(venv)
    reason = "; ".join(reasons) or "no usable python3 found"
    with open(failed, "w") as f:
        f.write(reason + "\n")
    return None, "", "pip install benji==%s failed: %s" % (BENJI_VERSION, reason)


def setup_rustic(logdir):
    if not shutil.which("rustic"):
        if os.environ.get("BENCH_RUSTIC") != "1":
            return None, "", "not installed (set BENCH_RUSTIC=1 to `cargo install rustic-rs`)"
        log("cargo install rustic-rs (slow)")
        with open(os.path.join(logdir, "cargo-install-rustic.log"), "w") as f:
            r = subprocess.run(["cargo", "install", "--locked", "rustic-rs"], stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0 or not shutil.which("rustic"):
            return None, "", "cargo install rustic-rs failed (see bench/out/logs/cargo-install-rustic.log)"
    return Rustic, out_of(["rustic", "--version"]), ""


# ----------------------------------------------------------------------------
# Data

def ensure_data(args):
    cache = os.path.join(CACHE, "smoke" if args.smoke else "full")
    cmd = ["bash", os.path.join(BENCH, "make-data.sh")] + (["--smoke"] if args.smoke else []) + [cache]
    log("data: " + " ".join(cmd))
    t = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        sys.exit("bench: data generation failed (exit %d)" % r.returncode)
    info = json.loads(r.stdout)
    info["dir"] = cache
    info["check_seconds"] = time.monotonic() - t
    return info


def place(src_img, path):
    """Make `path` the image `src_img`: a hard link when possible (same inode
    as the cache file, nothing copied), else a sparse copy. Untimed."""
    rmtree(path)
    try:
        os.link(src_img, path)
    except OSError:
        sh(["cp", "--sparse=always", src_img, path])


# ----------------------------------------------------------------------------
# The file-image benchmark

STEPS = [
    ("ext4-base", "ext4 base: first backup"),
    ("ext4-day2", "ext4 day 2: incremental"),
    ("ext4-restore", "restore day 2 to a file (verified)"),
    ("random", "random: first backup"),
    ("sparse", "sparse: first backup"),
]


def next_data(fd, pos):
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:   # ENXIO: only a hole after pos (or SEEK_DATA unsupported)
        return None if hasattr(os, "SEEK_DATA") else pos


def same_content(a, b, block=4 << 20):
    """Byte-for-byte comparison like `cmp -s a b`, in 4 MiB reads, skipping
    blocks that are holes in both files (GNU cmp reads 4 KiB at a time and
    needs over a minute per 4 GiB sparse pair on this machine)."""
    size = os.path.getsize(a)
    if size != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        da, db = fa.fileno(), fb.fileno()
        pos = 0
        while pos < size:
            n = min(block, size - pos)
            na, nb = next_data(da, pos), next_data(db, pos)
            if (na is None or na >= pos + n) and (nb is None or nb >= pos + n):
                pos += n
                continue
            if os.pread(da, n, pos) != os.pread(db, n, pos):
                return False
            pos += n
    return True


def find_file(root, name):
    for d, _, files in os.walk(root):
        if name in files:
            return os.path.join(d, name)
    return None


class Runner:
    def __init__(self, args, data, tools, logdir):
        self.args = args
        self.data = data
        self.tools = tools  # name -> class
        self.logdir = logdir
        self.samples = {}  # (step, tool) -> [sample]
        self.src_dir = os.path.join(OUT, "src")
        self.src = os.path.join(self.src_dir, "disk.img")
        self.work_root = os.path.join(OUT, "work")
        os.makedirs(self.src_dir, exist_ok=True)

    def img(self, name):
        return os.path.join(self.data["dir"], name)

    def record(self, step, tool, s):
        self.samples.setdefault((step, tool), []).append(s)
        state = "ok" if s["ok"] else "FAILED " + s.get("error", "")
        log("  %-10s %-13s wall %7.2fs cpu %7.2fs rss %6.0f MiB store %s  %s" % (
            tool, step, s["wall"], s["cpu"] or 0, (s["rss_kib"] or 0) / 1024,
            "%.1f MiB" % (s["store"] / 2**20) if s.get("store") is not None else "-", state))

    def fresh(self, name, rep, scenario):
        work = os.path.join(self.work_root, "%s-%s-r%d" % (name, scenario, rep))
        rmtree(work)
        t = self.tools[name](work, self.src)
        for argv in t.init():
            r = sh(argv, check=False, env=t.env)
            if r.returncode != 0:
                raise RuntimeError("init failed: " + tail(r.stdout + r.stderr))
        return t, work

    def logbase(self, rep, name, step):
        return os.path.join(self.logdir, "r%d-%s-%s" % (rep, name, step))

    def backup(self, t, rep, name, step, tag):
        lb = self.logbase(rep, name, step)
        s = run_timed(t.backup(tag), lb, env=t.env)
        if s["ok"]:
            try:
                t.after_backup(tag, lb)
            except (OSError, ValueError, KeyError, IndexError) as e:
                s["ok"], s["error"] = False, "could not read backup result: %s" % e
        s["store"] = du_sb(t.store_paths())
        self.record(step, name, s)
        return s["ok"]

    def scenario_ext4(self, name, rep):
        try:
            t, work = self.fresh(name, rep, "ext4")
        except RuntimeError as e:
            self.record("ext4-base", name, {"wall": 0, "cpu": None, "rss_kib": None, "ok": False, "error": str(e)})
            return
        place(self.img("base.img"), self.src)
        if self.backup(t, rep, name, "ext4-base", "base"):
            place(self.img("day2.img"), self.src)   # "the same file, changed"
            if self.backup(t, rep, name, "ext4-day2", "day2"):
                dest_dir = os.path.join(OUT, "restore")
                rmtree(dest_dir)
                os.makedirs(dest_dir)
                argv, cwd, dest = t.restore(dest_dir)
                s = run_timed(argv, self.logbase(rep, name, "ext4-restore"), env=t.env, cwd=cwd)
                if s["ok"]:
                    if dest is None or not os.path.exists(dest):
                        dest = find_file(dest_dir, os.path.basename(self.src)) or dest
                    if not dest or not os.path.exists(dest):
                        s["ok"], s["error"] = False, "restored file not found under " + dest_dir
                    elif not same_content(dest, self.img("day2.img")):
                        s["ok"], s["error"] = False, "restored image differs from day2.img"
                    s["verified"] = s["ok"]
                self.record("ext4-restore", name, s)
                rmtree(dest_dir)
        rmtree(work)

    def scenario_single(self, name, rep, image, step):
        try:
            t, work = self.fresh(name, rep, step)
        except RuntimeError as e:
            self.record(step, name, {"wall": 0, "cpu": None, "rss_kib": None, "ok": False, "error": str(e)})
            return
        place(self.img(image), self.src)
        self.backup(t, rep, name, step, step)
        rmtree(work)

    def run(self, reserve=0.0):
        """All repetitions; stops early (and says so in self.note) when one
        more repetition would not fit in --budget minutes, keeping `reserve`
        seconds for what follows (the RBD section)."""
        names = list(self.tools)
        self.reps_done = 0
        self.note = ""
        longest = 0.0
        for rep in range(1, self.args.reps + 1):
            left = budget_left() - reserve
            if rep > 1 and left < longest:
                self.note = ("stopped after %d of %d repetitions: one more (~%.1f min each on this machine "
                             "right now) would overrun the %g min budget (`--budget`)" % (
                                 rep - 1, self.args.reps, longest / 60, self.args.budget))
                log(self.note)
                break
            t_rep = time.monotonic()
            log("repetition %d/%d: ext4 base + day 2 + restore" % (rep, self.args.reps))
            for n in names:
                self.scenario_ext4(n, rep)
            log("repetition %d/%d: random image" % (rep, self.args.reps))
            for n in names:
                self.scenario_single(n, rep, "random.img", "random")
            log("repetition %d/%d: sparse image" % (rep, self.args.reps))
            for n in names:
                self.scenario_single(n, rep, "sparse.img", "sparse")
            self.reps_done = rep
            longest = max(longest, time.monotonic() - t_rep)
        rmtree(self.src)
        rmtree(self.work_root)


# ----------------------------------------------------------------------------
# RBD section

class RbdBench:
    def __init__(self, args, data, logdir, bv_ok):
        self.args = args
        self.data = data
        self.logdir = logdir
        self.bv_ok = bv_ok
        self.samples = {}   # (step) -> [sample]
        self.notes = []
        self.read_notes = {}
        self.skipped = None
        self.cluster_dir = None
        self.pool = os.environ.get("BENCH_RBD_POOL", "rbd")

    def rbd(self, *a, check=True):
        return sh(["rbd", "--pool", self.pool] + list(a), check=check, env=self.env)

    def start(self):
        conf = os.environ.get("CEPH_CONF")
        if not conf and self.args.ceph:
            self.cluster_dir = os.path.join(OUT, "ceph")
            starter = os.path.join(REPO, "tests", "ceph", "start-cluster.sh")
            stopper = os.path.join(REPO, "tests", "ceph", "stop-cluster.sh")
            if not os.access(starter, os.R_OK):
                self.skipped = "--ceph given but %s does not exist" % os.path.relpath(starter, REPO)
                return False
            if os.path.exists(self.cluster_dir):
                sh(["bash", stopper, self.cluster_dir], check=False)
            log("starting a throwaway Ceph cluster: tests/ceph/start-cluster.sh bench/out/ceph")
            r = sh(["bash", starter, self.cluster_dir], check=False,
                   env=dict(os.environ, BV_CEPH_OSD_GB=os.environ.get("BV_CEPH_OSD_GB", "24")))
            m = re.search(r"CEPH_CONF=(\S+)", r.stdout)
            if r.returncode != 0 or not m:
                self.skipped = "tests/ceph/start-cluster.sh failed: " + tail(r.stderr, 2)
                return False
            conf = m.group(1)
            self.notes.append("cluster: throwaway single-node cluster from tests/ceph/start-cluster.sh "
                              "(memstore OSD: RBD data lives in RAM)")
        if not conf:
            self.skipped = "CEPH_CONF is not set (start a test cluster with tests/ceph/start-cluster.sh DIR, " \
                           "or pass --ceph)"
            return False
        self.env = dict(os.environ, CEPH_CONF=conf)
        r = sh(["rbd", "--pool", self.pool, "ls"], check=False, env=self.env)
        if r.returncode != 0:
            self.skipped = "cannot list pool %s with CEPH_CONF=%s: %s" % (self.pool, conf, tail(r.stderr, 1))
            return False
        return True

    def stop(self):
        if self.cluster_dir:
            sh(["bash", os.path.join(REPO, "tests", "ceph", "stop-cluster.sh"), self.cluster_dir], check=False)

    def record(self, step, s):
        self.samples.setdefault(step, []).append(s)
        log("  rbd %-34s wall %7.2fs cpu %7.2fs rss %6.0f MiB %s %s" % (
            step, s["wall"], s["cpu"] or 0, (s["rss_kib"] or 0) / 1024,
            "out %.1f MiB" % (s["store"] / 2**20) if s.get("store") is not None else "",
            "ok" if s["ok"] else "FAILED " + s.get("error", "")))

    def timed_shell(self, step, cmd, rep, outfile=None):
        lb = os.path.join(self.logdir, "rbd-r%d-%s" % (rep, re.sub(r"[^\w]+", "_", step)))
        s = run_timed(["bash", "-o", "pipefail", "-c", cmd], lb, env=self.env)
        if outfile:
            s["store"] = os.path.getsize(outfile) if os.path.exists(outfile) else None
        self.record(step, s)
        return s

    def remove_image(self, img):
        self.rbd("snap", "purge", img, check=False)
        # blockvault may have protected its snapshots
        r = self.rbd("snap", "ls", img, "--format", "json", check=False)
        try:
            for snap in json.loads(r.stdout or "[]"):
                self.rbd("snap", "unprotect", "%s@%s" % (img, snap["name"]), check=False)
        except ValueError:
            pass
        self.rbd("snap", "purge", img, check=False)
        self.rbd("rm", "--no-progress", img, check=False)

    def bv(self, img, rep, tag):
        work = os.path.join(OUT, "work", "rbd-%s" % tag)
        rmtree(work)
        return Blockvault(work, None, source_url="rbd:%s/%s" % (self.pool, img),
                          extra_env={"CEPH_CONF": self.env["CEPH_CONF"]}), work

    def bv_backup(self, bv, rep, step, record=True):
        lb = os.path.join(self.logdir, "rbd-r%d-%s" % (rep, re.sub(r"[^\w]+", "_", step)))
        s = run_timed(bv.backup("x"), lb, env=bv.env)
        s["store"] = du_sb(bv.store_paths())
        if record:
            self.record(step, s)
        elif not s["ok"]:
            log("  rbd %s FAILED %s" % (step, s.get("error", "")))
        return s

    def bv_start(self, img, tag, first_step):
        """A fresh blockvault store for `img` and its first (full) backup.
        Returns the Blockvault tool, or None after setting self.bv_reason."""
        if self.bv_reason is not None:
            return None
        bv, work = self.bv(img, 0, tag)
        r = sh(bv.init()[0], check=False, env=bv.env)
        if r.returncode != 0:
            self.bv_reason = "blockvault init failed: " + tail(r.stdout + r.stderr)
            return None
        s = self.bv_backup(bv, 0, first_step)
        if not s["ok"]:
            self.bv_reason = "blockvault backup of an rbd: source failed: " + s.get("error", "")
            return None
        return bv

    def bv_incr(self, bv, rep, step):
        if bv is None or self.bv_reason is not None:
            return
        s = self.bv_backup(bv, rep, step)
        if not s["ok"]:
            self.bv_reason = "blockvault rbd incremental failed: " + s.get("error", "")
            return
        # what the incremental read from the cluster, next to what changed
        r = sh(bv.base() + ["list", "--json"], check=False, env=bv.env)
        try:
            last = json.loads(r.stdout)[-1]
            self.read_notes.setdefault(step, []).append(
                "%.0f MiB read from the cluster, %d blocks patched from the parent" % (
                    last["read_bytes"] / 2**20, last.get("patched_blocks", 0)))
        except (ValueError, KeyError, IndexError):
            pass

    def rewrite(self, img, rep, total):
        """Snapshot a<rep>, `rbd bench` random 64K writes, snapshot b<rep>."""
        self.rbd("snap", "create", "%s@a%d" % (img, rep))
        self.rbd("bench", "--io-type", "write", "--io-pattern", "rand", "--io-size", "64K",
                 "--io-total", total, img)
        self.rbd("snap", "create", "%s@b%d" % (img, rep))

    def drop_snaps(self, img, rep):
        for snap in ("a%d" % rep, "b%d" % rep):
            self.rbd("snap", "rm", "--no-progress", "%s@%s" % (img, snap), check=False)

    def run(self):
        smoke = self.args.smoke
        rewrite = "2M" if smoke else "80M"
        feats = ["--image-feature", "layering,exclusive-lock,object-map,fast-diff"]
        base = os.path.join(self.data["dir"], "base.img")
        outdir = os.path.join(OUT, "rbd")
        os.makedirs(outdir, exist_ok=True)
        self.bv_reason = None if self.bv_ok else "blockvault unavailable"
        zf = os.path.join(outdir, "diff.zst")

        # 1. base.img imported once; each repetition rewrites ~2 % between two
        #    snapshots and measures the diff; blockvault backs up after each.
        img = "bvbench-%d" % os.getpid()
        spec = "%s/%s" % (self.pool, img)
        log("rbd: import base.img as %s, blockvault first backup" % spec)
        try:
            self.rbd("import", "--no-progress", "--image-format", "2", *feats, base, img)
            bv = self.bv_start(img, "main", "blockvault first backup (full read)")
            for rep in range(1, self.args.reps + 1):
                if rep > 1 and budget_left() < 60:
                    self.notes.append("stopped after %d repetition(s): out of --budget" % (rep - 1))
                    break
                log("rbd repetition %d/%d: rewrite %s, export-diff, blockvault incremental" % (rep, self.args.reps, rewrite))
                self.rewrite(img, rep, rewrite)
                snaps = "--from-snap a%d %s@b%d" % (rep, spec, rep)
                self.timed_shell("rbd export-diff > /dev/null",
                                 "rbd export-diff --no-progress %s - > /dev/null" % snaps, rep)
                self.timed_shell("rbd export-diff, piped to zstd -1 > file",
                                 "rbd export-diff --no-progress %s - | zstd -1 -q > %s" % (snaps, zf), rep, zf)
                self.timed_shell("rbd export (full) > /dev/null",
                                 "rbd export --no-progress %s@b%d - > /dev/null" % (spec, rep), rep)
                self.bv_incr(bv, rep, "blockvault incremental")
                self.drop_snaps(img, rep)
                rmtree(zf)
        except subprocess.CalledProcessError as e:
            self.notes.append("`%s` failed: %s" % (" ".join(e.cmd), tail(e.stderr, 2)))
            log(self.notes[-1])
        finally:
            self.remove_image(img)
            rmtree(os.path.join(OUT, "work"))

        # 2. scaling: the same amount of scattered writes on a small and on a
        #    large (sparse) image; blockvault's incremental should not grow
        #    with the image size.
        writes = "1M" if smoke else "40M"
        for sz in (["64M", "256M"] if smoke else ["1G", "16G"]):
            img = "bvbench-%d-%s" % (os.getpid(), sz)
            spec = "%s/%s" % (self.pool, img)
            log("rbd scaling: %s sparse image, %s of random 64K writes per repetition" % (sz, writes))
            try:
                self.rbd("create", "--size", sz, *feats, img)
                bv = self.bv_start(img, "scale-" + sz, "scaling %s: blockvault first backup" % sz)
                for rep in range(1, self.args.reps + 1):
                    if rep > 1 and budget_left() < 30:
                        self.notes.append("scaling %s: stopped after %d repetition(s): out of --budget" % (sz, rep - 1))
                        break
                    self.rewrite(img, rep, writes)
                    self.timed_shell("scaling %s: rbd export-diff > /dev/null" % sz,
                                     "rbd export-diff --no-progress --from-snap a%d %s@b%d - > /dev/null" % (rep, spec, rep), rep)
                    self.bv_incr(bv, rep, "scaling %s: blockvault incremental" % sz)
                    self.drop_snaps(img, rep)
            except subprocess.CalledProcessError as e:
                self.notes.append("scaling %s: `%s` failed: %s" % (sz, " ".join(e.cmd), tail(e.stderr, 2)))
                log(self.notes[-1])
            finally:
                self.remove_image(img)
                rmtree(os.path.join(OUT, "work"))
        if self.bv_reason:
            self.notes.append("blockvault RBD rows skipped: " + self.bv_reason)


# ----------------------------------------------------------------------------
# Report

def med(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def fmt(v, f="%.2f"):
    return "—" if v is None else f % v


def ratio(v, ref):
    if v is None or not ref:
        return "n/a"
    r = v / ref
    return ("%.1f× blockvault" if r >= 0.95 else "%.2f× blockvault") % r


def summarize(samples):
    ok = [s for s in samples if s["ok"]]
    d = {"n": len(samples), "ok": len(ok),
         "errors": sorted({s.get("error", "") for s in samples if not s["ok"]})}
    if ok:
        d["wall"] = med(s["wall"] for s in ok)
        d["cpu"] = med(s["cpu"] for s in ok)
        d["rss"] = med(s["rss_kib"] / 1024 if s["rss_kib"] else None for s in ok)
        d["store"] = med(s["store"] / 2**20 if s.get("store") is not None else None for s in ok)
        d["walls"] = [round(s["wall"], 2) for s in ok]
    return d


def table_rows(steps, names, samples, ref_name="blockvault", ref_of=None):
    rows = []
    for key, label in steps:
        sums = {n: summarize(samples[(key, n)]) for n in names if (key, n) in samples}
        ref = sums.get(ref_name, {}).get("wall") if ref_of is None else ref_of
        for n in names:
            if n not in sums:
                continue
            d = sums[n]
            if not d["ok"]:
                rows.append("| %s | %s | failed | | | | | %s |" % (label, n, "; ".join(d["errors"])[:300].replace("|", "/")))
                continue
            r = "1.0× (ref)" if n == ref_name else ratio(d["wall"], ref)
            note = "" if d["ok"] == d["n"] else "%d of %d runs failed: %s" % (
                d["n"] - d["ok"], d["n"], "; ".join(d["errors"])[:200].replace("|", "/"))
            rows.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                label, n, fmt(d["wall"]), fmt(d["cpu"]), fmt(d["rss"], "%.0f"), fmt(d["store"], "%.1f"), r,
                (" ".join("%.2f" % w for w in d["walls"]) + ("; " + note if note else ""))))
    return rows


def machine_info():
    cpu = "?"
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else "?"
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s*(\d+) kB", f.read(), re.M)
            mem = "%.1f GiB" % (int(m.group(1)) / 2**20)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": mem, "kernel": platform.release(),
            "load": os.getloadavg()}


def write_report(path, args, cmdline, minfo, data, tool_info, runner, rbd, total_s, build_note):
    names = list(runner.tools)
    L = []
    L.append("# blockvault benchmark%s" % (" (smoke: tiny data, not meaningful)" if args.smoke else ""))
    L.append("")
    dirty = out_of(["git", "-C", REPO, "status", "--porcelain", "--", "agent", "store", "catalog", "Cargo.toml", "Cargo.lock"])
    L.append("Generated by `bench/run.sh` on %s (UTC), blockvault built from commit `%s`%s." % (
        datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), out_of(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]) or "?",
        " plus uncommitted changes in the work tree" if dirty else ""))
    L.append("")
    L.append("    %s" % cmdline)
    L.append("")
    L.append("Machine: %d cores (`nproc`), %s, %s RAM, kernel %s; load average at start %.1f/%.1f/%.1f "
             "(the machine is shared, so wall times are noisy)." % (
                 minfo["nproc"], minfo["cpu"], minfo["ram"], minfo["kernel"], *minfo["load"]))
    L.append("")
    imgs = data.get("images", {})
    gib = lambda b: "%.0f GiB" % (b / 2**30) if b >= 2**30 else "%.0f MiB" % (b / 2**20)
    mib = lambda b: "%.0f MiB" % (b / 2**20)
    L.append("## Data (`%s`)" % os.path.relpath(data["dir"], REPO))
    L.append("")
    for name, what in (("base.img", "ext4 image, Debian minbase root filesystem (`debootstrap --variant=minbase`%s)" % (
                            ", " + data["mirror"] if data.get("mirror") else "")),
                       ("day2.img", "copy of base.img after `apt-get install %s` in a chroot on the loop-mounted copy" %
                        os.environ.get("BENCH_DAY2_PACKAGES", "python3")),
                       ("random.img", "random bytes"),
                       ("sparse.img", "mostly holes, with random and text pieces written at scattered offsets")):
        if args.smoke and name in ("base.img", "day2.img"):
            what = {"base.img": "tiny ext4 image filled from a few .deb packages (smoke)",
                    "day2.img": "copy of base.img with more packages extracted into it (smoke)"}[name]
        i = imgs.get(name)
        if i:
            L.append("- `%s`: %s, %s allocated — %s%s" % (
                name, gib(i["size"]), mib(i["allocated"]), what,
                "; built in %.0f s" % i["build_seconds"] if i.get("build_seconds") else ""))
    if "day2_blocks_differ" in data:
        L.append("- base → day 2: **%d of %d** 4 MiB blocks differ" % (data["day2_blocks_differ"], data["day2_blocks_total"]))
    L.append("")
    L.append("## Tools")
    L.append("")
    for n, (cls, ver, reason) in tool_info.items():
        L.append("- %s: %s" % (n, ver if cls else "**skipped**: " + reason))
    L.append("")
    L.append("Settings: restic `--compression auto` (repository v2, zstd), `RESTIC_PASSWORD` from the environment; "
             "borg `--encryption none --chunker-params fixed,4194304 --compression zstd,3`, restore with `borg extract --sparse`; "
             "Benji SQLite catalog, file storage, 4 MiB blocks, zstd level 3 transform, incremental with `-f <previous version>`, "
             "restore with `--sparse`; blockvault `init`/`backup disk`/`restore disk --to`. "
             "Each tool gets a fresh repository per repetition; the image is always the same path (`bench/out/src/disk.img`, "
             "a hard link to the cached image), switched from base to day 2 between the two backups (untimed). "
             "Store size is `du -sb` of the repository (blockvault: store + catalog; Benji: storage + SQLite; "
             "restic/borg client caches excluded).")
    L.append("")
    L.append("Page cache: %s. Repetitions: %d of %d asked (alternating tools), figures are medians. %s" % (
        "dropped before every timed command (`echo 3 > /proc/sys/vm/drop_caches`), so reads are cold"
        if Cache.can_drop else "could NOT be dropped, runs are warm", runner.reps_done, args.reps, build_note))
    if runner.note:
        L.append("")
        L.append("**Note:** " + runner.note + ".")
    L.append("")
    L.append("## Disk images")
    L.append("")
    L.append("| step | tool | wall s | CPU s | peak RSS MiB | store MiB | wall vs blockvault | wall of each run |")
    L.append("|---|---|---:|---:|---:|---:|---|---|")
    L.extend(table_rows(STEPS, names, runner.samples))
    L.append("")
    L.append("CPU = user + system time of the process and its children; peak RSS = largest process "
             "(`/usr/bin/time -v`). Restore writes a new file, compared byte for byte with day2.img afterwards (untimed; a `cmp` that skips holes common to both files, GNU cmp being too slow on 4 GiB sparse files here).")
    L.append("")
    L.append("## RBD (`rbd export-diff` vs blockvault)")
    L.append("")
    if rbd is None or rbd.skipped:
        L.append("skipped: %s" % (rbd.skipped if rbd else "--no-rbd given"))
    else:
        def touched(image_mib, written_mib):
            objs, writes = image_mib // 4, written_mib * 16   # 4 MiB objects, 64 KiB writes
            return "%d random 64 KiB writes touch ≈%.0f %% of the %d 4 MiB objects" % (
                writes, 100 * (1 - (1 - 1 / objs) ** writes), objs)
        if args.smoke:
            main_mib, rw_mib, scale, sc_mib = 64, 2, (64, 256), 1
        else:
            main_mib, rw_mib, scale, sc_mib = 4096, 80, (1024, 16384), 40
        L.append("Pool `%s`. A %s image (features layering, exclusive-lock, object-map, fast-diff) filled by "
                 "`rbd import` of base.img, then backed up once by blockvault (source `rbd:%s/IMAGE`; it takes "
                 "its own `blockvault-*` snapshots). Each repetition: snapshot aN, `rbd bench --io-type write "
                 "--io-pattern rand --io-size 64K --io-total %dM` (~2 %% of the bytes, but %s), snapshot bN, "
                 "then the timed `rbd export-diff --from-snap aN img@bN` variants, `rbd export img@bN`, and "
                 "blockvault's next (incremental) backup. Scaling: %s and %s sparse images, %d MiB of the same "
                 "writes per repetition (%s; %s)." % (
                     rbd.pool, gib(main_mib << 20), rbd.pool, rw_mib, touched(main_mib, rw_mib),
                     gib(scale[0] << 20), gib(scale[1] << 20), sc_mib,
                     touched(scale[0], sc_mib), touched(scale[1], sc_mib)) +
                 " The ratio column is relative to blockvault's incremental of the same image.")
        L.append("")
        L.append("| step | wall s | CPU s | peak RSS MiB | output / store MiB | wall vs blockvault incr. | wall of each run |")
        L.append("|---|---:|---:|---:|---:|---|---|")
        ref = summarize(rbd.samples["blockvault incremental"]).get("wall") if "blockvault incremental" in rbd.samples else None
        for step, ss in rbd.samples.items():
            d = summarize(ss)
            if not d["ok"]:
                L.append("| %s | failed | | | | | %s |" % (step, "; ".join(d["errors"])[:300].replace("|", "/")))
                continue
            sref = ref
            m = re.match(r"scaling (\S+):", step)
            if m:
                k = "scaling %s: blockvault incremental" % m.group(1)
                sref = summarize(rbd.samples[k]).get("wall") if k in rbd.samples else None
            r = ("1.0× (ref)" if step.endswith("blockvault incremental")
                 else "—" if "first backup" in step else ratio(d["wall"], sref))
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                step, fmt(d["wall"]), fmt(d["cpu"]), fmt(d["rss"], "%.0f"), fmt(d["store"], "%.1f"), r,
                " ".join("%.2f" % w for w in d.get("walls", []))))
        L.append("")
        L.append("`rbd bench` fills each write with one repeated byte, so the compressed diff is tiny: "
                 "its size says nothing about compression ratios. %s." % (out_of(["rbd", "--version"]) or "rbd ?"))
        if rbd.read_notes:
            L.append("")
            L.append("What each blockvault incremental read from the cluster (whole changed blocks, "
                     "and only the changed extents of blocks patched from the parent backup's chunk):")
            L.append("")
            for step, ns in rbd.read_notes.items():
                L.append("- %s: %s" % (step, "; ".join(ns)))
        for n in rbd.notes:
            L.append("")
            L.append("- " + n)
    L.append("")
    L.append("Whole run: %.1f min, of which %.1f min setup (data check, installs, build; not counted "
             "against `--budget` %s); load average at the end %.1f/%.1f/%.1f." % (
        total_s / 60, data.get("setup_seconds", 0) / 60,
        ("%g min" % args.budget) if args.budget else "(none)", *os.getloadavg()))
    L.append("")
    text = "\n".join(L)
    with open(path, "w") as f:
        f.write(text)
    return text


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny data, 1 repetition: checks the harness end to end")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 3; 1 with --smoke)")
    ap.add_argument("--tools", default="blockvault,restic,borg,benji,rustic",
                    help="comma-separated subset (rustic only runs if installed or BENCH_RUSTIC=1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="minutes for the whole run (default 20; 0 = no limit): repetitions that would "
                         "overrun it are left out, and the report says so")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/blockvault")
    ap.add_argument("--no-rbd", action="store_true", help="skip the RBD section")
    ap.add_argument("--ceph", action="store_true",
                    help="when CEPH_CONF is unset, start a throwaway cluster with tests/ceph/start-cluster.sh")
    ap.add_argument("--out", default=None, help="markdown report path (default bench/results.md; "
                                                "bench/out/results-smoke.md with --smoke)")
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 1 if args.smoke else 3
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.budget is None:
        args.budget = 20.0
    global BUDGET_S
    BUDGET_S = args.budget * 60 if args.budget > 0 else None
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (loop mounts, chroot, drop_caches)")
    report = args.out or (os.path.join(OUT, "results-smoke.md") if args.smoke else os.path.join(BENCH, "results.md"))
    cmdline = os.environ.get("BENCH_CMD") or "bench/run.sh " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    os.makedirs(OUT, exist_ok=True)
    lock = open(os.path.join(OUT, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit("bench: another bench/run.sh is running (bench/out/.lock)")
    logdir = os.path.join(OUT, "logs")
    rmtree(logdir)
    os.makedirs(logdir)
    minfo = machine_info()

    if not os.access(GNU_TIME, os.X_OK):
        log("apt-get install time")
        ok, err = apt_install(["time"])
        if not ok:
            sys.exit("bench: /usr/bin/time missing and apt-get install time failed: " + err)

    data = ensure_data(args)
    t_tools = time.monotonic()
    tool_info = setup_tools(args, logdir)
    build_note = "Tool setup (build/install) took %.0f s, not part of any figure." % (time.monotonic() - t_tools)
    for n, (cls, ver, reason) in tool_info.items():
        log("tool %-10s %s" % (n, ver if cls else "SKIPPED: " + reason))
    tools = {n: cls for n, (cls, ver, reason) in tool_info.items() if cls}
    if not tools:
        sys.exit("bench: no tool available")

    global BUDGET_T0
    BUDGET_T0 = time.monotonic()
    setup_s = BUDGET_T0 - T0
    Cache.drop()
    if not Cache.can_drop:
        log("cannot drop the page cache: runs are warm")
    runner = Runner(args, data, tools, logdir)
    want_rbd = not args.no_rbd and (os.environ.get("CEPH_CONF") or args.ceph)
    # keep time for the RBD section: ~4 min full, ~1 min smoke
    runner.run(reserve=(60 if args.smoke else 240) if want_rbd else 0)

    rbd = None
    if not args.no_rbd:
        rbd = RbdBench(args, data, logdir, "blockvault" in tools)
        try:
            if rbd.start():
                rbd.run()
        finally:
            rbd.stop()
        if rbd.skipped:
            log("rbd: skipped: " + rbd.skipped)

    total = time.monotonic() - T0
    data["setup_seconds"] = setup_s
    with open(os.path.join(OUT, "results-smoke.json" if args.smoke else "results.json"), "w") as f:
        json.dump({"command": cmdline, "machine": minfo, "data": data,
                   "tools": {n: {"version": v, "skipped": r} for n, (c, v, r) in tool_info.items()},
                   "samples": [{"step": k[0], "tool": k[1], "runs": v} for k, v in runner.samples.items()],
                   "rbd": {"skipped": rbd.skipped if rbd else "--no-rbd",
                           "samples": rbd.samples if rbd else {}, "notes": rbd.notes if rbd else []},
                   "total_seconds": total}, f, indent=1)
    text = write_report(report, args, cmdline, minfo, data, tool_info, runner, rbd, total, build_note)
    print(text)
    log("wrote %s (%.1f min)" % (os.path.relpath(report, REPO), total / 60))
    failed = [k for k, v in runner.samples.items() if not any(s["ok"] for s in v)]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
