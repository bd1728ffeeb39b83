"""A helper process for ``verify --deep``: hashes the 64 KiB blocks of ranges of files.

Run as a script, ``python -I -S transfer/hashworker.py DIR FD...`` where ``DIR``
holds the xxhash package and the ``FD`` are inherited descriptors of the
layer files, base first (the package imports this module only for
:data:`RUN` and its path).  It skips ``site`` and imports only the
standard library and xxhash, so that starting it costs less than the
hashing it takes over.  The deep check
hands it part of a point, to hash on another core while it hashes the rest
itself: xxhash holds the GIL for blocks of 64 KiB, so threads would not help.

Input on stdin, as it comes: records :data:`RUN` (layer index, offset,
first block, length), each range inside its file.  Output on stdout, after
the end of the input: the XXH3-128 digest of each 64 KiB piece of each
range, in order (the last piece of a range may be shorter).
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import sys

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])  # where xxhash is: started with -S, this process has no site-packages

import xxhash  # after the path is set

RUN = struct.Struct("<IQQQ")  # a deepcheck.HostRun: layer, offset, block, length
BLOCK_SIZE = 65536
DROP_EVERY = 64 << 20  # bytes hashed between drops of the mapped pages (keeps the RSS flat)


def main(fds: list[int]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C ends the parent's verify; no traceback here
    maps = [mmap.mmap(fd, size, prot=mmap.PROT_READ) if (size := os.fstat(fd).st_size) else None for fd in fds]
    views = [memoryview(m) if m is not None else memoryview(b"") for m in maps]
    out = bytearray()
    rest = b""
    since_drop = 0
    while chunk := os.read(0, 1 << 16):
        data = rest + chunk
        end = len(data) - len(data) % RUN.size
        rest = data[end:]
        for layer, offset, _, length in RUN.iter_unpack(data[:end]):
            view = views[layer][offset : offset + length]
            out += b"".join(map(xxhash.xxh3_128_digest, map(view.__getitem__, pieces(length))))
            since_drop += length
            if since_drop >= DROP_EVERY:
                for m in maps:
                    if m is not None:
                        m.madvise(mmap.MADV_DONTNEED)  # the page cache stays; only our mappings of it go
                since_drop = 0
    sys.stdout.buffer.write(out)
    return 0


def pieces(length: int) -> map[slice]:
    """The slices of the 64 KiB pieces of ``length`` bytes."""
    return map(slice, range(0, length, BLOCK_SIZE), range(BLOCK_SIZE, length + BLOCK_SIZE, BLOCK_SIZE))


if __name__ == "__main__":
    sys.exit(main([int(fd) for fd in sys.argv[2:]]))
