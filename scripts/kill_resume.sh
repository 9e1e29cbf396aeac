#!/usr/bin/env bash
# Does `longtail train CONFIG ... --out DIR --resume` survive SIGKILL at any moment?
#
#   bash scripts/kill_resume.sh [--kills N] [--early N] [--config FILE] [--out DIR] [--seed S] [k=v ...]
#   bash scripts/kill_resume.sh --compare REFERENCE_RUN RUN [RUN ...]
#
# 1. Trains CONFIG once without interruption (OUT/reference) and measures how long that takes (D), when its
#    first checkpoint.pt appeared, how long a step takes and how long an epoch's evaluation takes. Phases are
#    told apart by what the run writes on purpose: its plain log lines (`epoch N/M | step S/T | ...` at every
#    check point, `epoch N/M | loss ...` once the epoch's record is in metrics.jsonl) and its files.
# 2. Trains the same run in OUT/killed-1 with the one requeue command `longtail train CONFIG k=v... --out DIR
#    --resume`, SIGKILLs it at a random moment, reruns the identical command, and so on until it finishes.
#    A run that finishes before its kill fires ends that round; the next round starts in OUT/killed-2, until
#    N kills have hit a running process (only those count). Kill moments, in turn:
#      - the first --early ones: uniform in [0, time of the reference's first checkpoint] (start-up, epoch 1),
#      - then, cycling through six: uniform in [0, D]; "eval": after a uniform wait, at the next epoch's last
#        logged step, plus the time its remaining steps took in the reference, plus up to a third of the
#        reference's evaluation time; uniform; "record": after a uniform wait, as soon as the next epoch
#        record line is printed (metrics.jsonl written, checkpoint.pt not yet);
#        uniform; "write": after a uniform wait, as soon as a new .tmp file shows that checkpoint.pt, best.pt,
#        model.pt, ... is being written (polled every 2 ms, so some of these land just after the rename).
#    After each kill the run directory is snapshotted (file names, checkpoint.pt, best.pt, metrics.jsonl) so
#    that the report can say what each kill interrupted.
# 3. Reruns the finished run once more (it must print "already finished", exit 0 and rewrite nothing), then
#    compares every round with the reference: model.pt (every tensor, bit for bit), results.json and
#    metrics.jsonl (all values except images_per_sec / epoch_seconds and the segments list), and prints, last,
#      N kills survived, identical: yes        (exit 0)
#    or `N kills survived, identical: no`, after the lines saying what differed or failed (exit 1).
#
# Options (flag, or environment variable of the same name in capitals; flags win):
#   --kills N     KILLS      kills that must hit a running process (default 20)
#   --early N     EARLY      how many of them are drawn before the reference's first checkpoint (default 3)
#   --config F    CONFIG     the config (default configs/fashion_mnist_lt/ce.yaml)
#                 OVERRIDES  its overrides, whitespace-separated; replaces the default short run:
#                            train.epochs=5 model.width=512 train.checkpoint_every=25 data.augment=crop_flip
#                            data.val_per_class=20 eval.select=best_val
#                            (mid-epoch checkpoints every 25 of 116 steps; augmentation, a val split and
#                            best.pt so that every resume path is used)
#   k=v ...                  more overrides, appended to OVERRIDES (later ones win)
#   --out DIR     OUT        output directory (default runs/kill_resume); emptied first, and refused when it
#                            exists, is not empty and was not made by this script
#   --seed S      SEED       seed of the random kill moments (default 0); the moments a seed draws are
#                            reproducible, what they hit depends on the machine's timing
#                 PYTHON     the interpreter (default .venv/bin/python, or python when VIRTUAL_ENV is set)
#   --compare REF RUN...     only compare finished runs with REF and print the verdict
# The data root comes from $LONGTAIL_DATA as for `longtail train` (or add data.root=DIR). Every process runs
# with OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} (and MKL_NUM_THREADS likewise): the same thread count in all
# runs, so floating-point sums are reduced in the same order. The default takes ~4 min on a 2-core CPU.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

die() { echo "kill_resume.sh: $*" >&2; exit 2; }

