"""Lay out the "bundled CPython" form of the istio-cni plugin (see cni_plugin/launcher.c).

``/usr/bin/python3.11 -I scripts/plugin_bundle.py OUT_DIR`` (stdlib only; run by
``scripts/build-plugin.sh bundled-cpython``). OUT_DIR must not exist; it becomes:

- ``istio-cni``: the launcher, compiled static (no C library needed to start it);
- ``runtime/bin/python3.11``: Debian's interpreter, as installed;
- ``runtime/ld-linux-x86-64.so.2`` and ``runtime/lib/*.so*``: the dynamic loader and every
  shared library the interpreter and the bundled extension modules need (``ldd``), so the
  host's C library is never used;
- ``runtime/lib/python3.11/``: exactly the modules the plugin can import, found by
  :mod:`modulefinder` from its entry point (imports inside functions included, so the
  API-fallback path's ``ssl`` is there), plus the ``encodings`` package the interpreter
  loads at start-up; compiled to sourceless ``.pyc`` (one file read per import, no source
  to stat) beside the extension modules under ``lib-dynload/``. The plugin's own modules
  sit there too, so ``-I -S`` (no site, no cwd) still finds them.

The interpreter finds this prefix from its own path (the landmark ``lib/python3.11/os.pyc``),
so the tree works wherever it is copied. A last step runs the bundle with an empty
environment (VERSION) and fails the build if it does not answer.
"""

from __future__ import annotations

import contextlib
import modulefinder
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3.11"
LOADER = "ld-linux-x86-64.so.2"
ENTRY = "from cni_plugin.plugin import main\nmain()\n"
# Agent-side code the plugin never reaches (modulefinder would follow the package's imports).
EXCLUDES = ["node_agent", "install", "testbed", "cni_plugin.redirection", "cni_plugin.netns"]
# Never needed by the plugin, and large: keep them out even if some stdlib module names them.
STDLIB_EXCLUDES = ["tkinter", "test", "unittest", "pydoc", "doctest", "lib2to3", "idlelib",
                   "ensurepip", "distutils", "sqlite3", "curses", "xml", "email", "http",
                   "urllib", "asyncio", "multiprocessing", "concurrent", "ctypes", "pdb",
                   "argparse", "gettext", "locale", "calendar", "tracemalloc", "bz2", "lzma",
                   "_ctypes", "_decimal", "decimal", "pickle", "_pickle", "logging"]  # fmt: skip


def _fail(msg: str) -> None:
    print(f"plugin_bundle: {msg}", file=sys.stderr)
    sys.exit(1)


def _modules() -> dict[str, str]:
    """Module name -> file, for every module the plugin's entry point can import."""
    stdlib = sysconfig.get_paths()["stdlib"]
    finder = modulefinder.ModuleFinder(
        path=[ROOT, stdlib, os.path.join(stdlib, "lib-dynload")],
        excludes=EXCLUDES + STDLIB_EXCLUDES,
    )
    finder.run_script(_write_entry())
    # Codecs are imported by name at run time (the interpreter's start-up, ``ssl``'s
    # ``idna`` for host names): every one, with what it imports (``stringprep``...).
    for f in sorted(os.listdir(os.path.join(stdlib, "encodings"))):
        if f.endswith(".py") and f != "__init__.py":
            with contextlib.suppress(ImportError):  # Windows-only codecs (mbcs, oem)
                finder.import_hook(f"encodings.{f[:-3]}")
    files = {name: getattr(m, "__file__", None) for name, m in finder.modules.items()}
    found = {name: f for name, f in files.items() if isinstance(f, str)}
    found.pop("__main__", None)
    return found


def _write_entry() -> str:
    path = os.path.join(ROOT, "build", "plugin-work", "bundle_entry.py")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(ENTRY)
    return path


def _place(name: str, src: str, libdir: str) -> str:
    """Copy or compile one module into ``libdir``; the path written."""
    if src.endswith(".so"):
        dst = os.path.join(libdir, "lib-dynload", os.path.basename(src))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
        return dst
    rel = name.replace(".", "/")
    rel += "/__init__.pyc" if os.path.basename(src) == "__init__.py" else ".pyc"
    dst = os.path.join(libdir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    # Hash-based: the bytes depend on the source only, so a rebuild of the same source is
    # the same tree and the installer leaves the host alone.
    py_compile.compile(
        src,
        cfile=dst,
        dfile=rel[:-1],
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return dst


def _shared_libs(paths: list[str]) -> set[str]:
    """Every shared library ``paths`` load, resolved to real files."""
    libs: set[str] = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        for m in re.finditer(r"(?:=>\s*)?(/\S+)\s+\(0x", out):
            libs.add(m.group(1))
    return libs


def build(out: str) -> None:
    if os.path.exists(out):
        _fail(f"{out} exists; remove it first")
    if not os.access(PYTHON, os.X_OK):
        _fail(f"{PYTHON} missing: run `make setup` (Debian's python3.11)")
    runtime = os.path.join(out, "runtime")
    libdir = os.path.join(runtime, "lib", "python3.11")
    os.makedirs(os.path.join(runtime, "bin"))
    os.makedirs(libdir)
    subprocess.run(
        ["cc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", os.path.join(out, "istio-cni"),
         os.path.join(ROOT, "cni_plugin", "launcher.c")],
        check=True,
    )  # fmt: skip
    shutil.copy2(PYTHON, os.path.join(runtime, "bin", "python3.11"))
    extensions = []
    for name, src in sorted(_modules().items()):
        dst = _place(name, src, libdir)
        if dst.endswith(".so"):
            extensions.append(dst)
    if not os.path.exists(os.path.join(libdir, "os.pyc")):
        # Frozen in the interpreter, so modulefinder skips it; it is also the landmark.
        _place("os", os.path.join(sysconfig.get_paths()["stdlib"], "os.py"), libdir)
    for lib in sorted(_shared_libs([PYTHON, *extensions])):
        name = os.path.basename(lib)
        dst = os.path.join(runtime, name) if name == LOADER else os.path.join(runtime, "lib", name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(os.path.realpath(lib), dst)
    if not os.path.exists(os.path.join(runtime, LOADER)):
        _fail(f"ldd named no {LOADER} for {PYTHON}")
    probe = subprocess.run(
        [os.path.join(out, "istio-cni")],
        env={"CNI_COMMAND": "VERSION"},
        input=b'{"cniVersion": "1.0.0"}',
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0 or b"supportedVersions" not in probe.stdout:
        _fail(f"the bundle does not run: {probe.stdout!r} {probe.stderr[-2000:]!r}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        _fail("usage: plugin_bundle.py OUT_DIR")
    build(os.path.abspath(sys.argv[1]))
