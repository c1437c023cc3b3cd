#!/usr/bin/env bash
# One-node launcher: bash launch/local.sh RECIPE [key=value overrides...]
# Uses launch/accelerate/single_gpu.yaml when a GPU is visible, the CPU config otherwise.
set -euo pipefail
recipe=${1:?usage: launch/local.sh RECIPE [overrides...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  cfg="$here/accelerate/single_gpu.yaml"
else
  cfg="$here/accelerate/cpu.yaml"
fi
exec accelerate launch --config_file "$cfg" -m rl_small.train --recipe "$recipe" "$@"
