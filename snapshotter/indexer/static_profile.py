"""A start-up profile without running anything: what every start of the image's entrypoint
reads, from the image config and the layers' TOCs, reading only a few KiB of a few files.

In the order a start reads them:
1. the program: Entrypoint + Cmd's argv[0] (through the image's PATH when it has no "/"), and
   through `#!` lines the interpreters of scripts (`/usr/bin/env NAME` looked up in PATH);
   for a shell-form command (`sh -c 'exec python3 app.py'`), after the shell's own files (2-4)
   the same for the first program of its command line;
2. its ELF PT_INTERP (the dynamic loader), /etc/ld.so.preload and /etc/ld.so.cache (a static
   executable: none of these, nor libraries);
3. the DT_NEEDED closure, breadth first as the loader maps it, searched like ld.so does:
   DT_RPATH (no DT_RUNPATH), LD_LIBRARY_PATH from the image's Env, DT_RUNPATH, the directories
   /etc/ld.so.conf (and its includes) lists, then the default directories;
4. the /etc files libc reads when a program starts (time zone, NSS: nsswitch.conf, passwd,
   group). hosts, resolv.conf and hostname are not listed: the runtime mounts its own;
5. a known interpreter's own start-up files: for python3.X, the locale files setlocale reads,
   the encodings it imports, the `.pth` files of its site directories (and the modules a
   `.pth` imports), sitecustomize. Python 3.11+ has os, site, codecs, io, abc, stat,
   posixpath, genericpath, _collections_abc and _sitebuiltins frozen into the binary (strace
   of `python3.11 -c pass` opens none of them), so they are listed for older versions only;
   a module's `__pycache__/*.cpython-3X.pyc` is listed when the image has it, else its `.py`.

Each file is named once, by the layer that holds it after whiteouts and with symlinks
resolved. Missing files are skipped. An ELF file that cannot be parsed (hostile, truncated, not
ELF) ends the analysis of that file only; the read budget (layer_files.ReadBudget) and
MAX_PROGRAMS bound the whole analysis.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapshotter.index.errors import IndexFormatError
from snapshotter.index.model import EntryType
from snapshotter.indexer.elf import ElfDependencies, ElfError, elf_dependencies, is_elf
from snapshotter.indexer.layer_files import BudgetExhausted, LayerFiles
from snapshotter.indexer.rootfs import ResolveError, RootFs

log = logging.getLogger(__name__)

# The profile's `command` of a static profile starts so; a recorded one is the command run.
STATIC_COMMAND_PREFIX = "static:"
# Its creation time in the artifact: older than any recorded profile, which discovery then
# prefers (it takes the newest), and fixed, so the artifact stays deterministic.
STATIC_PROFILE_CREATED = "1970-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_PROGRAMS = 64  # ELF files and scripts whose headers are read
MAX_SHEBANG_HOPS = 4  # script -> interpreter -> ... (the kernel allows 4 too)
MAX_PTH_FILES = 32
MAX_TEXT_BYTES = 16 << 10  # of a .pth or ld.so.conf file
DEFAULT_LIBRARY_DIRS = ("lib64", "usr/lib64", "lib", "usr/lib")
MULTIARCH_DIRS = (  # Debian/Ubuntu: what ld.so.conf.d lists for the common machines
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/local/lib",
)
LOADER_FILES = ("etc/ld.so.preload", "etc/ld.so.cache")
LIBC_FILES = ("etc/localtime", "etc/nsswitch.conf", "etc/passwd", "etc/group")
PYTHON_LOCALE_FILES = (
    "usr/share/locale/locale.alias",
    "usr/lib/locale/C.utf8/LC_CTYPE",
    "usr/lib/locale/C.UTF-8/LC_CTYPE",
    "usr/lib/locale/locale-archive",
)
PYTHON_FROZEN_BEFORE_311 = (
    "codecs",
    "io",
    "abc",
    "site",
    "os",
    "stat",
    "_collections_abc",
    "posixpath",
    "genericpath",
    "_sitebuiltins",
)
PYTHON_ENCODINGS = ("encodings/__init__", "encodings/aliases", "encodings/utf_8")
_PYTHON_NAME = re.compile(r"python(\d)\.(\d+)")
SHELLS = frozenset({"sh", "bash", "dash", "ash"})
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
_PTH_IMPORT = re.compile(r"""__import__\(\s*['"]([A-Za-z_][\w.]*)['"]|^import\s+([A-Za-z_]\w*)""")


@dataclass
class StaticAnalysis:
    """The result: resolved paths in read order, each with the layer holding it."""

    files: list[tuple[int, str]] = field(default_factory=list)  # (layer number, entry name)
    program: str = ""  # the resolved argv[0]
    notes: list[str] = field(default_factory=list)  # why something was not followed
    _seen: set[str] = field(default_factory=set)

    def add(self, root: RootFs, path: str) -> None:
        node = root.entry(path)
        if path in self._seen or node is None:
            return
        if node.entry.type not in (EntryType.REG, EntryType.HARDLINK):
            return
        self._seen.add(path)
        self.files.append((node.layer, path))


def image_argv(config: Mapping[str, Any]) -> list[str]:
    """Entrypoint + Cmd of an image config document (its `config` object)."""
    settings = config.get("config")
    if not isinstance(settings, Mapping):
        return []
    argv: list[str] = []
    for key in ("Entrypoint", "Cmd"):
        value = settings.get(key)
        if isinstance(value, list) and all(isinstance(part, str) for part in value):
            argv.extend(value)
    return argv


def image_env(config: Mapping[str, Any]) -> dict[str, str]:
    settings = config.get("config")
    raw = settings.get("Env") if isinstance(settings, Mapping) else None
    env: dict[str, str] = {}
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, str) and "=" in item:
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_workdir(config: Mapping[str, Any]) -> str:
    settings = config.get("config")
    value = settings.get("WorkingDir") if isinstance(settings, Mapping) else None
    return value if isinstance(value, str) else ""


