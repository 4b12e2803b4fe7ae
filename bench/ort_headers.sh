#!/usr/bin/env bash
# onnxruntime's C API headers, for building bench/matmul_nbits_op.c: no PyPI wheel carries them,
# Debian's libonnxruntime-dev (trixie) does. The custom-op part of the C API is versioned and only
# grows, so the 1.21 headers (ORT_API_VERSION 21) build a library that any onnxruntime >= 1.21
# loads (we need >= 1.24).
# Usage: bash bench/ort_headers.sh DIR   -> DIR/onnxruntime/onnxruntime_c_api.h
set -euo pipefail
DIR=${1:?usage: ort_headers.sh DIR}
DEB=${ORT_HEADERS_DEB:-http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb}
SHA256=${ORT_HEADERS_SHA256:-14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08}
if [ -f "$DIR/onnxruntime/onnxruntime_c_api.h" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 -o "$tmp/dev.deb" "$DEB"
if [ -n "$SHA256" ]; then echo "$SHA256  $tmp/dev.deb" | sha256sum -c - >/dev/null; fi
dpkg-deb -x "$tmp/dev.deb" "$tmp/x"
mkdir -p "$DIR"
rm -rf "$DIR/onnxruntime"
cp -r "$tmp/x/usr/include/onnxruntime" "$DIR/onnxruntime"
echo "onnxruntime C headers in $DIR/onnxruntime"
