"""The static start-up profile's pieces on crafted inputs: the ELF reader (real binaries of this
machine, hand-made and hostile ones), the merged root filesystem (whiteouts, opaque
directories, symlinks across layers, loops), and the analysis over real layers built from this
machine's files (PATH lookup, #! lines, loader and library closure, python start-up files)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from harness.images import (
    TarEntry,
    compress,
    directory,
    file,
    layer_tar,
    symlink,
    whiteout,
)
from snapshotter.index.build import build_layer_index
from snapshotter.index.model import EntryType, TocEntry
from snapshotter.indexer.elf import MAX_PROGRAM_HEADERS, ElfError, elf_dependencies
from snapshotter.indexer.layer_files import LayerFiles, ReadBudget
from snapshotter.indexer.rootfs import ResolveError, RootFs
from snapshotter.indexer.static_profile import analyse_image, shell_command

HOST_TRUE = Path("/bin/true")
HOST_LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
HOST_LOADER = Path("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
BUSYBOX = Path("/bin/busybox")


def _reader(data: bytes) -> tuple[Any, int]:
    return (lambda offset, length: data[offset : offset + length]), len(data)


def _elf(
    *,
    interp: bytes = b"/lib/ld.so\0",
    needed: tuple[bytes, ...] = (b"liba.so", b"libb.so"),
    runpath: bytes | None = b"$ORIGIN/../lib",
    phnum: int | None = None,
    strtab_vaddr: int = 0x1000,
    dynamic_size: int | None = None,
) -> bytes:
    """A minimal little-endian ELF64: PT_INTERP, one PT_LOAD covering the whole file that puts
    the string table at strtab_vaddr, PT_DYNAMIC with DT_NEEDED/DT_RUNPATH/DT_STRTAB/DT_STRSZ."""
    strings = b"\0"
    offsets = []
    for name in needed:
        offsets.append(len(strings))
        strings += name + b"\0"
    runpath_at = len(strings)
    if runpath is not None:
        strings += runpath + b"\0"
    dyn_entries = [(1, off) for off in offsets]
    if runpath is not None:
        dyn_entries.append((29, runpath_at))
    dyn_entries += [(5, strtab_vaddr), (10, len(strings)), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in dyn_entries)
    phoff, count = 64, 3
    interp_off = phoff + 56 * count
    strtab_off = interp_off + len(interp)
    dynamic_off = strtab_off + len(strings)
    size = dynamic_off + len(dynamic)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, 56,
                          count if phnum is None else phnum, 0, 0, 0)  # fmt: skip
    # the PT_LOAD maps file offset strtab_off at vaddr strtab_vaddr
    load_vaddr = 0x1000 - strtab_off
    programs = [
        (3, 4, interp_off, interp_off, interp_off, len(interp), len(interp), 1),
        (1, 5, 0, load_vaddr, load_vaddr, size, size, 0x1000),
        (2, 6, dynamic_off, 0, 0, len(dynamic) if dynamic_size is None else dynamic_size, 0, 8),
    ]
    table = b"".join(struct.pack("<IIQQQQQQ", *p) for p in programs)
    return header + table + interp + strings + dynamic


def _elf32_big_endian(needed: bytes = b"libc.so.0") -> bytes:
    """A minimal big-endian ELF32 (e.g. MIPS): PT_INTERP, PT_LOAD at vaddr 0, PT_DYNAMIC."""
    interp = b"/lib/ld-uClibc.so.0\0"
    strings = b"\0" + needed + b"\0"
    phoff, count = 52, 3
    interp_off = phoff + 32 * count
    strtab_off = interp_off + len(interp)
    dynamic_off = strtab_off + len(strings)
    dynamic = b"".join(
        struct.pack(">iI", tag, value)
        for tag, value in [(1, 1), (5, strtab_off), (10, len(strings)), (0, 0)]
    )
    size = dynamic_off + len(dynamic)
    header = b"\x7fELF" + bytes([1, 2, 1]) + bytes(9)
    header += struct.pack(">HHIIIIIHHHHHH", 2, 8, 1, 0, phoff, 0, 0, 52, 32, count, 0, 0, 0)
    programs = [
        (3, interp_off, interp_off, interp_off, len(interp), len(interp), 4, 1),
        (1, 0, 0, 0, size, size, 5, 0x1000),
        (2, dynamic_off, dynamic_off, dynamic_off, len(dynamic), len(dynamic), 6, 4),
    ]
    table = b"".join(struct.pack(">IIIIIIII", *p) for p in programs)
    return header + table + interp + strings + dynamic


def test_elf_reader_reads_32_bit_big_endian_binaries() -> None:
    deps = elf_dependencies(*_reader(_elf32_big_endian()))
    assert deps.interpreter == "/lib/ld-uClibc.so.0" and deps.needed == ("libc.so.0",)


def test_elf_reader_reads_this_machines_binaries() -> None:
    deps = elf_dependencies(*_reader(HOST_TRUE.read_bytes()))
    assert deps.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert deps.needed == ("libc.so.6",)
    static = elf_dependencies(*_reader(BUSYBOX.read_bytes()))
    assert static.interpreter is None and static.needed == ()


def test_elf_reader_reads_a_crafted_binary() -> None:
    deps = elf_dependencies(*_reader(_elf()))
    assert deps.interpreter == "/lib/ld.so"
    assert deps.needed == ("liba.so", "libb.so")
    assert deps.runpath == ("$ORIGIN/../lib",) and deps.rpath == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"#!/bin/sh\n", "outside the file"),
        (b"MZ" + bytes(100), "not an ELF file"),
        (_elf()[:100], "outside the file"),  # truncated inside the program headers
        (_elf()[:-20], "outside the file"),  # truncated inside the dynamic section
        (_elf(phnum=MAX_PROGRAM_HEADERS + 1), "program headers, more than"),
        (_elf(strtab_vaddr=0x90000), "in no loaded segment"),
        (_elf(dynamic_size=1 << 30), "dynamic section of"),
        (_elf(interp=b""), "PT_INTERP of 0 bytes"),
        (_elf(needed=(b"\xff\xfe",)), "not UTF-8"),
    ],
)
def test_elf_reader_refuses_hostile_and_truncated_input(data: bytes, message: str) -> None:
    with pytest.raises(ElfError, match=message) as raised:
        elf_dependencies(*_reader(data), where="usr/bin/app")
    assert "usr/bin/app" in str(raised.value)


def test_elf_reader_never_asks_for_more_than_the_caps() -> None:
    asked: list[int] = []
    data = _elf(dynamic_size=1 << 30)

    def read(offset: int, length: int) -> bytes:
        asked.append(length)
        return data[offset : offset + length]

    with pytest.raises(ElfError):
        elf_dependencies(read, 1 << 40)  # a size that would allow it
    assert max(asked) < 64 << 10


def _toc(*entries: tuple[str, EntryType, str]) -> list[TocEntry]:
    return [TocEntry(name, kind, 0o755, link_target=target) for name, kind, target in entries]


REG, DIR, LNK = EntryType.REG, EntryType.DIR, EntryType.SYMLINK


def test_rootfs_applies_whiteouts_and_opaque_directories() -> None:
    lower = _toc(
        ("etc", DIR, ""),
        ("etc/group", REG, ""),
        ("etc/passwd", REG, ""),
        ("opt", DIR, ""),
        ("opt/old", REG, ""),
        ("data", DIR, ""),
        ("data/x", REG, ""),
    )
    upper = _toc(
        ("etc/.wh.group", REG, ""),
        ("opt/.wh..wh..opq", REG, ""),
        ("opt/new", REG, ""),
        ("data", REG, ""),  # a file replaces the lower directory and its contents
    )
    root = RootFs.from_layers([lower, upper])
    assert root.resolve("/etc/group") is None
    assert root.entry("etc/passwd") is not None and root.entry("etc/passwd").layer == 0  # type: ignore[union-attr]
    assert root.listdir("opt") == ["new"]
    assert root.entry("data").layer == 1 and root.resolve("data/x") is None  # type: ignore[union-attr]


def test_rootfs_resolves_symlinks_across_layers_inside_the_image() -> None:
    lower = _toc(
        ("usr", DIR, ""),
        ("usr/lib", DIR, ""),
        ("usr/lib/ld.so", REG, ""),
        ("lib", LNK, "usr/lib"),
    )
    upper = _toc(
        ("lib64", LNK, "/lib"),  # absolute: the image's root, not the host's
        ("bin", DIR, ""),
        ("bin/rel", LNK, "../lib64/./ld.so"),
        ("bin/up", LNK, "../../../../lib/ld.so"),  # .. stops at the root
    )
    root = RootFs.from_layers([lower, upper])
    assert root.resolve("/lib64/ld.so") == "usr/lib/ld.so"
    assert root.resolve("bin/rel") == "usr/lib/ld.so"
    assert root.resolve("bin/up") == "usr/lib/ld.so"
    assert root.resolve("rel", "bin") == "usr/lib/ld.so"
    assert root.resolve("bin/rel", follow_last=False) == "bin/rel"
    assert root.resolve("/lib64/ld.so/x") is None  # not a directory
    assert root.resolve("/nothing/here") is None


def test_rootfs_reports_symlink_loops() -> None:
    root = RootFs.from_layers([_toc(("a", LNK, "b"), ("b", LNK, "/a"), ("self", LNK, "self/x"))])
    with pytest.raises(ResolveError, match="symlink loop"):
        root.resolve("a")
    with pytest.raises(ResolveError, match="a: more than 40"):
        root.resolve("a")
    with pytest.raises(ResolveError):
        root.resolve("self")


# -- the analysis over real layers --------------------------------------------------------------


def _layer(entries: list[TarEntry], budget: ReadBudget) -> LayerFiles:
    blob = compress(layer_tar(entries), "gzip")
    index = build_layer_index(
        io.BytesIO(blob),
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        span_size=64 << 10,
    )
    return LayerFiles(index, lambda offset, length: blob[offset : offset + length], budget)


def _config(argv: list[str], env: list[str] | None = None) -> dict[str, Any]:
    return {"config": {"Cmd": argv, "Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"]}}


def _analyse(layers: list[LayerFiles], config: dict[str, Any]) -> list[tuple[int, str]]:
    root = RootFs.from_layers([files.index.entries for files in layers])
    return analyse_image(config, root, layers).files


def _base(budget: ReadBudget) -> LayerFiles:
    return _layer(
        [
            directory("usr"),
            directory("usr/lib"),
            directory("usr/lib/x86_64-linux-gnu"),
            file("usr/lib/x86_64-linux-gnu/libc.so.6", HOST_LIBC.read_bytes(), 0o755),
            file("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", HOST_LOADER.read_bytes(), 0o755),
            symlink("lib", "usr/lib"),
            directory("lib64"),
            symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            directory("etc"),
            file("etc/ld.so.cache", b"cache"),
            file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            file("etc/group", b"root:x:0:\n"),
            directory("bin"),
        ],
        budget,
    )


def test_analysis_follows_path_loader_and_libraries_in_start_order() -> None:
    budget = ReadBudget()
    base = _base(budget)
    app = _layer(
        [
            directory("usr/local/bin"),
            file("usr/local/bin/app", HOST_TRUE.read_bytes(), 0o755),
            file("usr/bin/app", b"shadowed by PATH order", 0o755),
            whiteout("etc/group"),
        ],
        budget,
    )
    files = _analyse([base, app], _config(["app", "--flag"]))
    assert files == [
        (1, "usr/local/bin/app"),
        (0, "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        (0, "etc/ld.so.cache"),
        (0, "usr/lib/x86_64-linux-gnu/libc.so.6"),
        (0, "etc/passwd"),  # etc/group: whited out by the upper layer
    ]
    assert budget.spans > 0


def test_analysis_follows_scripts_and_env_to_their_interpreter() -> None:
    budget = ReadBudget()
    base = _base(budget)
    app = _layer(
        [
            file("bin/true", HOST_TRUE.read_bytes(), 0o755),
            file("usr/bin/env", BUSYBOX.read_bytes(), 0o755),
            file("entry.sh", b"#!/usr/bin/env -S true\necho hi\n", 0o755),
        ],
        budget,
    )
    files = [name for _, name in _analyse([base, app], _config(["/entry.sh"]))]
    assert files[:4] == ["entry.sh", "usr/bin/env", "bin/true", HOST_LOADER_NAME]


HOST_LOADER_NAME = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"


def test_analysis_survives_hostile_elf_and_missing_programs() -> None:
    budget = ReadBudget()
    base = _base(budget)
    broken = _layer([file("usr/bin/app", _elf()[:100], 0o755)], budget)
    root_config = _config(["app"])
    root = RootFs.from_layers([base.index.entries, broken.index.entries])
    result = analyse_image(root_config, root, [base, broken])
    names = [name for _, name in result.files]
    assert names[0] == "usr/bin/app" and HOST_LOADER_NAME not in names
    assert any("usr/bin/app" in note and "outside the file" in note for note in result.notes)
    missing = analyse_image(_config(["nope"]), root, [base, broken])
    assert missing.files == [] and missing.notes == ["nope: not found in the image"]


def test_analysis_lists_python_start_up_files() -> None:
    budget = ReadBudget()
    base = _base(budget)
    stdlib = "usr/lib/python3.11"
    python = _layer(
        [
            file("usr/bin/python3.11", HOST_TRUE.read_bytes(), 0o755),
            symlink("usr/bin/python3", "python3.11"),
            directory(stdlib),
            file(f"{stdlib}/os.py", b"# os"),
            file(f"{stdlib}/encodings/__init__.py", b"#"),
            file(f"{stdlib}/encodings/__pycache__/__init__.cpython-311.pyc", b"pyc"),
            file(f"{stdlib}/encodings/aliases.py", b"#"),  # no pyc: the source is read
            file(f"{stdlib}/encodings/__pycache__/utf_8.cpython-311.pyc", b"pyc"),
            directory("usr/lib/python3/dist-packages"),
            file(
                "usr/lib/python3/dist-packages/distutils-precedence.pth",
                b"import os; __import__('_distutils_hack').add_shim();\n",
            ),
            file("usr/lib/python3/dist-packages/_distutils_hack/__init__.py", b"#"),
        ],
        budget,
    )
    files = [name for _, name in _analyse([base, python], _config(["python3", "-c", "pass"]))]
    assert files == [
        "usr/bin/python3.11",
        HOST_LOADER_NAME,
        "etc/ld.so.cache",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        f"{stdlib}/encodings/__pycache__/__init__.cpython-311.pyc",
        f"{stdlib}/encodings/aliases.py",
        f"{stdlib}/encodings/__pycache__/utf_8.cpython-311.pyc",
        "etc/passwd",
        "etc/group",
        "usr/lib/python3/dist-packages/distutils-precedence.pth",
        "usr/lib/python3/dist-packages/_distutils_hack/__init__.py",
    ]
    assert f"{stdlib}/os.py" not in files  # frozen into python 3.11


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/bin/sh", "-c", "exec python3 app.py"], ["python3", "app.py"]),
        (["sh", "-c", "A=1 B='x y' ./run --flag"], ["./run", "--flag"]),
        (["/bin/bash", "-c", "python3 a.py && python3 b.py"], ["python3", "a.py"]),
        (
            ["/bin/sh", "-c", "exec python3 -c 'print(1); x=(2)'"],
            ["python3", "-c", "print(1); x=(2)"],
        ),
        (["/bin/sh", "-c", "$APP --run"], None),
        (["/bin/sh", "-c", "(cd /x; ./run)"], None),
        (["/bin/sh", "-c", "python3 'unclosed"], None),
        (["/bin/sh", "script.sh"], None),
        (["/usr/bin/python3", "-c", "pass"], None),
    ],
)
def test_shell_form_commands_are_followed_to_their_program(
    argv: list[str], expected: list[str] | None
) -> None:
    assert shell_command(argv) == expected


def test_analysis_follows_a_shell_form_cmd_to_python() -> None:
    budget = ReadBudget()
    base = _base(budget)
    image = _layer(
        [
            file("bin/sh", BUSYBOX.read_bytes(), 0o755),
            file("usr/bin/python3.11", HOST_TRUE.read_bytes(), 0o755),
            symlink("usr/bin/python3", "python3.11"),
            directory("usr/lib/python3.11"),
            file("usr/lib/python3.11/encodings/__init__.py", b"#"),
        ],
        budget,
    )
    config = _config(["/bin/sh", "-c", "exec python3 -c 'print(1)'"])
    files = [name for _, name in _analyse([base, image], config)]
    assert files == [
        "bin/sh",  # static: no loader; then the /etc files every start reads
        "etc/passwd",
        "etc/group",
        "usr/bin/python3.11",
        HOST_LOADER_NAME,
        "etc/ld.so.cache",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/python3.11/encodings/__init__.py",
    ]


def test_analysis_stops_at_its_read_budget() -> None:
    budget = ReadBudget(max_spans=1)
    base = _base(budget)
    app = _layer([file("usr/bin/app", HOST_TRUE.read_bytes(), 0o755)], budget)
    root = RootFs.from_layers([base.index.entries, app.index.entries])
    result = analyse_image(_config(["app"]), root, [base, app])
    assert result.files[0] == (1, "usr/bin/app")
    assert any(note.startswith("stopped early: read 1 spans") for note in result.notes)


def test_config_without_a_command_gives_nothing() -> None:
    root = RootFs.from_layers([])
    result = analyse_image(json.loads('{"config": {}}'), root, [])
    assert result.files == [] and "no Entrypoint or Cmd" in result.notes[0]
