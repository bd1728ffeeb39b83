"""A helper process for ``verify --deep``: hashes the 64 KiB blocks of file ranges.

Run as a script, ``python -I -S hashworker.py DIR`` where ``DIR`` holds the
xxhash package (the package imports this module only for :data:`RANGE`
and its path): it starts in about 10 ms because it skips ``site`` and
imports only the standard library and xxhash.  The deep check
hands it part of a point, to hash on another core while it hashes the rest
itself: xxhash holds the GIL for blocks of 64 KiB, so threads would not help.

Input on stdin, as it comes: records ``<iQQ`` (an inherited file
descriptor, an offset, a length), each range inside its file.  Output on
stdout, after the end of the input: the XXH3-128 digest of each 64 KiB
piece of each range, in order (the last piece of a range may be shorter).
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

RANGE = struct.Struct("<iQQ")
BLOCK_SIZE = 65536
DROP_EVERY = 64 << 20  # bytes hashed between drops of the mapped pages (keeps the RSS flat)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C ends the parent's verify; no traceback here
    digest = xxhash.xxh3_128_digest
    maps: dict[int, mmap.mmap] = {}
    views: dict[int, memoryview] = {}
    out = bytearray()
    rest = b""
    since_drop = 0
    while chunk := os.read(0, 1 << 16):
        data = rest + chunk
        end = len(data) - len(data) % RANGE.size
        rest = data[end:]
        for fd, offset, length in RANGE.iter_unpack(data[:end]):
            view = views.get(fd)
            if view is None:
                maps[fd] = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
                view = views[fd] = memoryview(maps[fd])
            stop = offset + length
            for pos in range(offset, stop, BLOCK_SIZE):
                out += digest(view[pos : min(pos + BLOCK_SIZE, stop)])
            since_drop += length
            if since_drop >= DROP_EVERY:
                for each in maps.values():
                    each.madvise(mmap.MADV_DONTNEED)  # the page cache stays; only our mappings of it go
                since_drop = 0
    sys.stdout.buffer.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
