#!/usr/bin/env bash
# Installs the worker for a host without the build tree: PREFIX/bin/jetbatch, and beside it in
# PREFIX/lib/jetbatch/ every shared library it loads that is not the system's (libtorch_cpu,
# libc10, libgomp, the CUDA runtime libtorch links, and libtorch_cuda with its NVIDIA libraries
# when the build linked them). The binary's rpath is `$ORIGIN/../lib/jetbatch` then the build
# tree's libtorch (build.rs); the installed copy keeps only the first, so it loads nothing from
# the build tree. The libraries' own rpaths end in `$ORIGIN`, so they find one another there.
# The host still needs the C/C++ runtime (glibc, libstdc++, libgcc_s) at least as new as the
# build host's.
#
# Usage: scripts/install.sh PREFIX [BINARY]   (BINARY: target/release/jetbatch by default)
set -euo pipefail
prefix=${1:?usage: scripts/install.sh PREFIX [BINARY]}
bin=${2:-target/release/jetbatch}
[[ -x $bin ]] || { echo "install: $bin is not built (make build)" >&2; exit 1; }
mkdir -p "$prefix/bin" "$prefix/lib/jetbatch"
prefix=$(cd "$prefix" && pwd)

# What the loader resolves for the binary as built, dependencies of dependencies included.
ldd_out=$(ldd "$bin")
if grep -q "not found" <<<"$ldd_out"; then
    echo "install: $bin has unresolved libraries:" >&2
    grep "not found" <<<"$ldd_out" >&2
    exit 1
fi
copied=0
while read -r name path; do
    case $path in
        /lib/* | /lib64/* | /usr/lib/* | /usr/lib64/*) ;; # the system's: the host has its own
        *)
            # -L: the file, not a link into the build tree; named as the loader asks for it.
            cp -L "$path" "$prefix/lib/jetbatch/$name"
            copied=$((copied + 1))
            ;;
    esac
done < <(awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' <<<"$ldd_out")

dest=$prefix/bin/jetbatch
cp "$bin" "$dest.tmp"
runpath=$(readelf -d "$bin" | sed -n 's/.*Library runpath: \[\(.*\)\]$/\1/p')
# Shortened in place (as chrpath does): the string keeps its offset and length in .dynstr, the
# build tree's entry becomes NUL padding.
python3 - "$dest.tmp" "$runpath" <<'PY'
import sys
path, runpath = sys.argv[1], sys.argv[2]
keep = b"$ORIGIN/../lib/jetbatch"
old = runpath.encode() + b"\0"
if not old.startswith(keep):
    sys.exit(f"install: the binary's runpath {runpath!r} does not start with {keep.decode()} (built before build.rs set it?)")
data = open(path, "rb").read()
if data.count(old) != 1:
    sys.exit(f"install: the runpath string appears {data.count(old)} times in {path}")
open(path, "wb").write(data.replace(old, keep + b"\0" * (len(old) - len(keep))))
PY
mv "$dest.tmp" "$dest"
chmod 755 "$dest"
echo "installed $dest with $copied libraries in $prefix/lib/jetbatch ($(du -sh "$prefix/lib/jetbatch" | cut -f1))"