PY=.venv/bin/python; [ -n "${VIRTUAL_ENV:-}" ] && PY=python
PY=${PYTHON:-$PY}
KILLS=${KILLS:-20}
EARLY=${EARLY:-3}
CONFIG=${CONFIG:-configs/fashion_mnist_lt/ce.yaml}
OVERRIDES=${OVERRIDES-train.epochs=5 model.width=512 train.checkpoint_every=25 data.augment=crop_flip data.val_per_class=20 eval.select=best_val}
OUT=${OUT:-runs/kill_resume}
SEED=${SEED:-0}
read -r -a OVR <<<"$OVERRIDES"
COMPARE=()
while (($#)); do
  arg=$1; shift
  if [[ $arg == --*=* ]]; then set -- "${arg#*=}" "$@"; arg=${arg%%=*}; fi
  case $arg in
    --kills) KILLS=${1:?--kills needs a value}; shift ;;
    --early) EARLY=${1:?--early needs a value}; shift ;;
    --config) CONFIG=${1:?--config needs a value}; shift ;;
    --out) OUT=${1:?--out needs a value}; shift ;;
    --seed) SEED=${1:?--seed needs a value}; shift ;;
    --compare) (($# >= 2)) || die "--compare needs a reference run and at least one run"; COMPARE=("$@"); set -- ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *=*) OVR+=("$arg") ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[[ $KILLS =~ ^[0-9]+$ && $EARLY =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ ]] || die "--kills, --early and --seed take integers >= 0"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}

# ------------------------------------------------------------------ comparison and kill report (python)
# argv: REF RUN...; $KR_KILLS: the kills table (optional). Prints what differs; exit 1 when anything does.
read -r -d '' COMPARE_PY <<'EOF' || true
import json, os, re, sys
from pathlib import Path
import torch

IGNORED = {"images_per_sec", "epoch_seconds", "segments"}  # timing; where and when each restarted part ran
ref, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
problems = []

def strict_jsonl(path):
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"line {number} is not JSON (torn)")
    return records

def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in IGNORED}
    return [strip(v) for v in o] if isinstance(o, list) else o

def diff(a, b, where, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b or k not in a:
                out.append(f"{where}.{k}: only in {'the reference' if k in a else 'this run'}")
            else:
                diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{where}[{i}]", out)
    elif json.dumps(a) != json.dumps(b):  # repr of floats round-trips: equal text is equal bits
        out.append(f"{where}: {json.dumps(a)} (reference) vs {json.dumps(b)}")

def bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

def compare(run):
    out = []
    for name in ("model.pt", "results.json", "metrics.jsonl"):
        for d in (ref, run):
            if not (d / name).is_file():
                out.append(f"{d / name} is missing")
    if out:
        return out
    a = torch.load(ref / "model.pt", map_location="cpu", weights_only=True)
    b = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    for k in [k for k in a if k not in b] + [k for k in b if k not in a]:
        out.append(f"model.pt: tensor {k} only in {'the reference' if k in a else 'this run'}")
    for k in (k for k in a if k in b):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"model.pt: {k}: {x.dtype} {tuple(x.shape)} (reference) vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(bits(x), bits(y)):
            n = int((x != y).sum()) if x.numel() else 0
            gap = f", max |diff| {float((x.double() - y.double()).abs().max()):.3g}" if x.is_floating_point() else ""
            out.append(f"model.pt: {k}: {n} of {x.numel()} values differ{gap}")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, run))
    diff(strip(ra), strip(rb), "results.json", out)
    try:
        ma, mb = (strict_jsonl(d / "metrics.jsonl") for d in (ref, run))
    except ValueError as exc:
        return out + [f"metrics.jsonl: {exc}"]
    if [r.get("epoch") for r in ma] != [r.get("epoch") for r in mb]:
        out.append(f"metrics.jsonl: epochs {[r.get('epoch') for r in ma]} (reference) vs {[r.get('epoch') for r in mb]}")
    else:
        for x, y in zip(ma, mb):
            diff(strip(x), strip(y), f"metrics.jsonl epoch {x.get('epoch')}", out)
    return out

# ---- what each kill interrupted, from the snapshot taken right after it
ORDER = ["startup", "before-checkpoint", "resume-load", "mid-epoch", "eval", "record", "write", "best",
         "after-checkpoint", "finish", "export", "exit"]

def target(tmp):  # .checkpoint.pt.k2j3h4.tmp -> checkpoint.pt
    return tmp[1:-len(".tmp")].rsplit(".", 1)[0]

STEP = re.compile(r"epoch (\d+)/\d+ \| step (\d+)/(\d+) \|")
RECORD = re.compile(r"epoch (\d+)/\d+ \| loss ")

