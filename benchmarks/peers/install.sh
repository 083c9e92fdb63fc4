#!/usr/bin/env bash
# Installs each peer library into its own virtual environment, benchmarks/peers/.venvs/NAME
# (their pins conflict with each other and with ours), on the local CPU build of torch
# (constraints-cpu.txt). Does nothing for a peer whose environment is up to date.
#
#   bash benchmarks/peers/install.sh [NAME ...]      (default: every peer)
set -euo pipefail
cd "$(dirname "$0")"
root=../..
# name -> what pip installs (pinned: the comparison is of these versions)
declare -A PEERS=(
    [pydvl]="pydvl[influence]==0.10.0"
    [dattri]="dattri==0.3.0"
    [kronfluence]="kronfluence==1.0.1"
    [bergson]="bergson==2.5.1"
    [cleanlab]="cleanlab==2.9.0"
)
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=(pydvl dattri kronfluence bergson cleanlab)
fi
for name in "${names[@]}"; do
    spec=${PEERS[$name]:?"unknown peer $name; choose from ${!PEERS[*]}"}
    venv=.venvs/$name
    want=$(printf '%s\n' "$spec" | cat - "$root/constraints-cpu.txt" install.sh | sha256sum | cut -d' ' -f1)
    if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$want" ]; then
        continue
    fi
    echo "installing $spec into benchmarks/peers/$venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" "$spec" torch numpy 2>&1 \
        | { grep -v "is ignored: it is neither a file" || true; }
    if [ "$name" = kronfluence ] || [ "$name" = bergson ]; then
        # neither uses torchvision/torchaudio, but they pull ones built for another torch,
        # which break transformers' import ("operator torchvision::nms does not exist")
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio 2>&1 \
            | { grep -v "not installed" || true; }
    fi
    if [ "$name" = kronfluence ] || [ "$name" = bergson ] || [ "$name" = cleanlab ]; then
        # the whole-pipeline peers load the same model, adapter and data through datainf
        "$venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" -e "$root[hf,report]" 2>&1 \
            | { grep -v "is ignored: it is neither a file" || true; }
        "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-assets.txt" 2>&1 \
            | { grep -v "is ignored: it is neither a file" || true; }
    fi
    "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$want" > "$venv/.stamp"
done