class _Analyser:
    def __init__(
        self, root: RootFs, layers: Sequence[LayerFiles | None], env: Mapping[str, str]
    ) -> None:
        self.root = root
        self.layers = layers
        self.env = env
        self.result = StaticAnalysis()
        self.programs = 0

    # -- reading ------------------------------------------------------------------------------

    def _resolve(self, path: str, cwd: str = "") -> str | None:
        try:
            return self.root.resolve(path, cwd)
        except ResolveError as exc:
            self.result.notes.append(str(exc))
            return None

    def _regular(self, path: str | None) -> str | None:
        if path is None:
            return None
        node = self.root.entry(path)
        if node is None or node.entry.type not in (EntryType.REG, EntryType.HARDLINK):
            return None
        return path

    def _files_of(self, path: str) -> tuple[LayerFiles, int] | None:
        node = self.root.entry(path)
        if node is None:
            return None
        files = self.layers[node.layer]
        if files is None:
            return None
        data = files.data_entry(node.entry)
        return (files, data.size) if data is not None else None

    def _read(self, path: str, offset: int, length: int) -> bytes:
        found = self._files_of(path)
        if found is None:
            return b""
        files, _ = found
        node = self.root.entry(path)
        assert node is not None
        return files.read(node.entry, offset, length)

    # -- programs -----------------------------------------------------------------------------

    def find_program(self, name: str, cwd: str) -> str | None:
        if "/" in name:
            return self._regular(self._resolve(name, cwd))
        for directory in self.env.get("PATH", DEFAULT_PATH).split(":"):
            found = self._regular(self._resolve(f"{directory or '.'}/{name}", cwd))
            if found is not None:
                node = self.root.entry(found)
                if node is not None and node.entry.mode & 0o111:
                    return found
        return None

    def program_chain(self, argv: Sequence[str], cwd: str) -> str | None:
        """Add argv[0] and the interpreters of its #! lines; the program that runs last."""
        program = self.find_program(argv[0], cwd) if argv else None
        if program is None:
            if argv:
                self.result.notes.append(f"{argv[0]}: not found in the image")
            return None
        for _ in range(MAX_SHEBANG_HOPS):
            self.result.add(self.root, program)
            head = self._read(program, 0, 256)
            if not head.startswith(b"#!"):
                return program
            # the kernel's split: the interpreter, then at most one argument
            words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split(None, 1)
            if not words:
                return program
            interpreter = self.find_program(words[0], "")
            if interpreter is not None and interpreter.rsplit("/", 1)[-1] == "env":
                self.result.add(self.root, interpreter)
                rest = [w for w in " ".join(words[1:]).split() if not w.startswith("-")]
                interpreter = self.find_program(rest[0], "") if rest else None
            if interpreter is None:
                self.result.notes.append(f"{program}: interpreter {words[0]} not found")
                return None
            program = interpreter
        return program

    # -- ELF ------------------------------------------------------------------------------------

    def elf(self, path: str) -> ElfDependencies | None:
        found = self._files_of(path)
        if found is None or self.programs >= MAX_PROGRAMS:
            return None
        self.programs += 1
        size = found[1]
        if not is_elf(self._read(path, 0, 4)):
            return None
        try:
            return elf_dependencies(lambda offset, n: self._read(path, offset, n), size, path)
        except ElfError as exc:
            self.result.notes.append(str(exc))
            return None

    def libraries(self, program: str) -> None:
        main = self.elf(program)
        if main is None:
            return
        if main.interpreter is None:
            return  # static: no loader, no libraries
        self.result.add(self.root, self._regular(self._resolve(main.interpreter)) or "")
        for path in LOADER_FILES:
            self.result.add(self.root, path)
        conf_dirs = self._ld_so_conf()
        queue: list[tuple[str, ElfDependencies]] = [(program, main)]
        loaded: set[str] = set()
        while queue:
            owner, deps = queue.pop(0)
            for name in deps.needed:
                if name in loaded:
                    continue
                loaded.add(name)
                library = self._find_library(name, owner, deps, conf_dirs)
                if library is None:
                    self.result.notes.append(f"{owner}: library {name} not found")
                    continue
                self.result.add(self.root, library)
                found = self.elf(library)
                if found is not None:
                    queue.append((library, found))

    def _find_library(
        self, name: str, owner: str, deps: ElfDependencies, conf_dirs: Sequence[str]
    ) -> str | None:
        if "/" in name:
            return self._regular(self._resolve(name, owner.rpartition("/")[0]))
        origin = "/" + owner.rpartition("/")[0]
        env_dirs = [d for d in self.env.get("LD_LIBRARY_PATH", "").split(":") if d]
        dirs = [
            *(deps.rpath if not deps.runpath else ()),
            *env_dirs,
            *deps.runpath,
            *conf_dirs,
            *MULTIARCH_DIRS,
            *DEFAULT_LIBRARY_DIRS,
        ]
        for directory in dirs:
            directory = directory.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            found = self._regular(self._resolve(f"{directory}/{name}"))
            if found is not None:
                return found
        return None

    def _ld_so_conf(self) -> list[str]:
        """The directories /etc/ld.so.conf lists, following `include` globs one level."""
        dirs: list[str] = []
        pending = ["etc/ld.so.conf"]
        for _ in range(MAX_PTH_FILES):
            if not pending:
                break
            path = self._regular(self._resolve(pending.pop(0)))
            if path is None:
                continue
            text = self._read(path, 0, MAX_TEXT_BYTES).decode(errors="replace")
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("include "):
                    pending.extend(self._glob(line.split(None, 1)[1].strip()))
                elif line:
                    dirs.append(line)
        return dirs

    def _glob(self, pattern: str) -> list[str]:
        import fnmatch

        directory, _, base = pattern.rpartition("/")
        resolved = self._resolve(directory or "etc")
        if resolved is None:
            return []
        names = [n for n in self.root.listdir(resolved) if fnmatch.fnmatchcase(n, base)]
        return [f"{resolved}/{name}" if resolved else name for name in names]

    # -- files every start reads -----------------------------------------------------------------

    def add_path(self, path: str) -> None:
        found = self._regular(self._resolve(path))
        if found is not None:
            self.result.add(self.root, found)

    def python(self, program: str) -> None:
        match = _PYTHON_NAME.fullmatch(program.rsplit("/", 1)[-1])
        prefix = program.rpartition("/")[0].rpartition("/")[0]  # usr/bin/python3 -> usr
        if match is None:
            return
        major, minor = int(match.group(1)), int(match.group(2))
        version = f"{major}.{minor}"
        stdlib = next(
            (
                d
                for d in (f"{prefix}/lib/python{version}", f"usr/lib/python{version}")
                if self.root.is_dir(d)
            ),
            None,
        )
        if stdlib is None:
            self.result.notes.append(f"{program}: no lib/python{version} beside it")
            return
        tag = f"cpython-{major}{minor}"
        for path in PYTHON_LOCALE_FILES:
            self.add_path(path)
        for directory in (*MULTIARCH_DIRS, *DEFAULT_LIBRARY_DIRS):
            self.add_path(f"{directory}/gconv/gconv-modules.cache")
        modules = [*PYTHON_ENCODINGS]
        if (major, minor) < (3, 11):
            modules[1:1] = PYTHON_FROZEN_BEFORE_311
        for module in modules:
            self._module(stdlib, module, tag)
        for path in LIBC_FILES:
            self.add_path(path)
        for site in (
            f"{prefix}/lib/python{version}/site-packages",
            f"usr/local/lib/python{version}/dist-packages",
            f"usr/lib/python{major}/dist-packages",
            f"usr/lib/python{version}/dist-packages",
        ):
            self._site_dir(site, tag)
        self._module(stdlib, "sitecustomize", tag)

    def _module(self, directory: str, module: str, tag: str) -> bool:
        parent, _, name = f"{directory}/{module}".rpartition("/")
        candidates = [
            f"{parent}/__pycache__/{name}.{tag}.pyc",
            f"{parent}/{name}.py",
            f"{parent}/{name}/__pycache__/__init__.{tag}.pyc",
            f"{parent}/{name}/__init__.py",
        ]
        for candidate in candidates:
            found = self._regular(self._resolve(candidate))
            if found is not None:
                self.result.add(self.root, found)
                return True
        return False

    def _site_dir(self, site: str, tag: str) -> None:
        resolved = self._resolve(site)
        if resolved is None or not self.root.is_dir(resolved):
            return
        pth = [name for name in self.root.listdir(resolved) if name.endswith(".pth")]
        for name in pth[:MAX_PTH_FILES]:
            path = self._regular(self._resolve(f"{resolved}/{name}"))
            if path is None:
                continue
            self.result.add(self.root, path)
            text = self._read(path, 0, MAX_TEXT_BYTES).decode(errors="replace")
            for line in text.splitlines():
                for match in _PTH_IMPORT.finditer(line):
                    module = (match.group(1) or match.group(2)).split(".", 1)[0]
                    self._module(resolved, module, tag)


