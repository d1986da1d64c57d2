"""Recording a startup profile: a real command (busybox) run over real lazy FUSE mounts of two
gzip layers, in an overlay, in a private namespace; and the profile blob format."""

from __future__ import annotations

import os
import platform
import struct
import tarfile
from pathlib import Path

import pytest

from snapshotter.fs.blob_source import BlobSpec
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.profile.model import ProfileEntry
from snapshotter.profile.record import (
    LayerSource,
    ProfileRecordError,
    RunSettings,
    image_run_settings,
    record_profile,
)
from tests.fs.fs_helpers import Member, built_index, compress, make_tar

pytestmark = pytest.mark.stack
BUSYBOX = Path("/bin/busybox")
ENV = {"PATH": "/bin"}


def _layer(tmp_path: Path, name: str, members: list[Member]) -> LayerSource:
    blob = compress(make_tar(members), "gzip")
    index = built_index(blob, "gzip")
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(blob)
    spec = LayerSpec(
        blob=BlobSpec("file", str(path), index.layer_digest), index_bytes=encode_index(index)
    )
    return LayerSource(index.layer_digest, spec)


@pytest.fixture
def image(tmp_path: Path) -> list[LayerSource]:
    """Bottom: busybox + /data/a + /data/gone; top: /data/b, /data/unread, whiteout of gone."""
    if not BUSYBOX.exists() or os.geteuid() != 0:
        pytest.skip("needs root and busybox-static")
    busybox = BUSYBOX.read_bytes()
    base = [
        Member("bin", tarfile.DIRTYPE, mode=0o755),
        Member("bin/busybox", data=busybox, mode=0o755),
        Member("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
        Member("bin/cat", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
        Member("bin/sleep", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
        Member("data/a", data=b"a" * 5000),
        Member("data/gone", data=b"removed above"),
        Member("work", tarfile.DIRTYPE, mode=0o755),
    ]
    top = [
        Member("data/b", data=b"b" * 7000),
        Member("data/unread", data=b"never read"),
        Member("data/.wh.gone"),
    ]
    return [_layer(tmp_path, "base", base), _layer(tmp_path, "top", top)]


def _no_mounts_under(path: Path) -> bool:
    return str(path) not in Path("/proc/self/mountinfo").read_text()


def test_first_reads_are_recorded_in_order_across_layers(
    image: list[LayerSource], tmp_path: Path
) -> None:
    run = RunSettings(("/bin/sh", "-c", "cat data/b data/a data/b > /dev/null"), ENV, "/")
    recording = record_profile(image, run, work_root=str(tmp_path))
    base, top = image[0].digest, image[1].digest
    assert recording.exit_status == 0
    entries = list(recording.profile.entries)
    assert entries[0] == ProfileEntry(base, "bin/busybox")  # exec'd first
    assert entries[1:] == [ProfileEntry(top, "data/b"), ProfileEntry(base, "data/a")]
    assert recording.profile.names_for(top) == ("data/b",)
    assert _no_mounts_under(tmp_path)
    assert not list(tmp_path.glob("lazysnap-profile-*"))


def test_the_image_working_directory_and_environment_apply(
    image: list[LayerSource], tmp_path: Path
) -> None:
    # relative path: only found from the image's WorkingDir; $WHICH only from its Env
    config = {"config": {"Env": ["PATH=/bin", "WHICH=../data/a"], "WorkingDir": "/work"}}
    run = image_run_settings(config, ["/bin/sh", "-c", 'cat "$WHICH" > /dev/null'], 30)
    recording = record_profile(image, run, work_root=str(tmp_path))
    assert recording.profile.names_for(image[0].digest) == ("bin/busybox", "data/a")


def test_a_command_that_outlives_the_timeout_keeps_what_it_read(
    image: list[LayerSource], tmp_path: Path
) -> None:
    run = RunSettings(("/bin/sh", "-c", "cat data/a > /dev/null; exec sleep 600"), ENV, "/", 2.0)
    recording = record_profile(image, run, work_root=str(tmp_path))
    assert recording.exit_status is None
    assert ProfileEntry(image[0].digest, "data/a") in recording.profile.entries
    assert _no_mounts_under(tmp_path)
    assert "sleep 600" not in _all_command_lines()


def test_a_failing_command_is_an_error_naming_it_and_leaves_nothing(
    image: list[LayerSource], tmp_path: Path
) -> None:
    run = RunSettings(("/bin/sh", "-c", "cat data/gone"), ENV, "/")  # whited out above
    with pytest.raises(ProfileRecordError, match=r"'/bin/sh -c cat data/gone'.*status 1"):
        record_profile(image, run, work_root=str(tmp_path))
    assert _no_mounts_under(tmp_path)
    assert not list(tmp_path.glob("lazysnap-profile-*"))


def test_a_layer_that_cannot_be_mounted_is_named(image: list[LayerSource], tmp_path: Path) -> None:
    broken = LayerSource(
        image[1].digest,
        LayerSpec(blob=image[1].spec.blob, index_bytes=b"not an index"),
    )
    with pytest.raises(ProfileRecordError, match=image[1].digest):
        record_profile(
            [image[0], broken], RunSettings(("/bin/true",), ENV), work_root=str(tmp_path)
        )
    assert _no_mounts_under(tmp_path)


def test_a_failing_command_error_keeps_the_mount_process_logs(
    image: list[LayerSource], tmp_path: Path
) -> None:
    # The top layer's bytes no longer match its index: reading data/b fails verification in the
    # mount process (which logs why) and cat only sees EIO.
    blob = Path(image[1].spec.blob.location)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    run = RunSettings(("/bin/sh", "-c", "cat data/b > /dev/null"), ENV, "/")
    with pytest.raises(ProfileRecordError) as info:
        record_profile(image, run, work_root=str(tmp_path))
    message = str(info.value)
    assert "status 1" in message
    assert f"mount process log of layer {image[0].digest}" not in message  # all went well there
    top_log = message.split(f"mount process log of layer {image[1].digest}", 1)[1]
    assert "EIO reading /data/b" in top_log and "SpanVerificationError" in top_log
    assert _no_mounts_under(tmp_path)
    assert not list(tmp_path.glob("lazysnap-profile-*"))


def _segfaulting_program() -> bytes:
    """A static x86-64 ELF whose only instructions write to address 0."""
    code = bytes.fromhex("31c08900")  # xor eax, eax; mov [rax], eax
    base, header_size = 0x400000, 64 + 56
    size = header_size + len(code)
    elf_header = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack(
            "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + header_size, 64, 0, 0, 64, 56, 1, 0, 0, 0
        )
    )
    program_header = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return elf_header + program_header + code


def test_a_crashing_command_is_named_with_its_signal_and_kernel_line(
    image: list[LayerSource], tmp_path: Path
) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the crashing program is x86-64 machine code")
    crashme = Member("bin/crashme", data=_segfaulting_program(), mode=0o755)
    crash = _layer(tmp_path, "crash", [crashme])
    run = RunSettings(("/bin/sh", "-c", "cat data/a > /dev/null; /bin/crashme"), ENV, "/")
    with pytest.raises(ProfileRecordError) as info:
        record_profile([*image, crash], run, work_root=str(tmp_path))
    message = str(info.value)
    assert "was killed by SIGSEGV" in message  # busybox sh execs its last command
    if _kernel_logs_segfaults():
        assert "kernel log:" in message and "crashme[" in message and "segfault" in message
    assert _no_mounts_under(tmp_path)


def _kernel_logs_segfaults() -> bool:
    """The kernel prints unhandled segfaults and we may read its log (root, /dev/kmsg)."""
    trace = Path("/proc/sys/debug/exception-trace")
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
        return trace.read_text().strip() == "1"
    except OSError:
        return False


def _all_command_lines() -> str:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(lines)
