"""A tiny bootable guest for restore tests: Debian's kernel, a busybox initramfs, an ext4 disk.

The guest is booted with ``qemu-system-x86_64`` in software emulation (TCG), reads the file
``marker`` from the ext4 filesystem on its virtio disk (``/dev/vda``, no partition table),
prints ``MARKER=<contents>`` on the serial console and powers off.

The kernel and busybox come from Debian packages fetched with ``apt-get download`` (never
installed on the host) and are built once into a cache directory. The kernel is the
``cloud`` flavour: it is small (27 MB) and has ext4 built in; its virtio drivers are
modules, put into the initramfs with their dependencies (read from each module's
``.modinfo``). The initramfs is written here (``newc`` cpio), so neither ``cpio`` nor root
is needed to build it.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# Bump when what ensure_kernel() builds changes, so stale caches are not reused.
GUEST_VERSION = 2
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Loaded in this order, each after its dependencies, unless built into the kernel.
# crc32c_generic: ext4's and jbd2's soft dependency (metadata_csum).
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
MARKER_FILE = "marker"
MARKER_PREFIX = "MARKER="
ERROR_PREFIX = "BOOTGUEST-ERROR:"
# Fixed identity and times: the same marker gives the same disk, byte for byte, and
# disks that differ only in the marker differ only in the marker's data block.
_DISK_UUID = "6b0e2a9c-5d3f-4e1a-9b7c-2f4d8e6a1c30"
_DISK_TIME = 1_700_000_000

_MARKER_RE = re.compile(r"^" + re.escape(MARKER_PREFIX) + r"(.*?)\r?$", re.MULTILINE)


class BootGuestError(RuntimeError):
    """Building or booting the guest failed."""


def _run(args: Sequence[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise BootGuestError(f"{args[0]} is missing: {exc}") from exc
    if proc.returncode != 0:
        raise BootGuestError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


# --- kernel and initramfs -----------------------------------------------------------------


def _kernel_package() -> str:
    """The kernel package the metapackage currently points at (linux-image-6.1.0-NN-cloud-amd64)."""
    out = _run(["apt-cache", "depends", "--important", KERNEL_METAPACKAGE])
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key.lstrip("|") == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    raise BootGuestError(f"no kernel package found for {KERNEL_METAPACKAGE}:\n{out}")


def _fetch(package: str, workdir: Path) -> Path:
    """``apt-get download`` a package and unpack it (``dpkg-deb -x``); returns the unpacked root."""
    try:
        _run(["apt-get", "download", "-q", package], cwd=workdir)
    except BootGuestError as exc:
        raise BootGuestError(f"{exc}\n(needs Debian's package lists and mirrors: apt-get update?)") from exc
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise BootGuestError(f"apt-get download {package} left no .deb in {workdir}")
    root = workdir / package
    _run(["dpkg-deb", "-x", debs[-1], root])
    debs[-1].unlink()
    return root


def _modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (an ELF64 little-endian object)."""
    if elf[:6] != b"\x7fELF\x02\x01":
        raise BootGuestError("not an ELF64 little-endian kernel module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, names_off, _ = section(shstrndx)
    for i in range(shnum):
        name_at, offset, size = section(i)
        end = elf.index(b"\0", names_off + name_at)
        if elf[names_off + name_at : end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise BootGuestError("kernel module without a .modinfo section")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise BootGuestError(f"cannot decompress {path} (only .ko and .ko.xz are supported)")


def _load_order(moddir: Path, roots: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules to insmod, dependencies first; built-in ones are left out."""
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {Path(line).name.split(".ko")[0].replace("-", "_") for line in builtin_file.read_text().split()}
    files = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        files[path.name.split(".ko")[0].replace("-", "_")] = path
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise BootGuestError(f"kernel module {name} is neither built in nor in {moddir}")
        data = _module_bytes(files[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep)
        order.append((name, data))

    for root in roots:
        visit(root)
    return order


def _init_script(modules: Sequence[str]) -> str:
    insmods = "\n".join(f'insmod /modules/{m}.ko || fail "insmod {m}"' for m in modules)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "bootguest: /init started"
fail() {{
    echo "{ERROR_PREFIX} $*"
    dmesg | tail -n 30
    poweroff -f
}}
{insmods}
echo "bootguest: modules loaded"
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ "$n" -gt 100 ] && fail "no /dev/vda"
    usleep 100000
done
mount -t ext4 -o ro /dev/vda /mnt || fail "mount /dev/vda"
echo "bootguest: /dev/vda mounted"
[ -f /mnt/{MARKER_FILE} ] || fail "no /mnt/{MARKER_FILE}"
echo "{MARKER_PREFIX}$(cat /mnt/{MARKER_FILE})"
umount /mnt
poweroff -f
"""


def _cpio(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (name, mode, data) entries; a device's data is b"MAJOR:MINOR"."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        rmajor = rminor = 0
        if mode & 0o170000 in (0o020000, 0o060000):
            rmajor, rminor = map(int, data.split(b":"))
            data = b""
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmajor, rminor, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        pad()
        out += data
        pad()
    return bytes(out)


def ensure_kernel(cache_dir: Path) -> tuple[Path, Path]:
    """The guest's kernel and initramfs, built once into ``cache_dir`` and reused afterwards.

    Needs ``apt-get`` with reachable Debian mirrors the first time (nothing is installed).
    """
    return build_guest(cache_dir / f"bootguest-v{GUEST_VERSION}", ROOT_MODULES, _init_script)


Entry = tuple[str, int, bytes]  # (path in the initramfs, mode, data)


def build_guest(
    final: Path,
    modules: Sequence[str],
    init_script: Callable[[Sequence[str]], str],
    extra: Callable[[], list[Entry]] = list,
) -> tuple[Path, Path]:
    """A kernel and busybox initramfs in ``final`` (built once): ``modules`` loaded by ``init_script``,
    plus the ``extra`` files (their directories made for them)."""
    kernel, initrd = final / "vmlinuz", final / "initrd.cpio"
    if kernel.is_file() and initrd.is_file():
        return kernel, initrd
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}-build-", dir=final.parent))
    try:
        os.chmod(work, 0o755)  # apt-get download fetches as the _apt user where it can
        kroot = _fetch(_kernel_package(), work)
        broot = _fetch(BUSYBOX_PACKAGE, work)
        (vmlinuz,) = (kroot / "boot").glob("vmlinuz-*")
        (moddir,) = (kroot / "lib" / "modules").iterdir()
        loaded = _load_order(moddir, modules)
        added = extra()
        entries: list[Entry] = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "mnt")]
        entries += _dirs_of([name for name, _, _ in added if not name.startswith("bin/")])
        entries += [
            ("dev/console", 0o020600, b"5:1"),
            ("bin/busybox", 0o100755, (broot / "bin" / "busybox").read_bytes()),
            ("init", 0o100755, init_script([name for name, _ in loaded]).encode()),
            ("modules", 0o040755, b""),
            *added,
        ]
        entries += [(f"modules/{name}.ko", 0o100644, data) for name, data in loaded]
        out = work / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / kernel.name)
        (out / initrd.name).write_bytes(_cpio(entries))
        (out / "kernel-version").write_text(f"{moddir.name}\n")
        try:
            out.rename(final)
        except OSError:
            if not (kernel.is_file() and initrd.is_file()):  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd


def _dirs_of(names: Sequence[str]) -> list[Entry]:
    """Directory entries for every parent of ``names``, parents first."""
    dirs: set[str] = set()
    for name in names:
        parent = Path(name).parent
        while str(parent) not in ("", "."):
            dirs.add(str(parent))
            parent = parent.parent
    return [(d, 0o040755, b"") for d in sorted(dirs, key=lambda d: d.count("/"))]


# --- disk ------------------------------------------------------------------------------------


def make_disk(path: Path, marker: str, size_mib: int = 32) -> None:
    """A raw disk: an ext4 filesystem (no partition table) holding the file ``marker``.

    Deterministic: equal markers give equal disks, and disks with markers of equal length
    differ only in the marker's data block.
    """
    with tempfile.TemporaryDirectory(prefix="bootguest-disk-") as tmp:
        root = Path(tmp)
        (root / MARKER_FILE).write_text(marker)
        for p in (root / MARKER_FILE, root):
            os.utime(p, (_DISK_TIME, _DISK_TIME))
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
        _run(
            [
                "mkfs.ext4",
                "-F",
                "-q",
                "-U",
                _DISK_UUID,
                "-E",
                f"hash_seed={_DISK_UUID},root_owner=0:0",
                "-d",
                root,
                path,
            ],
            env={"E2FSPROGS_FAKE_TIME": str(_DISK_TIME)},
        )


# --- boot ------------------------------------------------------------------------------------


def _tail(output: str, lines: int = 40) -> str:
    return "\n".join(output.splitlines()[-lines:])


def boot(kernel: Path, initrd: Path, disk_qcow2: Path, timeout: float = 120) -> str:
    """Boot the guest from ``disk_qcow2`` (an overlay: the guest may write to it); its serial output.

    Raises BootGuestError with the output's tail on timeout or without a marker line.
    """
    cmd = [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-smp",
        "1",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-drive",
        f"file={disk_qcow2},if=virtio,format=qcow2,readonly=off",
    ]
    try:
        # On timeout, run() kills qemu (its own child, by pid) and keeps what it printed.
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        raise BootGuestError(f"guest did not power off within {timeout} s; output tail:\n{_tail(partial)}") from None
    except FileNotFoundError as exc:
        raise BootGuestError(f"qemu-system-x86_64 is missing (Debian package qemu-system-x86): {exc}") from exc
    output = proc.stdout.decode(errors="replace")
    if not _MARKER_RE.search(output):
        errors = [line.strip() for line in output.splitlines() if line.startswith(ERROR_PREFIX)]
        raise BootGuestError(
            f"no {MARKER_PREFIX} line (qemu exited {proc.returncode}) {' '.join(errors)}; output tail:\n{_tail(output)}"
        )
    return output


def marker_of(output: str) -> str:
    """The marker a boot printed (the ``MARKER=`` line of the serial output)."""
    found = _MARKER_RE.findall(output)
    if len(found) != 1:
        raise ValueError(f"expected one {MARKER_PREFIX} line, found {len(found)}")
    return str(found[0])