def last_logged_steps(log):  # {epoch: the last step an uninterrupted run logs in it}
    last = {}
    for line in Path(log).read_text().splitlines():
        m = STEP.match(line)
        if m:
            last[int(m[1])] = int(m[2])
    return last

def classify(snap, log, epochs, before, last_step):
    names = set((snap / "listing").read_text().split())
    out = Path(log + ".out").read_text(errors="replace") if Path(log + ".out").exists() else ""
    ck = torch.load(snap / "checkpoint.pt", weights_only=True) if (snap / "checkpoint.pt").exists() else None
    best = torch.load(snap / "best.pt", weights_only=True) if (snap / "best.pt").exists() else None
    text = (snap / "metrics.jsonl").read_text() if (snap / "metrics.jsonl").exists() else ""
    torn = bool(text) and not text.endswith("\n")
    records = len([l for l in text.splitlines() if l.strip()]) - torn
    done = 0 if ck is None else ck["epoch"] + 1  # complete epochs the checkpoint holds
    part = None if ck is None else ck.get("partial")
    if ck is None:
        state = "no checkpoint"
    elif part is not None:
        state = f"mid-epoch checkpoint: epoch {part['epoch'] + 1}, {part['batch']} batches done"
    else:
        state = f"checkpoint after epoch {done}"
    tmps = sorted(target(n) for n in names - before if n.startswith(".") and n.endswith(".tmp"))
    logged = [line for line in out.splitlines() if STEP.match(line) or RECORD.match(line)]
    step = STEP.match(logged[-1]) if logged else None  # the attempt's last step line, unless a record followed
    if "results.json" in names:
        return "exit", "after results.json was written: the process was exiting"
    if tmps:
        return "write", f"while writing {', '.join(tmps)} (a .tmp file was left; {state})"
    if torn:
        return "record", f"mid-append of metrics.jsonl: torn last line ({state})"
    if "model.pt" in names:
        return "export", "exporting: model.pt written, results.json not yet"
    if not any(l.startswith("run ") for l in out.splitlines()):
        return "startup", f"start-up (imports, data, config check, checkpoint load); {state}"
    at_end = step is not None and int(step[2]) == last_step.get(int(step[1]))
    if ck is None:
        what = "at the end of its steps or evaluating" if at_end else "training"
        return "before-checkpoint", f"{what} epoch 1, before the first checkpoint existed"
    if records > done:
        return "record", f"after epoch {records}'s metrics record, before its checkpoint.pt ({state})"
    if part is None and ck["best"].get("epoch") == done and (best is None or best["epoch"] != done):
        return "best", f"after epoch {done}'s checkpoint.pt, before its best.pt"
    if not logged and part is None and done == epochs:
        return "finish", "resumed after the last epoch's checkpoint: loading best.pt, final evaluation"
    if not logged:
        return "resume-load", f"after the start-up line, before its first logged step ({state})"
    if step is None and done == epochs:
        return "finish", "after the last epoch's checkpoint: loading best.pt, final evaluation"
    if step is None:
        return "after-checkpoint", f"after epoch {done}'s checkpoint, before epoch {done + 1}'s first logged step"
    epoch, at, steps = int(step[1]), int(step[2]), int(step[3])
    if at_end:
        return "eval", (f"end of epoch {epoch}: after its last logged step ({at}/{steps}), in its last "
                        f"{steps - at} steps or its evaluation, no record yet ({state})")
    if part is not None and part["epoch"] + 1 == epoch:
        return "mid-epoch", f"training epoch {epoch}, after its mid-epoch checkpoint at batch {part['batch']}"
    return "mid-epoch", f"training epoch {epoch}, before its first mid-epoch checkpoint ({state})"

kills = os.environ.get("KR_KILLS")
if kills and Path(kills).exists() and (ref / "results.json").exists():
    epochs = json.loads((ref / "results.json").read_text())["epochs"]
    last_step = last_logged_steps(ref.parent / "logs" / "reference.out")
    counts, before = {}, {}
    for row in Path(kills).read_text().splitlines():
        n, rnd, attempt, kind, at, snap, log = row.split("\t")
        snap = Path(snap)
        try:
            tag, what = classify(snap, log, epochs, before.get(rnd, set()), last_step)
        except Exception as exc:  # a report problem, not a resume problem
            tag, what = "unclassified", f"could not classify: {exc}"
        before[rnd] = set((snap / "listing").read_text().split())
        counts[tag] = counts.get(tag, 0) + 1
        print(f"kill {n:>2} (round {rnd}, attempt {attempt}, {kind}, at {at} s): {what}")
        for pt in ("checkpoint.pt", "best.pt"):
            (snap / pt).unlink(missing_ok=True)
    print("kills by moment: " + ", ".join(f"{tag} {counts[tag]}" for tag in ORDER + ["unclassified"] if tag in counts))

