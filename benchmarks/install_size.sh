#!/usr/bin/env bash
# The README's install figures: a fresh virtual environment per route, the install's wall time,
# site-packages minus torch / torchvision / nvidia / triton / cuda (du), then the main job.
#   bash benchmarks/install_size.sh            # both routes; about 5 minutes and 7 GB of /tmp (deleted after)
# Route "default" is the README's first command (`pip install -e .`: pip's default torch, the CUDA build
# on Linux). Route "cpu" installs torch and torchvision first and `pip install -e .` after; here the
# PyTorch CPU index cannot be reached, so the pins "torch==2.13.*" "torchvision==0.28.*" pick the local
# CPU torch wheel instead (set CPU_FIRST to the README's first step where that index can be reached).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/auxnb-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CPU_FIRST=${CPU_FIRST:-'pip install -q "torch==2.13.*" "torchvision==0.28.*"'}
report() {
  sp=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  total=$(du -sm "$sp" | cut -f1)
  heavy=$(cd "$sp" && du -smc torch torch-* torchvision torchvision-* torchvision.libs nvidia* triton* cuda* 2>/dev/null | tail -1 | cut -f1)
  echo "$2: site-packages $total MB; torch, torchvision, nvidia, triton, cuda $heavy MB; the rest $((total - heavy)) MB"
}
for route in default cpu; do
  V=$WORK/venv-$route
  python3 -m venv "$V"
  start=$(date +%s)
  if [ "$route" = default ]; then
    (cd "$ROOT" && . "$V/bin/activate" && pip install -q -e .)
  else
    (cd "$ROOT" && . "$V/bin/activate" && eval "$CPU_FIRST" && pip install -q -e .)
  fi
  echo "$route: install $(( $(date +%s) - start )) s wall"
  report "$V" "$route"
  (cd "$WORK" && . "$V/bin/activate" && /usr/bin/time -f "$route: main job %e s wall" python -m auxnb run digits-rotation --method stl --no-progress | tail -1)
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
