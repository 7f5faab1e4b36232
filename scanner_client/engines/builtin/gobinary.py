"""Go binaries: the module versions the Go toolchain records in every binary it builds.

Since Go 1.13 a binary carries its *build info* in a section named ``.go.buildinfo`` (ELF):
32 bytes of header starting with the magic ``\\xff Go buildinf:``, the pointer size, a flags
byte, then the Go version and the module information:

- Go 1.18 and later (flag 2): both strings follow the header inline, each a uvarint length
  and its bytes;
- before 1.18: two pointers to Go string headers (data pointer, length) in the binary's
  memory, which the ELF program headers map back to file offsets.

The module information is text between two 16-byte sentinels: ``path`` (the main package),
``mod`` (the main module), ``dep`` (each dependency) and ``=>`` (a replacement of the line
before it), tab-separated: path, version, checksum. What ``go version -m`` prints.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

ELF_MAGIC: Final = b"\x7fELF"
BUILDINFO_MAGIC: Final = b"\xff Go buildinf:"
HEADER_SIZE: Final = 32
# Version and module strings longer than this are not build info.
MAX_STRING: Final = 4 << 20
SECTION_NAME: Final = b".go.buildinfo"


class NotGo(ValueError):
    """The file is not a Go binary with build info (or its build info is damaged)."""


@dataclass(frozen=True)
class Module:
    path: str
    version: str


@dataclass(frozen=True)
class BuildInfo:
    go_version: str  # "go1.22.3"
    main_path: str  # the main package's import path
    main: Module | None
    deps: tuple[Module, ...]


def is_elf(head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


@dataclass(frozen=True)
class _Elf:
    data: bytes
    little: bool
    is64: bool

    @property
    def order(self) -> str:
        return "<" if self.little else ">"

    def sections(self) -> list[tuple[bytes, int, int, int]]:
        """(name, address, file offset, size) of each section."""
        data, order = self.data, self.order
        if self.is64:
            (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
            layout = order + "IIQQQQ"
        else:
            (shoff,) = struct.unpack_from(order + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
            layout = order + "IIIIII"
        if shnum == 0 or shoff == 0 or shoff + shnum * shentsize > len(data):
            return []
        raw = [
            struct.unpack_from(layout, data, shoff + index * shentsize)[:6]
            for index in range(shnum)
        ]
        if shstrndx >= len(raw):
            return []
        names_offset = raw[shstrndx][4]
        found = []
        for name_index, _kind, _flags, address, offset, size in raw:
            start = names_offset + name_index
            end = data.find(b"\x00", start)
            found.append((data[start:end] if end >= 0 else b"", address, offset, size))
        return found

    def segments(self) -> list[tuple[int, int, int]]:
        """(virtual address, file offset, file size) of each loadable segment."""
        data, order = self.data, self.order
        if self.is64:
            (phoff,) = struct.unpack_from(order + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
        else:
            (phoff,) = struct.unpack_from(order + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
        found = []
        for index in range(phnum):
            at = phoff + index * phentsize
            if at + phentsize > len(data):
                break
            if self.is64:
                kind, _flags, offset, address, _paddr, filesz = struct.unpack_from(
                    order + "IIQQQQ", data, at
                )
            else:
                kind, offset, address, _paddr, filesz = struct.unpack_from(
                    order + "IIIII", data, at
                )
            if kind == 1:  # PT_LOAD
                found.append((address, offset, filesz))
        return found

    def read_at(self, address: int, size: int) -> bytes:
        """``size`` bytes of memory at ``address``, from the segment that maps it."""
        for start, offset, filesz in self.segments():
            if start <= address and address + size <= start + filesz:
                position = offset + address - start
                return self.data[position : position + size]
        raise NotGo(f"address {address:#x} is not in the file")


def read_build_info(data: bytes) -> BuildInfo:
    """The build info of an ELF Go binary; NotGo when it has none."""
    if not is_elf(data) or len(data) < 0x40:
        raise NotGo("not an ELF file")
    elf = _Elf(data, little=data[5] == 1, is64=data[4] == 2)
    try:
        start = _buildinfo_offset(elf)
        header = data[start : start + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise NotGo("the build info header is cut short")
        pointer_size, flags = header[14], header[15]
        if flags & 2:
            version, rest = _uvarint_string(data, start + HEADER_SIZE)
            modinfo, _ = _uvarint_string(data, rest)
        else:
            if pointer_size not in (4, 8):
                raise NotGo(f"pointer size {pointer_size}")
            big = bool(flags & 1)
            version = _pointed_string(elf, header, 16, pointer_size, big)
            modinfo = _pointed_string(elf, header, 16 + pointer_size, pointer_size, big)
    except struct.error:
        raise NotGo("the ELF headers are damaged") from None
    return _parse_modinfo(version.decode("utf-8", "replace"), modinfo)


def _buildinfo_offset(elf: _Elf) -> int:
    for name, _address, offset, _size in elf.sections():
        if name == SECTION_NAME:
            if elf.data[offset : offset + len(BUILDINFO_MAGIC)] != BUILDINFO_MAGIC:
                raise NotGo("the .go.buildinfo section has no build info magic")
            return offset
    # Stripped of section headers: the magic sits 16-byte aligned in a data segment.
    position = elf.data.find(BUILDINFO_MAGIC)
    while position >= 0:
        if position % 16 == 0:
            return position
        position = elf.data.find(BUILDINFO_MAGIC, position + 1)
    raise NotGo("no Go build info")


def _uvarint_string(data: bytes, position: int) -> tuple[bytes, int]:
    length = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise NotGo("a build info length runs past the file")
        byte = data[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if length > MAX_STRING or position + length > len(data):
        raise NotGo("a build info string runs past the file")
    return data[position : position + length], position + length


def _pointed_string(elf: _Elf, header: bytes, at: int, size: int, big: bool) -> bytes:
    order = ">" if big else "<"
    code = "Q" if size == 8 else "I"
    (address,) = struct.unpack_from(order + code, header, at)
    pointer, length = struct.unpack(order + code * 2, elf.read_at(address, 2 * size))
    if length > MAX_STRING:
        raise NotGo("a build info string is implausibly long")
    return elf.read_at(pointer, length) if length else b""


def _parse_modinfo(go_version: str, raw: bytes) -> BuildInfo:
    # Between 16-byte sentinels, the last of which follows a newline.
    if len(raw) >= 33 and raw[-17] == ord("\n"):
        raw = raw[16:-16]
    main_path = ""
    main: Module | None = None
    deps: list[Module] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        fields = line.split("\t")
        kind = fields[0]
        if kind == "path" and len(fields) >= 2:
            main_path = fields[1]
        elif kind == "mod" and len(fields) >= 3:
            main = Module(fields[1], fields[2])
        elif kind == "dep" and len(fields) >= 3:
            deps.append(Module(fields[1], fields[2]))
        elif kind == "=>" and len(fields) >= 3:
            # The module of the line before it is replaced: what is built in is the replacement.
            if deps:
                deps[-1] = Module(fields[1], fields[2])
            elif main is not None:
                main = Module(fields[1], fields[2])
    if not go_version.startswith("go") and not main_path:
        raise NotGo("no Go version in the build info")
    return BuildInfo(go_version, main_path, main, tuple(deps))
