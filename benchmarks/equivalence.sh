#!/usr/bin/env bash
# Behaviour against an earlier commit: the same cache files byte for byte (shards, index,
# manifest), the same decoded cache contents and the same loss curve. Builds top-8 and logprob caches (hf engine, built-in corpus of the teacher's
# tokenizer) with REV's code and with this tree's, compares every decoded column, then
# trains the same student for 12 steps on a 2-sequence cache (every step sees the same
# batch, so the reader's data order cannot differ) with each version's code, with the default
# settings and with weight decay 0 (this tree no longer decays 1-D parameters).
#   bash benchmarks/equivalence.sh REV teacher/ corpus.jsonl
set -euo pipefail
REV=$1 T=$(realpath "$2") C=$(realpath "$3")
HERE=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/sparsekd-equiv-XXXX)
cd "$W"  # python -m puts the working folder first on sys.path: not this checkout
git -C "$HERE" worktree add -q --detach "$W/old-src" "$REV"
trap 'git -C "$HERE" worktree remove --force "$W/old-src"' EXIT
cat > "$W/dump.py" <<'PY'
import sys, numpy as np
from sparsekd.schemas.cache import open_cache
seqs = list(open_cache(sys.argv[1]))
cols = {n: np.concatenate([getattr(s, n) for s in seqs])
        for n in ("input_ids", "token_logprobs", "support_size", "ids")}
cols["seq_id"] = np.array([s.seq_id for s in seqs])
cols["next_token"] = np.array([s.next_token for s in seqs])
cols["probs"] = np.concatenate([s.targets()[2] for s in seqs])
np.savez(sys.argv[2], **cols)
PY
PYTHONPATH=$HERE python -m sparsekd init-student --like "$T" --out "$W/student" --layers 2 --hidden 128 --heads 4 >/dev/null
for v in old new; do
  if [ $v = old ]; then SRC=$W/old-src; else SRC=$HERE; fi
  for m in topk logprob; do
    extra=(); [ $m = topk ] && extra=(--k 8)
    PYTHONPATH=$SRC python -m sparsekd build-cache --teacher "$T" --corpus "$C" --seq-len 256 \
      --max-sequences 24 --mode $m "${extra[@]}" --engine hf --out "$W/$v-$m" --quiet
    PYTHONPATH=$SRC python "$W/dump.py" "$W/$v-$m" "$W/$v-$m.npz"
  done
  PYTHONPATH=$SRC python -m sparsekd build-cache --teacher "$T" --corpus "$C" --seq-len 256 \
    --max-sequences 2 --mode topk --k 8 --engine hf --out "$W/$v-two" --quiet
  WD=optim.weight_decay=0  # sparsekd before 2900c7d's successor named it weight_decay
  PYTHONPATH=$SRC python -m sparsekd train-student --cache "$W/$v-two" --student "$W/student" \
    --out "$W/probe" --steps 1 --print-config 2>/dev/null | grep -q '"optim"' || WD=weight_decay=0
  for run in default nodecay; do
    set_wd=(); [ $run = nodecay ] && set_wd=(--set "$WD")
    PYTHONPATH=$SRC python -m sparsekd train-student --cache "$W/$v-two" --student "$W/student" \
      --out "$W/$run-$v" --steps 12 --batch-size 2 --loss fkl "${set_wd[@]}" --quiet >/dev/null 2>&1
  done
done
python - "$W" <<'PY'
import glob, hashlib, json, os, sys, numpy as np
w = sys.argv[1]
for m in ("topk", "logprob"):  # the published files, byte for byte
    digest = {}
    for v in ("old", "new"):
        root = f"{w}/{v}-{m}"
        files = glob.glob(f"{root}/shards/*/*.parquet") + glob.glob(f"{root}/index/*")
        digest[v] = {os.path.relpath(f, root): hashlib.sha256(open(f, "rb").read()).hexdigest()
                     for f in files + [f"{root}/manifest.json"]}
    same = [f for f in digest["old"] if digest["new"].get(f) == digest["old"][f]]
    print(f"{m}: {len(same)} of {len(digest['old'])} files (shards, index, manifest) "
          f"byte-identical; differ: {sorted(set(digest['old']) ^ set(digest['new']) | (set(digest['old']) - set(same))) or 'none'}")
for m in ("topk", "logprob"):
    a, b = np.load(f"{w}/old-{m}.npz"), np.load(f"{w}/new-{m}.npz")
    same = [k for k in a.files if a[k].shape == b[k].shape and np.array_equal(a[k], b[k])]
    print(f"{m}: {len(same)} of {len(a.files)} decoded columns identical;",
          "differ:", sorted(set(a.files) - set(same)) or "none")
loss = lambda r, v: [x["loss"] for x in map(json.loads, open(f"{w}/{r}-{v}/metrics.jsonl")) if "loss" in x]
for run in ("default", "nodecay"):
    old, new = loss(run, "old"), loss(run, "new")
    print(f"loss, {run} settings, {len(old)} steps: max |old - new| = "
          f"{max(abs(x - y) for x, y in zip(old, new)):.3g} (old {old[0]:.6f} -> {old[-1]:.6f}, "
          f"new {new[0]:.6f} -> {new[-1]:.6f})")
PY