bad = False
for run in runs:
    found = compare(run)
    bad |= bool(found)
    stray = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) if run.is_dir() else []
    print(f"{run}: " + ("identical to the reference" if not found else f"{len(found)} differences from the reference")
          + (f" (note: {len(stray)} stray .tmp files left by killed writes)" if stray else ""))
    for line in found[:20]:
        print(f"  {line}")
    if len(found) > 20:
        print(f"  ... and {len(found) - 20} more")
sys.exit(1 if bad else 0)
EOF

# argv: the reference's timed log (ms TAB line). Prints "STEP_MS EVAL_MS", then for each epoch its last logged
# step line's prefix TAB the ms its remaining steps took: steps at the median pace of the logged ones.
read -r -d '' TIMING_PY <<'EOF' || true
import re, statistics, sys

STEP = re.compile(r"(epoch (\d+)/\d+ \| step (\d+)/(\d+)) \|")
RECORD = re.compile(r"epoch (\d+)/\d+ \| loss ")
steps, last, records = [], {}, {}
for row in open(sys.argv[1]):
    ms, line = row.rstrip("\n").split("\t", 1)
    m, r = STEP.match(line), RECORD.match(line)
    if m:
        steps.append((int(m[2]), int(m[3]), int(ms)))
        last[int(m[2])] = (m[1], int(m[3]), int(m[4]), int(ms))
    elif r:
        records[int(r[1])] = int(ms)
paces = [(t2 - t1) / (s2 - s1) for (e1, s1, t1), (e2, s2, t2) in zip(steps, steps[1:]) if e1 == e2 and s2 > s1]
pace = statistics.median(paces) if paces else 0.0
evals = [max(0.0, records[e] - at - (total - step) * pace) for e, (_, step, total, at) in last.items() if e in records]
print(round(pace), round(statistics.mean(evals)) + 20 if evals else 200)
for prefix, step, total, _ in last.values():
    print(f"{prefix}\t{round((total - step) * pace)}")
EOF

