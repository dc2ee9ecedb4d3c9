"""The model fingerprint: the root of every block key (store/keys.py), so a stale KV block is
never served. It changes whenever any weight byte, the architecture config, the dtype, the block
size or the KV layout version changes.

Weights are identified by an xxh3-128 of every byte of every weight file. Reading a checkpoint
once costs what the disk's read speed says (docs/engine.md has the figure for an 8B-sized
file); the digest is cached, keyed by each file's identity (size, modification and change
times, inode, device), in `.kvgate-weights.json` beside the weights when that directory is
writable, else in the user cache directory ($XDG_CACHE_HOME/kvgate, ~/.cache/kvgate). Rewriting
a file, in place or not, changes its identity (the change time cannot be set back), so it is
hashed again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from engine.config import user_cache_dir

log = logging.getLogger("kvgate.engine")

KV_LAYOUT_VERSION = 1     # bump when the meaning of a stored block's bytes changes
CACHE_NAME = ".kvgate-weights.json"
_CHUNK = 64 << 20


def fingerprint(config, weights: str, dtype: torch.dtype, block_size: int) -> str:
    """`weights` identifies the weights (`weights_identity`, or a seed for random ones)."""
    volatile = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation")
    arch = {k: v for k, v in config.to_dict().items() if k not in volatile}
    blob = json.dumps(dict(arch=arch, weights=weights, dtype=str(dtype), block_size=block_size,
                           kv_layout=KV_LAYOUT_VERSION), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def weight_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin")))


def weights_identity(path: str) -> str:
    """A digest of every weight file in the model directory `path` (cached, see above)."""
    files = weight_files(path)
    cache_file, cache = _read_cache(path)
    digests, todo = {}, []
    for f in files:
        name, identity = os.path.basename(f), _identity(f)
        entry = cache.get(name)
        if entry and entry.get("identity") == identity:
            digests[name] = entry["xxh3_128"]
        else:
            todo.append((f, name, identity))
    if todo:
        start = time.perf_counter()
        with ThreadPoolExecutor(min(4, len(todo))) as pool:   # xxhash releases the GIL
            for (f, name, identity), digest in zip(todo, pool.map(lambda t: hash_file(t[0]), todo)):
                digests[name] = digest
                cache[name] = {"identity": identity, "xxh3_128": digest}
        size = sum(i[0] for _, _, i in todo)
        log.info("hashed %d weight files (%.1f GB) in %.1f s for the model fingerprint", len(todo), size / 1e9,
                 time.perf_counter() - start)
        _write_cache(cache_file, path, {k: v for k, v in cache.items() if k in digests})
    h = xxhash.xxh3_128()
    for name in sorted(digests):
        h.update(f"{name}:{digests[name]}\n".encode())
    return "xxh3:" + h.hexdigest()


def _identity(f: str) -> list[int]:
    st = os.stat(f)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def hash_file(f: str) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _cache_paths(path: str) -> list[str]:
    """Beside the weights first, then in the user cache directory."""
    real = os.path.realpath(path)
    user = user_cache_dir()
    key = hashlib.sha256(real.encode()).hexdigest()[:16]
    return [os.path.join(real, CACHE_NAME), os.path.join(user, "kvgate", f"weights-{key}.json")]


def _read_cache(path: str) -> tuple[str | None, dict]:
    for f in _cache_paths(path):
        try:
            with open(f) as fh:
                doc = json.load(fh)
            if isinstance(doc, dict) and isinstance(doc.get("files"), dict):
                return f, doc["files"]
        except (OSError, ValueError):
            continue
    return None, {}


def _write_cache(found: str | None, path: str, files: dict) -> None:
    """Write where the cache was found, else the first place that takes it (atomically)."""
    for f in ([found] if found else []) + _cache_paths(path):
        tmp = f"{f}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(f), exist_ok=True)
            with open(tmp, "w") as fh:
                json.dump({"files": files}, fh)
            os.replace(tmp, f)
            return
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    log.warning("could not cache the weights digest of %s; it is hashed again at every start", path)


def main() -> None:
    """`python -m engine.fingerprint DIR [--cold]`: the cost of the weights digest at start-up,
    first (every file read, from disk with --cold) and then from the cache."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="a model directory (its *.safetensors / *.bin files are hashed)")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache first")
    args = parser.parse_args()
    files = weight_files(args.path)
    size = sum(os.path.getsize(f) for f in files)
    for f in _cache_paths(args.path):
        if os.path.isfile(f):
            os.unlink(f)
    if args.cold:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    start = time.perf_counter()
    weights_identity(args.path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    weights_identity(args.path)
    cached = time.perf_counter() - start
    print(f"{len(files)} files, {size / 1e9:.2f} GB{' (cold)' if args.cold else ''}: hashed in {first:.2f} s "
          f"({size / first / 1e9:.2f} GB/s); from the cache in {cached * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
