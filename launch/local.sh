#!/usr/bin/env bash
# One-node launcher: bash launch/local.sh RECIPE [key=value overrides...]
# Uses launch/accelerate/single_gpu.yaml when a GPU is visible, the CPU config otherwise.
# ACCEL_CONFIG picks another Accelerate config: a name under launch/accelerate/ (ddp, fsdp, zero2, zero3, ...)
# or a path to a YAML file; NUM_PROCESSES overrides the config's num_processes.
#   ACCEL_CONFIG=ddp NUM_PROCESSES=4 bash launch/local.sh recipes/qwen2.5-0.5b/grpo/gsm8k.yaml
set -euo pipefail
recipe=${1:?usage: [ACCEL_CONFIG=name|file.yaml] [NUM_PROCESSES=N] launch/local.sh RECIPE [overrides...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
if [[ -n "${ACCEL_CONFIG:-}" ]]; then
  if [[ -f "$ACCEL_CONFIG" ]]; then
    cfg="$ACCEL_CONFIG"
  elif [[ -f "$here/accelerate/$ACCEL_CONFIG.yaml" ]]; then
    cfg="$here/accelerate/$ACCEL_CONFIG.yaml"
  else
    known=$(cd "$here/accelerate" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')
    echo "launch/local.sh: ACCEL_CONFIG=$ACCEL_CONFIG is neither a file nor one of: $known" >&2
    exit 2
  fi
elif python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  cfg="$here/accelerate/single_gpu.yaml"
else
  cfg="$here/accelerate/cpu.yaml"
fi
extra=()
if [[ -n "${NUM_PROCESSES:-}" ]]; then
  extra=(--num_processes "$NUM_PROCESSES")
fi
exec accelerate launch --config_file "$cfg" ${extra[@]+"${extra[@]}"} -m rl_small.train --recipe "$recipe" "$@"