if ((${#COMPARE[@]})); then
  if "$PY" -c "$COMPARE_PY" "${COMPARE[@]}"; then echo "identical: yes"; exit 0; else echo "identical: no"; exit 1; fi
fi

# ------------------------------------------------------------------ helpers
[ -f "$CONFIG" ] || die "config $CONFIG does not exist"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ ! -e "$OUT/.kill_resume" ]; then
  die "$OUT exists, is not empty and was not written by this script; choose another --out"
fi
rm -rf "$OUT"
mkdir -p "$OUT/logs" "$OUT/kills"
touch "$OUT/.kill_resume"
OUT=$(cd "$OUT" && pwd)

NAPDIR=$(mktemp -d)
mkfifo "$NAPDIR/fifo"
exec {NAP}<>"$NAPDIR/fifo"  # read -t on an fd that never has data: sub-second sleeps without a fork
PID=
cleanup() { [ -n "$PID" ] && kill -KILL "$PID" 2>/dev/null; rm -rf "$NAPDIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

nap_ms() { (($1 > 0)) || return 0; local s; printf -v s '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); read -r -t "$s" -u "$NAP" _ || true; }
now_ms() { local t=${EPOCHREALTIME//[.,]/}; NOW=$((t / 1000)); }
secs() { printf -v SECS '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
RANDOM=$SEED
draw() { R=$(((RANDOM * 32768 + RANDOM) % ($1 + 1))); }  # R: uniform integer in [0, $1]
alive() {  # still running (not exited, not a zombie)
  local s
  { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  [[ ${s:0:1} != Z ]]
}
hold() {  # hold MS: wait MS ms while $PID runs; false when it ended first
  local end left; now_ms; end=$((NOW + $1))
  while alive "$PID"; do
    now_ms; left=$((end - NOW)); ((left <= 0)) && return 0
    nap_ms $((left > 50 ? 50 : left))
  done
  return 1
}
LINES=()
read_log() { LINES=(); { mapfile -t LINES <"$1"; } 2>/dev/null || true; }  # the lines of a log so far
EPOCH_LINES=0
count_epochs() {  # epoch record lines (`epoch N/M | loss ...`): printed right after the record is appended
  local l; EPOCH_LINES=0; read_log "$1"
  for l in "${LINES[@]}"; do [[ $l =~ ^epoch\ [0-9]+/[0-9]+\ \|\ loss\  ]] && EPOCH_LINES=$((EPOCH_LINES + 1)); done
  return 0
}
declare -A TAIL_OF=()  # `epoch N/M | step S/T`, the last step line of epoch N -> ms its remaining steps took
ENDS=0 TAIL=0
count_ends() {  # lines that are an epoch's last logged step; TAIL: the remaining steps' time after the last one
  local l; ENDS=0; read_log "$1"
  for l in "${LINES[@]}"; do
    [[ $l =~ ^(epoch\ [0-9]+/[0-9]+\ \|\ step\ [0-9]+/[0-9]+)\ \| && -n ${TAIL_OF[${BASH_REMATCH[1]}]:-} ]] || continue
    ENDS=$((ENDS + 1)) TAIL=${TAIL_OF[${BASH_REMATCH[1]}]}
  done
  return 0
}
TMPS=0
count_tmps() { local f=("$1"/.*.tmp); TMPS=${#f[@]}; }  # files being written atomically (or left by a kill)
kill_it() { kill -KILL "$PID" 2>/dev/null || true; }
launch() {  # launch DIR LOG [--resume]
  "$PY" -m longtail train "$CONFIG" "${OVR[@]}" --out "$1" "${@:3}" >"$2.out" 2>"$2.err" &
  PID=$!
}
finish_attempt() { RC=0; { wait "$PID"; } 2>/dev/null || RC=$?; PID=; }

echo "kill_resume: $KILLS kills ($EARLY early), seed $SEED, $PY -m longtail train $CONFIG ${OVR[*]} --out DIR --resume" \
     "(OMP_NUM_THREADS=$OMP_NUM_THREADS)"

# ------------------------------------------------------------------ 1. the reference, timed
REF=$OUT/reference
now_ms; T0=$NOW
launch "$REF" "$OUT/logs/reference"
T_FIRST= SEEN=0
: >"$OUT/logs/reference.times"
while alive "$PID"; do
  now_ms
  [ -z "$T_FIRST" ] && [ -e "$REF/checkpoint.pt" ] && T_FIRST=$((NOW - T0))
  read_log "$OUT/logs/reference.out"
  for ((i = SEEN; i < ${#LINES[@]}; i++)); do printf '%s\t%s\n' "$NOW" "${LINES[i]}"; done >>"$OUT/logs/reference.times"
  SEEN=${#LINES[@]}
  nap_ms 20
done
finish_attempt
now_ms; D=$((NOW - T0))
if ((RC != 0)) || [ ! -e "$REF/results.json" ]; then
  tail -n 5 "$OUT/logs/reference.err" >&2
  die "the reference run failed (exit $RC); its log: $OUT/logs/reference.err"
fi
T_FIRST=${T_FIRST:-$((D / 4))}
{ read -r STEP_MS EVAL_MS; while IFS=$'\t' read -r key ms; do TAIL_OF[$key]=$ms; done; } \
  < <("$PY" -c "$TIMING_PY" "$OUT/logs/reference.times")
secs $D; d_s=$SECS; secs $T_FIRST; f_s=$SECS; secs $EVAL_MS
echo "reference: $d_s s; first checkpoint.pt after $f_s s; ~$STEP_MS ms per step; evaluation ~$SECS s per epoch"

# ------------------------------------------------------------------ 2. kill, resume, repeat
KILLED=0 ROUND=0 ATTEMPTS=0
FAIL=() RUNS=()
: >"$OUT/kills.tsv"
while ((KILLED < KILLS || ROUND == 0)) && ((${#FAIL[@]} == 0)); do
  ROUND=$((ROUND + 1))
  DIR=$OUT/killed-$ROUND
  RUNS+=("$DIR")
  ATTEMPT=0
  while :; do
    ATTEMPT=$((ATTEMPT + 1)) ATTEMPTS=$((ATTEMPTS + 1))
    if ((ATTEMPT > 10 * KILLS + 20)); then FAIL+=("round $ROUND: not finished after $ATTEMPT attempts"); break; fi
    LOG=$OUT/logs/r$ROUND-a$ATTEMPT
    now_ms; START=$NOW
    launch "$DIR" "$LOG" --resume
    KIND=none
    if ((KILLED < KILLS)); then
      if ((KILLED < EARLY)); then
        KIND=early; draw "$T_FIRST"; hold "$R" && kill_it
      else
        case $(((KILLED - EARLY) % 6)) in
          1) KIND=eval; draw "$D"
             if hold "$R"; then
               count_ends "$LOG.out"; seen=$ENDS
               while alive "$PID"; do count_ends "$LOG.out"; ((ENDS > seen)) && break; nap_ms 5; done
               draw $((EVAL_MS / 3)); hold $((TAIL + R)) && kill_it
             fi ;;
          3) KIND=record; draw "$D"
             if hold "$R"; then
               count_epochs "$LOG.out"; seen=$EPOCH_LINES
               while alive "$PID"; do count_epochs "$LOG.out"; ((EPOCH_LINES > seen)) && break; nap_ms 2; done
               kill_it
             fi ;;
          5) KIND=write; draw "$D"
             if hold "$R"; then
               count_tmps "$DIR"; seen=$TMPS
               while alive "$PID"; do count_tmps "$DIR"; ((TMPS > seen)) && break; nap_ms 2; done
               kill_it
             fi ;;
          *) KIND=uniform; draw "$D"; hold "$R" && kill_it ;;
        esac
      fi
    fi
    finish_attempt
    now_ms; secs $((NOW - START))
    if ((RC == 137)); then
      KILLED=$((KILLED + 1))
      SNAP=$OUT/kills/$(printf %02d "$KILLED")
      mkdir -p "$SNAP"
      ls -A1 "$DIR" >"$SNAP/listing" 2>/dev/null || : >"$SNAP/listing"
      for f in checkpoint.pt best.pt; do  # a hard link keeps this version: later writes replace, not modify
        [ -e "$DIR/$f" ] && { ln "$DIR/$f" "$SNAP/$f" 2>/dev/null || cp "$DIR/$f" "$SNAP/$f" || true; }
      done
      [ -e "$DIR/metrics.jsonl" ] && cp "$DIR/metrics.jsonl" "$SNAP/"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$KILLED" "$ROUND" "$ATTEMPT" "$KIND" "$SECS" "$SNAP" "$LOG" >>"$OUT/kills.tsv"
      echo "round $ROUND attempt $ATTEMPT: killed after $SECS s ($KIND) - kill $KILLED of $KILLS"
    elif ((RC == 0)) && [ -e "$DIR/results.json" ]; then
      echo "round $ROUND attempt $ATTEMPT: finished after $SECS s$([ "$KIND" != none ] && echo " (its $KIND kill came too late)")"
      break
    else
      FAIL+=("round $ROUND attempt $ATTEMPT: the resume exited with $RC; $LOG.err ends: $(tail -n 3 "$LOG.err" | tr '\r\n' '  ' | tail -c 400)")
      break
    fi
  done
done

# ------------------------------------------------------------------ 3. a finished run is left alone; compare
if ((${#FAIL[@]} == 0)); then
  LOG=$OUT/logs/r$ROUND-finished
  # .lock is the directory's lock, not a file of the run: every command that takes it writes its pid there.
  before=$(cd "$DIR" && find . -type f ! -name .lock -print0 | sort -z | xargs -0 sha256sum)
  launch "$DIR" "$LOG" --resume
  finish_attempt
  after=$(cd "$DIR" && find . -type f ! -name .lock -print0 | sort -z | xargs -0 sha256sum)
  if ((RC != 0)) || ! grep -q "already finished" "$LOG.out"; then
    FAIL+=("rerun of the finished $DIR: exit $RC, no 'already finished' line (see $LOG.out)")
  elif [ "$before" != "$after" ]; then
    FAIL+=("rerun of the finished $DIR rewrote: $(diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print $3}' | tr '\n' ' ')")
  else
    echo "rerun of the finished run: 'already finished', exit 0, nothing rewritten"
  fi
fi
SAME=yes
KR_KILLS=$OUT/kills.tsv "$PY" -c "$COMPARE_PY" "$REF" "${RUNS[@]}" || SAME=no
for f in "${FAIL[@]}"; do echo "FAILED: $f"; SAME=no; done
echo "$KILLED kills survived, identical: $SAME"
[ "$SAME" = yes ]
