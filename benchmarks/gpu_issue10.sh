#!/usr/bin/env bash
# The GPU half of issue 10 in one call of the lent device machine (prepared on the CPU machine;
# not yet run on a GPU). First, here, in the project root:
#
#   bash ../shared/gpu/wheels.sh pomegranate==1.1.2 apricot-select tqdm
#
# That is about 5 MB of wheels. numba's llvmlite alone is 60 MB, over the 64 MiB a call carries,
# so the script writes an import-only numba stand-in: apricot, which pomegranate imports, only
# decorates functions with it, and the benchmark calls none of them (tried on the CPU with the
# stand-in first on PYTHONPATH: pomegranate's rows ran as before). Then run this script on the
# device with carry [".whl"] and timeout_s 600. Each stage has its own time limit, so one that
# overruns still leaves the others' output; gpu_scale.py also prints each size's Adam figures to
# stderr as soon as it has them. The tables come last.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PROBKIT_CACHE=/tmp/pkcache || exit 1
export PYTHONUNBUFFERED=1
mkdir -p /tmp/shim/numba && cat > /tmp/shim/numba/__init__.py <<'PY'
def njit(*args, **kwargs):  # import-only stand-in: returns the function undecorated
    return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else (lambda function: function)
prange = range
PY
python3 -c "import numba" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:/tmp/shim
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -c "import torch, pyro, pydantic; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())" || exit 1
python3 -c "import pomegranate" 2>/dev/null || echo "pomegranate does not import here: its rows will say so"

# every (N, K) of the issue, probkit vs hand eager vs the CUDA graph floor, EM, pomegranate
timeout 330 python3 benchmarks/gpu_scale.py --device cuda --em-iters 200 > /tmp/scale.txt 2> /tmp/scale.err
echo "gpu_scale exit $?"
# torch.compile on CUDA (opt-in fit setting), two sizes, no EM rows
timeout 150 python3 benchmarks/gpu_scale.py --device cuda --compile on --sizes 1437x10,60000x100 \
  --skip-pomegranate --em-iters 1 > /tmp/compile.txt 2> /tmp/compile.err
echo "gpu_scale --compile on exit $?"
# each size's Adam figures as they were measured, in case a table did not get printed
grep -h "Adam ms/step" /tmp/scale.err /tmp/compile.err
tail -3 /tmp/scale.err /tmp/compile.err
cat /tmp/compile.txt /tmp/scale.txt