def analyse_image(
    config: Mapping[str, Any], root: RootFs, layers: Sequence[LayerFiles | None]
) -> StaticAnalysis:
    """The start-up files of the image whose config document is `config` (a parsed image
    config blob), whose merged layers are `root` and whose layer files (None: bytes not
    readable, e.g. an unsupported layer) are `layers`, by layer number."""
    env = image_env(config)
    analyser = _Analyser(root, layers, env)
    argv = image_argv(config)
    if not argv:
        analyser.result.notes.append("the image config has no Entrypoint or Cmd")
        return analyser.result
    cwd = image_workdir(config).lstrip("/")
    try:
        program = _analyse_command(analyser, argv, cwd)
        analyser.result.program = program or ""
        command = shell_command(argv) if program is not None else None
        if command is not None:  # a shell-form CMD: the shell, then what it runs
            _analyse_command(analyser, command, cwd)
    except BudgetExhausted as exc:
        analyser.result.notes.append(f"stopped early: {exc}")
    except IndexFormatError as exc:  # layer bytes that do not match the index
        analyser.result.notes.append(f"stopped: {exc}")
    return analyser.result


def _analyse_command(analyser: _Analyser, argv: Sequence[str], cwd: str) -> str | None:
    program = analyser.program_chain(argv, cwd)
    if program is None:
        return None
    analyser.libraries(program)
    if not _PYTHON_NAME.fullmatch(program.rsplit("/", 1)[-1]):
        for path in LIBC_FILES:
            analyser.add_path(path)
    analyser.python(program)
    return program


def shell_command(argv: Sequence[str]) -> list[str] | None:
    """What `sh -c 'CMD ...'` (a Dockerfile's shell-form CMD or ENTRYPOINT) runs first: the
    words of its first simple command, past `exec` and variable assignments. None when argv is
    not that, or the program's name is not a plain word (`$VAR`, a subshell, ...)."""
    if len(argv) < 3 or argv[0].rsplit("/", 1)[-1] not in SHELLS or argv[1] != "-c":
        return None
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    try:
        for token in lexer:
            if token and all(char in lexer.punctuation_chars for char in token):
                break  # ; && | ( ...: the first simple command ends here
            words.append(token)
    except ValueError:  # unbalanced quotes
        return None
    while words and (words[0] == "exec" or _ASSIGNMENT.fullmatch(words[0])):
        words.pop(0)
    if not words or any(char in words[0] for char in "$`"):
        return None
    return words


def static_command(config: Mapping[str, Any]) -> str:
    """The profile's `command` for a static profile of this image."""
    return f"{STATIC_COMMAND_PREFIX} {shlex.join(image_argv(config))}".rstrip()
