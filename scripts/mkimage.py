#!/usr/bin/env python3
"""Builds a single-layer docker-archive image (what `ctr images import` and `docker load`
read) from host files, without a registry or a container engine. The output depends on the
inputs only (every mtime is 0), so a rebuild from the same files gives the same bytes.

usage: mkimage.py OUT.tar REPO:TAG [--entrypoint JSON] [--cmd JSON] [--user U[:G]]
                  [--env K=V]... [--workdir DIR] [--expose PORT/tcp]... SPEC...
  SRC:DEST              host file SRC at DEST (mode kept, owned by root)
  @link:DEST:TARGET     symlink DEST -> TARGET
  @dir:DEST[:UID:GID:MODE]  empty directory (default root, 0755; /tmp is 1777)
"""
import argparse
import hashlib
import io
import json
import os
import tarfile

BASE_DIRS = ("tmp", "etc", "proc", "sys", "dev", "var/run")


def layer_bytes(specs):
    layer = io.BytesIO()
    dirs = set()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:

        def adddir(d):
            d = d.strip("/")
            if not d or d in dirs:
                return
            adddir(os.path.dirname(d))
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o1777 if d == "tmp" else 0o755
            t.addfile(ti)
            dirs.add(d)

        for d in BASE_DIRS:
            adddir(d)
        for s in specs:
            if s.startswith("@link:"):
                _, dest, target = s.split(":", 2)
                adddir(os.path.dirname(dest))
                ti = tarfile.TarInfo(dest.strip("/"))
                ti.type = tarfile.SYMTYPE
                ti.linkname = target
                t.addfile(ti)
            elif s.startswith("@dir:"):
                dest, *owner = s[5:].split(":")
                if not owner:
                    adddir(dest)
                    continue
                uid, gid, mode = owner
                adddir(os.path.dirname(dest.rstrip("/")))
                ti = tarfile.TarInfo(dest.strip("/"))
                ti.type = tarfile.DIRTYPE
                ti.uid, ti.gid, ti.mode = int(uid), int(gid), int(mode, 8)
                t.addfile(ti)
                dirs.add(dest.strip("/"))
            else:
                src, dest = s.split(":", 1)
                adddir(os.path.dirname(dest))
                ti = t.gettarinfo(src, dest.strip("/"))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = 0
                with open(src, "rb") as f:
                    t.addfile(ti, f)
    return layer.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("ref")
    ap.add_argument("--entrypoint", type=json.loads)
    ap.add_argument("--cmd", type=json.loads)
    ap.add_argument("--user")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir")
    ap.add_argument("--expose", action="append", default=[])
    ap.add_argument("specs", nargs="*")
    a = ap.parse_intermixed_args()

    data = layer_bytes(a.specs)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env}
    if a.entrypoint is not None:
        config["Entrypoint"] = a.entrypoint
    if a.cmd is not None:
        config["Cmd"] = a.cmd
    if a.user:
        config["User"] = a.user
    if a.workdir:
        config["WorkingDir"] = a.workdir
    if a.expose:
        config["ExposedPorts"] = {p: {} for p in a.expose}
    image = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/mkimage.py"}],
    }
    cfg = json.dumps(image, separators=(",", ":"), sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    layer_name = diff_id[7:] + "/layer.tar"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [a.ref], "Layers": [layer_name]}]).encode()
    with tarfile.open(a.out, "w") as t:
        for name, blob in ((layer_name, data), (cfg_name, cfg), ("manifest.json", manifest)):
            if "/" in name:
                di = tarfile.TarInfo(os.path.dirname(name))
                di.type = tarfile.DIRTYPE
                di.mode = 0o755
                t.addfile(di)
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            t.addfile(ti, io.BytesIO(blob))
    print(a.out, a.ref, diff_id)


if __name__ == "__main__":
    main()
