"""Bundle pack and verify throughput against plain hashlib sha256 over the same bytes.

Run from the repo root: `.venv/bin/python bench/bundle.py [--mb 100] [--repeat 3]`.
A bundle holding one file of random (incompressible) bytes is packed (stored, since it
is above the deflate threshold), signed and verified; the same file is hashed with
hashlib alone. Best of N runs each, page cache warm for all. The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgewise.bundle import generate_keypair, load_public_key, pack, sign, verify

MANIFEST = {
    "name": "bench",
    "version": "1.0.0",
    "format": "onnx",
    "model": "model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 1]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 1]}],
    "requires": {"runtime": "onnxruntime"},
}


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sha256_only(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=100, help="payload size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="ew-bench-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src"
        src.mkdir()
        (src / "manifest.json").write_text(json.dumps(MANIFEST))
        with open(src / "model.onnx", "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1024 * 1024))
        key, pub = generate_keypair("bench", tmp / "keys")
        trust = [load_public_key(pub)]
        out = tmp / "bench.ewb"

        sha_s = best_of(args.repeat, lambda: sha256_only(src / "model.onnx"))
        pack_s = best_of(args.repeat, lambda: pack(src, out))
        sign_s = best_of(1, lambda: sign(out, key, check_files=False))
        verify_s = best_of(args.repeat, lambda: verify(out, trust))
        bundle_sha_s = best_of(args.repeat, lambda: sha256_only(out))

    mb = size / 1e6
    rows = [
        ("sha256 (hashlib) of payload", sha_s),
        ("sha256 (hashlib) of bundle", bundle_sha_s),
        ("pack", pack_s),
        ("sign (manifest only)", sign_s),
        ("verify (sigs + sizes + sha256)", verify_s),
    ]
    print(f"payload {args.mb} MiB random bytes, best of {args.repeat}")
    print(f"{'operation':34} {'seconds':>9} {'MB/s':>9}")
    for name, seconds in rows:
        print(f"{name:34} {seconds:9.3f} {mb / seconds:9.1f}")
    result = {
        "size_mb": round(mb, 1),
        "sha256_mb_s": round(mb / sha_s, 1),
        "pack_mb_s": round(mb / pack_s, 1),
        "verify_mb_s": round(mb / verify_s, 1),
        "pack_vs_sha256": round(sha_s / pack_s, 3),
        "verify_vs_sha256": round(sha_s / verify_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
