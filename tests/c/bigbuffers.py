"""bigbuffers: an unmodified Python program working on buffers of tens of MiB, for
LD_PRELOAD=lib/libxalloc.so in tests/tests/c_library.rs. It prints digests, the same with and
without the preload, with or without a daemon.

    python3 bigbuffers.py work     bytes, bytearray, hashlib, zlib, big ints, lists
    python3 bigbuffers.py spawn    os.fork, fork + exec, subprocess.run of sort
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zlib

MIB = 1 << 20


def digest(b):
    return hashlib.sha256(b).hexdigest()


def show(name, b):
    print(name, len(b), digest(b), flush=True)


def work():
    block = bytes(range(256)) * 4096  # 1 MiB
    big = block * 64  # 64 MiB from repeats
    show("repeat64", big)

    # A bytearray copy, changed through slices (every 7th byte, whole MiB ranges).
    ba = bytearray(big)
    ba[1::7] = big[: len(range(1, len(ba), 7))]
    for i in range(0, len(ba), 3 * MIB):
        ba[i : i + MIB] = block[::-1]
    show("bytearray", ba)

    # Grown by appends: the buffer moves up across the threshold and on (realloc).
    acc = bytearray()
    for i in range(120):
        acc += block[: (i * 7919) % len(block) + 1]
    show("appended", acc)

    # New 64 MiB objects from old ones.
    table = bytes((i * 37 + 11) % 256 for i in range(256))
    show("translate", big.translate(table))
    show("replace", big.replace(b"\x00\x01\x02", b"xyz!"))
    show("upper", bytes(ba).upper())

    # Many big objects held at once, then joined.
    parts = [bytes([i]) * (MIB + i * 4096) for i in range(40)]
    show("joined", b"".join(parts))
    del parts

    # zlib's own buffers, and its output.
    packed = zlib.compress(big[: 8 * MIB], 1)
    show("zlib", packed)
    show("unzlib", zlib.decompress(packed))

    # A big integer and a long list.
    n = pow(3, 1_000_000)
    show("bigint", n.to_bytes((n.bit_length() + 7) // 8, "little"))
    lst = [(i * 2654435761) % 1000003 for i in range(1_000_000)]
    lst.sort()
    show("list", repr(lst[::997]).encode())

    # sha256 over the 64 MiB in 1 MiB updates and in one call.
    h = hashlib.sha256()
    for i in range(0, len(big), MIB):
        h.update(memoryview(big)[i : i + MIB])
    print("sha256-stream", h.hexdigest(), flush=True)


def spawn():
    data = bytes(range(256)) * 4096 * 16  # 16 MiB
    show("data", data)

    # fork: the child sees the parent's buffer, changes its copy, allocates its own.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            mine = bytearray(data)
            mine[::3] = bytes(len(mine[::3]))
            more = data * 2
            msg = "%s %s %s" % (digest(data), digest(mine), digest(more))
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    _, status = os.waitpid(pid, 0)
    print("fork child", child, "status", status, flush=True)
    show("data-after-fork", data)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lines")
        with open(path, "wb") as f:
            for i in range(300_000):
                f.write(b"%07d %s\n" % ((i * 7919) % 300_007, b"x" * (i % 13)))
        # fork, then exec in the child.
        out = os.path.join(tmp, "sorted")
        pid = os.fork()
        if pid == 0:
            try:
                os.execvp("sort", ["sort", "-S", "16M", "-o", out, path])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        with open(out, "rb") as f:
            show("fork-exec-sort status %d" % status, f.read())
        # subprocess (whatever way it starts the program), input and output through pipes.
        with open(path, "rb") as f:
            lines = f.read()
        res = subprocess.run(
            ["sort", "-r", "-S", "16M"], input=lines, stdout=subprocess.PIPE, check=True
        )
        show("subprocess-sort", res.stdout)
        res = subprocess.run(
            [sys.executable, "-c", "import sys; sys.stdout.write(str(len(bytearray(48 << 20))))"],
            stdout=subprocess.PIPE,
            check=True,
        )
        print("subprocess-python", res.stdout.decode(), flush=True)


if __name__ == "__main__":
    {"work": work, "spawn": spawn}[sys.argv[1]]()
