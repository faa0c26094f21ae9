set -e
cd /tmp/b14
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PY=/work/main/.venv/bin/python
(cd before && PYTHONPATH=$PWD $PY -m preprocessing.cli simulate --out /tmp/b14/data_before --seed 0 >/dev/null 2>&1)
(cd /work/main && $PY -m tme_atlas simulate --out /tmp/b14/data_after --seed 0 >/dev/null 2>&1)
uptime
s=$(date +%s.%N); (cd before && PYTHONPATH=$PWD $PY -m preprocessing.cli build /tmp/b14/data_before/samplesheet.csv --out /tmp/b14/atlas_before > /tmp/b14/before.log 2>&1); e=$(date +%s.%N); echo "before wall $(echo "$e - $s" | bc)"
uptime
s=$(date +%s.%N); (cd /work/main && $PY -m tme_atlas build /tmp/b14/data_after/samplesheet.csv --out /tmp/b14/atlas_after > /tmp/b14/after.log 2>&1); e=$(date +%s.%N); echo "after wall $(echo "$e - $s" | bc)"
uptime
