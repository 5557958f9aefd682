#!/usr/bin/env python
"""Fuzz the tar reader: random mutations of valid shards, each read in bounded time and memory.

Each case takes one of a few valid shards (ustar, GNU long names, PAX with path and size
records and a global header, a large member read on its own, and gzip versions of them),
mutates it (flips a bit, sets a byte, truncates, splices two shards, appends junk, sets a size
field to an extreme with or without a matching checksum, inserts a PAX size record), and runs:

- ``open_shard(path).samples()`` with no expectation, with block digests of the original
  (4 KiB blocks, so that small shards span many) and with its whole-file digest;
- ``index_shard(path)`` with and without digests;
- ``wdsrefresh.write.verify.verify(directory)`` against a manifest of the original.

A case passes when every run ends in samples or in a TarError / ShardChangedError whose
message names the shard, and:

- with block digests, every yielded sample equals the original's at the same index (a
  complete read yields exactly the original's samples);
- with the whole-file digest, a read that finishes without error yielded the original's;
- a read that completes and an index that succeeds agree on the number of samples;
- verify returns problems (never raises), each naming the shard, and at least one when the
  bytes differ from the original.

Every case runs under a watchdog (``--case-seconds``) and the process under an address-space
limit (``--memory-mib``): a hang or a runaway allocation fails the case rather than the
machine. Cases are reproducible: ``--seed S --only K`` reruns case K alone.

    python tools/fuzz.py --cases 5000 --seed 1
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import resource
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wdsrefresh.format import manifest as manifestmod  # noqa: E402
from wdsrefresh.format.digest import block_digest  # noqa: E402
from wdsrefresh.format.tario import Expected, ShardChangedError, TarError, index_shard, open_shard  # noqa: E402
from wdsrefresh.write.verify import verify  # noqa: E402

BLOCK = 4096  # block digests in the fuzz cover 4 KiB, so that every shard spans several blocks
MTIME = 1_700_000_000


class CaseTimeout(BaseException):
    """The watchdog fired: a BaseException, so that no ``except Exception`` swallows it."""


# --------------------------------------------------------------------------- valid shards


def _tar(members, fmt=tarfile.GNU_FORMAT, **kw) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, **kw) as tar:
        for name, data, extra in members:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            for key, value in extra.items():
                setattr(info, key, value)
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def _payload(i: int, size: int) -> bytes:
    seed = b"<%d>" % i
    return (seed * (size // len(seed) + 1))[:size]


def base_shards() -> dict[str, bytes]:
    """Name -> bytes of the valid shards every case starts from (small: tens of KB)."""
    sizes = (0, 1, 100, 511, 512, 513, 3000)
    plain = [(f"s{i:04d}.{ext}", _payload(i, sizes[(i + j) % len(sizes)]), {})
             for i in range(24) for j, ext in enumerate(("bin", "cls", "json"))]
    folder = "/".join(["a-long-directory-name"] * 6)
    gnu = [(f"{folder}/n{i:03d}.{ext}", _payload(i, 300 + i), {}) for i in range(12) for ext in ("png", "txt")]
    gnu[5:5] = [("dir", b"", {"type": tarfile.DIRTYPE}), ("dir/link.txt", b"", {"type": tarfile.SYMTYPE,
                                                                            "linkname": "elsewhere"})]
    pax = [(f"p{i:03d}.{ext}", _payload(i, 700), {"mtime": MTIME + 0.25}) for i in range(12) for ext in ("a", "b")]
    pax += [("d" * 120 + f"/x{i}.bin", _payload(i, 900), {}) for i in range(4)]  # path records
    pax += [(f"u{i}.txt", _payload(i, 10), {"uname": "ü" * 40}) for i in range(3)]
    large = [(f"L{i}.{ext}", _payload(i, size), {}) for i, size in enumerate((70_000, 5, 150_000))
             for ext in ("bin", "cls")]
    shards = {
        "plain.tar": _tar(plain, tarfile.USTAR_FORMAT),
        "gnu.tar": _tar(gnu, tarfile.GNU_FORMAT),
        "pax.tar": _tar(pax, tarfile.PAX_FORMAT, pax_headers={"comment": "fuzz"}),
        "large.tar": _tar(large, tarfile.GNU_FORMAT),
    }
    shards["plain.tgz"] = gzip.compress(shards["plain.tar"], mtime=0)
    shards["pax.tgz"] = gzip.compress(shards["pax.tar"], mtime=0)
    return shards


def header_offsets(tar_bytes: bytes) -> list[int]:
    """Offsets of every header block (extended ones included) of a valid tar."""
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for info in tar:
            offsets += sorted({info.offset, info.offset_data - 512})
    return offsets


# --------------------------------------------------------------------------- mutations


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


SIZE_FIELDS = {
    "zero": b"00000000000\0",
    "octal -1": b"-0000000001\0",
    "base-256 -1": b"\xff" * 12,
    "octal 8 GiB": b"77777777777\0",
    "octal 12 digits": b"777777777777",
    "base-256 50 GB": b"\x80" + (50 * 10**9).to_bytes(11, "big"),
    "base-256 2**80": b"\x80" + (2**80).to_bytes(11, "big"),
    "not a number": b"12345678x01\0",
}
PAX_SIZES = [b"-1536", b"-1", b"0", b"8589934592", b"%d" % 2**80, b"+5", b"1_0", b"9" * 30]


def _pax_block(value: bytes) -> bytes:
    body = b" size=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    data = b"%d" % length + body
    hdr = bytearray(512)
    hdr[0:14] = b"././@PaxHeader"
    hdr[100:108] = b"0000644\0"
    hdr[124:136] = b"%011o\0" % len(data)
    hdr[136:148] = b"%011o\0" % MTIME
    hdr[156:157] = b"x"
    hdr[257:265] = b"ustar\x0000"
    _checksum(hdr)
    return bytes(hdr) + data + bytes(-len(data) % 512)


@dataclass
class Mutant:
    data: bytes
    what: str
    breaks_a_checksum: bool = False  # a header the reader reads no longer matches its checksum


def mutate(rng: random.Random, name: str, shards: dict[str, bytes], tars: dict[str, bytes]) -> Mutant:
    """The mutated bytes of shard ``name``, described."""
    data = shards[name]
    gz = name.endswith(".tgz")
    kind = rng.choice(["flip", "flip header", "set byte", "truncate", "splice", "extend", "size field",
                       "pax size"])
    if gz and kind in ("flip header", "size field", "pax size"):
        # A mutation of the tar inside, compressed again: the reader meets it after gunzip.
        inner = mutate(rng, name[:-4] + ".tar", tars, tars)
        return Mutant(gzip.compress(inner.data, mtime=0), f"gzip of ({inner.what})", inner.breaks_a_checksum)
    if kind == "flip":
        at, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        return Mutant(data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :], f"flip bit {bit:#x} at {at}")
    if kind == "flip header":
        start = rng.choice(header_offsets(data))
        at, bit = start + rng.randrange(512), 1 << rng.randrange(8)
        # Any flip outside the checksum field changes the header's sum by a power of two.
        return Mutant(data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :], f"flip bit {bit:#x} in a header at {at}",
                      breaks_a_checksum=not 148 <= at - start < 156)
    if kind == "set byte":
        at, value = rng.randrange(len(data)), rng.randrange(256)
        return Mutant(data[:at] + bytes([value]) + data[at + 1 :], f"byte {at} = {value}")
    if kind == "truncate":
        cut = rng.randrange(len(data)) if rng.random() < 0.6 else rng.randrange(len(data) // 512 + 1) * 512
        return Mutant(data[:cut], f"truncate at {cut}")
    if kind == "splice":
        other = shards[rng.choice(sorted(shards))]
        a = rng.randrange(len(data) + 1)
        b = rng.randrange(len(other) + 1)
        if rng.random() < 0.5:
            a, b = a // 512 * 512, b // 512 * 512
        return Mutant(data[:a] + other[b:], f"splice {name}[:{a}] + other[{b}:]")
    if kind == "extend":
        junk = rng.choice([bytes(rng.randrange(1, 3000)), rng.randbytes(rng.randrange(1, 3000)),
                           data[: rng.randrange(1, 2048)]])
        return Mutant(data + junk, f"append {len(junk)} bytes")
    offsets = header_offsets(data)
    at = rng.choice(offsets)
    if kind == "size field":
        label = rng.choice(sorted(SIZE_FIELDS))
        hdr = bytearray(data[at : at + 512])
        hdr[124:136] = SIZE_FIELDS[label]
        fix = rng.random() < 0.8
        if fix:
            _checksum(hdr)
        return Mutant(data[:at] + bytes(hdr) + data[at + 512 :],
                      f"size field {label} at {at}, checksum {'fixed' if fix else 'stale'}",
                      breaks_a_checksum=not fix and sum(hdr) != sum(data[at : at + 512]))
    value = rng.choice(PAX_SIZES)
    return Mutant(data[:at] + _pax_block(value) + data[at:], f"PAX size={value[:24]!r} inserted at {at}")


# --------------------------------------------------------------------------- checks


@dataclass
class Failure:
    case: int
    shard: str
    mutation: str
    check: str
    detail: str


def _strip(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in samples]


def _read(path: str, expected: Expected | None) -> tuple[list[dict], BaseException | None]:
    samples: list[dict] = []
    reader, fd = None, None
    try:
        reader, fd = open_shard(path, path, expected)
        for sample in reader.samples():
            samples.append(sample)
        reader.finish()
        return samples, None
    except (CaseTimeout, KeyboardInterrupt):
        raise
    except BaseException as exn:  # noqa: BLE001 - every other exception is an outcome to judge
        return samples, exn
    finally:
        if fd is not None:
            os.close(fd)


def _named(exn: BaseException | None, path: str) -> str | None:
    """None when ``exn`` is an acceptable outcome (none, or a named tar/digest error)."""
    if exn is None:
        return None
    if isinstance(exn, (TarError, ShardChangedError)) and path in str(exn):
        return None
    return f"{type(exn).__name__}: {exn}"[:400]


class Original:
    """What a valid shard yields and how the snapshot describes it."""

    def __init__(self, path: str, data: bytes):
        self.data = data
        self.samples = _strip(_read(path, None)[0])
        index = index_shard(path)
        self.index = index
        self.blocks = b"".join(block_digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK))
        self.entry = {"nsamples": index.nsamples, "filesize": len(data), "digest": index.digest,
                      "blocks": index.blocks}


def check_case(path: str, mutant: Mutant, original: Original, directory: str) -> list[tuple[str, str]]:
    """(check, what went wrong) for each property the mutated shard breaks."""
    bad = []
    data = mutant.data
    plain, exn = _read(path, None)
    if (why := _named(exn, path)) is not None:
        bad.append(("read", why))
    if mutant.breaks_a_checksum and exn is None:
        bad.append(("read", "a header whose checksum no longer holds was read without error"))

    got, exn = _read(path, Expected(blocks=original.blocks, block_size=BLOCK))
    if (why := _named(exn, path)) is not None:
        bad.append(("read with block digests", why))
    if _strip(got) != original.samples[: len(got)]:
        bad.append(("read with block digests", "yielded a sample that differs from the original's"))
    elif exn is None and len(got) != len(original.samples):
        bad.append(("read with block digests", f"{len(got)} samples, the original has {len(original.samples)}"))

    got, exn = _read(path, Expected(digest=original.index.digest))
    if (why := _named(exn, path)) is not None:
        bad.append(("read with the whole-file digest", why))
    if exn is None and _strip(got) != original.samples:
        bad.append(("read with the whole-file digest", "finished without error on samples that differ"))

    for with_digest in (True, False):
        try:
            index = index_shard(path, with_digest=with_digest)
        except (CaseTimeout, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001
            if (why := _named(e, path)) is not None:
                bad.append((f"index (digest {with_digest})", why))
            continue
        if exn is None and index.complete and index.nsamples != len(plain) and not _read(path, None)[1]:
            bad.append((f"index (digest {with_digest})", f"{index.nsamples} samples, a read yields {len(plain)}"))

    name = os.path.basename(path)
    manifestmod.save(os.path.join(directory, manifestmod.DEFAULT_NAME),
                     [manifestmod.ManifestEntry(name, **original.entry)])
    try:
        problems = verify(directory)
    except (CaseTimeout, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001
        bad.append(("verify", f"raised {type(e).__name__}: {e}"[:400]))
    else:
        if any(p.shard != name for p in problems):
            bad.append(("verify", f"a problem that does not name the shard: {problems}"))
        if data != original.data and not problems:
            bad.append(("verify", "no problem found in a shard whose bytes changed"))
    return bad


# --------------------------------------------------------------------------- driver


def _alarm(signum, frame):
    raise CaseTimeout()


def run(cases: int, seed: int, only: int | None, case_seconds: float, verbose: bool) -> list[Failure]:
    shards = base_shards()
    tars = {k: v for k, v in shards.items() if k.endswith(".tar")}
    work = tempfile.mkdtemp(prefix="wdsrefresh-fuzz-")
    failures: list[Failure] = []
    outcomes: Counter = Counter()
    signal.signal(signal.SIGALRM, _alarm)
    try:
        originals = {}
        for name, data in shards.items():
            d = os.path.join(work, "orig")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "fuzz-" + name)
            Path(path).write_bytes(data)
            originals[name] = Original(path, data)
        t0 = time.monotonic()
        for case in range(cases) if only is None else [only]:
            rng = random.Random(f"{seed}:{case}")
            name = rng.choice(sorted(shards))
            mutant = mutate(rng, name, shards, tars)
            what = mutant.what
            directory = os.path.join(work, f"case{case}")
            os.makedirs(directory)
            path = os.path.join(directory, "fuzz-" + name)
            Path(path).write_bytes(mutant.data)
            signal.setitimer(signal.ITIMER_REAL, case_seconds)
            try:
                bad = check_case(path, mutant, originals[name], directory)
            except CaseTimeout:
                bad = [("watchdog", f"still running after {case_seconds} s")]
            except MemoryError:
                bad = [("memory", "MemoryError outside a read")]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcomes[(what.split(" ")[0] if not what.startswith("gzip") else "gzip(tar)", "bad" if bad else "ok")] += 1
            for check, detail in bad:
                failures.append(Failure(case, name, what, check, detail))
            if verbose or bad:
                print(f"case {case}: {name}: {what}: {'OK' if not bad else bad}", flush=True)
            shutil.rmtree(directory)
        elapsed = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kinds = sorted({k for k, _ in outcomes})
    print(f"{cases if only is None else 1} cases, seed {seed}, {elapsed:.1f} s; by mutation (ok/failed):")
    for k in kinds:
        print(f"  {k:12s} {outcomes[(k, 'ok')]:6d} / {outcomes[(k, 'bad')]}")
    print(f"{len(failures)} failed checks in {len({f.case for f in failures})} cases")
    for f in failures[:50]:
        print(f"  case {f.case} ({f.shard}: {f.mutation}): {f.check}: {f.detail}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="number of cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed; case K draws from (seed, K) (default: %(default)s)")
    parser.add_argument("--only", type=int, default=None, help="run case K alone (reproduce a failure)")
    parser.add_argument("--case-seconds", type=float, default=10.0,
                        help="watchdog: seconds a case may take (default: %(default)s)")
    parser.add_argument("--memory-mib", type=int, default=1024,
                        help="address-space limit of this process in MiB (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    limit = args.memory_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        failures = run(args.cases, args.seed, args.only, args.case_seconds, args.verbose)
    except MemoryError:
        traceback.print_exc()
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
