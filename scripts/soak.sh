#!/usr/bin/env bash
# Soak test (not run by CI): edge daemon + backend agent + mosquitto on loopback for
# SOAK_MINUTES (default 30). The broker is restarted every 2 minutes; every 5 minutes a burst
# of 200 messages (junk, and replays of a real envelope) hits the camera's inference topic.
# At the end: RSS of daemon and agent at start and end, the daemon's and the agent's
# counters, and whether every frame and every result is accounted for.
#
#   SOAK_MINUTES=30 scripts/soak.sh
#
# Environment: SOAK_MINUTES (30), SOAK_PRESET (fast), SOAK_CHANNELS (the preset's; 1 makes
# frames ~4x cheaper), SOAK_BROKER_SIGNAL (TERM: mosquitto saves its sessions; KILL also loses
# what the broker held in memory, which is the broker's loss, not fhecam's), SOAK_DIR (a
# temporary directory, removed unless given), FHECAM_BIN (a built binary instead of
# `cargo build --release`), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES="${SOAK_MINUTES:-30}"
PRESET="${SOAK_PRESET:-fast}"
BROKER_SIGNAL="${SOAK_BROKER_SIGNAL:-TERM}"
TARGET="${CARGO_TARGET_DIR:-target}"
DEV=soak
CAM=cam0

for tool in mosquitto mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is missing (apt-get install mosquitto mosquitto-clients python3)" >&2; exit 1; }
done

if [[ -n "${SOAK_DIR:-}" ]]; then
    WORK="$SOAK_DIR"
    mkdir -p "$WORK"
    KEEP=1
else
    WORK="$(mktemp -d /tmp/fhecam-soak.XXXXXX)"
    KEEP=0
fi
# a private copy: a shared CARGO_TARGET_DIR's release/fhecam may be rebuilt from another
# checkout while the soak runs
if [[ -n "${FHECAM_BIN:-}" ]]; then
    cp "$FHECAM_BIN" "$WORK/fhecam"
else
    cargo build --release --locked --bin fhecam
    cp "$TARGET/release/fhecam" "$WORK/fhecam"
fi
FHECAM="$WORK/fhecam"
PIDS=()
BROKER_PID=""
cleanup() {
    local pid
    for pid in ${PIDS[@]+"${PIDS[@]}"} $BROKER_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    # whatever ignored SIGTERM (a hung process) does not keep the soak from ending
    for pid in ${PIDS[@]+"${PIDS[@]}"} $BROKER_PID; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if ((KEEP == 0)); then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[soak $(date +%T)] $*"; }

# ---- owner: model, keys, protected model, bundle (as in `fhecam demo`) ----
PASS_FILE="$WORK/passphrase"
(umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$PASS_FILE")
train_args=(train --preset "$PRESET" --out "$WORK/model.json")
if [[ -n "${SOAK_CHANNELS:-}" ]]; then train_args+=(--channels "$SOAK_CHANNELS"); fi
log "training the $PRESET model"
"$FHECAM" "${train_args[@]}" >"$WORK/train.log"
"$FHECAM" owner-key init --out "$WORK/keys" >/dev/null
MODEL_ID="$("$FHECAM" protect "$WORK/model.json" --db "$WORK/owner.db" --name soak \
    --passphrase-file "$PASS_FILE" | tail -n 1 | tr -d '[:space:]')"
"$FHECAM" deploy --db "$WORK/owner.db" --model "$MODEL_ID" \
    --signing-key "$WORK/keys/owner.key" --out "$WORK/model.bundle" >/dev/null
log "model $MODEL_ID deployed"

# ---- broker ----
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$WORK/mosquitto"
# started as root, mosquitto drops to its own user: it must be able to save its sessions
if [[ $EUID -eq 0 ]] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$WORK/mosquitto"; fi
cat >"$WORK/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $WORK/mosquitto/
EOF
start_broker() {
    mosquitto -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
    BROKER_PID=$!
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "soak: mosquitto did not start" >&2
    exit 1
}
stop_broker() {
    kill "-$BROKER_SIGNAL" "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
}
start_broker

# ---- daemon and agent configs ----
cat >"$WORK/edge.toml" <<EOF
device_id = "$DEV"
camera_id = "$CAM"
bundle = "$WORK/model.bundle"
owner_key = "$WORK/keys/owner.pub"
[source]
pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=32,height=32,framerate=2/1 ! videoconvert ! appsink"
[mqtt]
host = "127.0.0.1"
port = $PORT
keep_alive_s = 10
stats_interval_s = 10.0
reconnect_backoff_initial_s = 0.5
reconnect_backoff_max_s = 5.0
[outbox]
dir = "$WORK/outbox"
EOF
cat >"$WORK/backend.toml" <<EOF
db = "$WORK/owner.db"
state_db = "$WORK/agent-state.db"
[mqtt]
host = "127.0.0.1"
port = $PORT
client_id = "soak-agent"
keep_alive_s = 10
reconnect_backoff_initial_s = 0.5
reconnect_backoff_max_s = 5.0
EOF
# the passphrase as systemd/fhecam-agent.service hands it over
export FHECAM_PASSPHRASE_FILE="$PASS_FILE"
"$FHECAM" validate --config "$WORK/edge.toml"
"$FHECAM" agent --config "$WORK/backend.toml" --check

# results and counters, on persistent sessions that survive the broker restarts
mosquitto_sub -h 127.0.0.1 -p "$PORT" -i soak-cockpit -c -q 1 -t "cockpit/$DEV/#" \
    >"$WORK/cockpit.jsonl" 2>/dev/null &
PIDS+=($!)
mosquitto_sub -h 127.0.0.1 -p "$PORT" -i soak-stats -c -q 1 -t "fhecam/$DEV/$CAM/stats" \
    >"$WORK/stats.jsonl" 2>/dev/null &
PIDS+=($!)
# one real envelope, replayed in the bursts
mosquitto_sub -h 127.0.0.1 -p "$PORT" -i soak-capture -c -q 1 -C 1 -N \
    -t "fhecam/$DEV/$CAM/inference" >"$WORK/valid.env" 2>/dev/null &
PIDS+=($!)

RUST_LOG=info "$FHECAM" agent --config "$WORK/backend.toml" \
    >"$WORK/agent.out" 2>"$WORK/agent.log" &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
RUST_LOG=info "$FHECAM" run --config "$WORK/edge.toml" \
    >"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
PIDS+=("$DAEMON_PID")

# SIGTERM, then up to $2 s for the exit; a process still there has hung: SIGKILL, say so
stop_within() {
    local pid=$1 limit=$2 name=$3 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "soak: $name still running ${limit} s after SIGTERM: hung, killed" >&2
        kill -KILL "$pid" 2>/dev/null || true
        HUNG="$HUNG $name"
    fi
    wait "$pid" || echo "soak: $name exited with status $?" >&2
}
HUNG=""

rss() { awk '/^VmRSS/ {print $2 " " $3}' "/proc/$1/status" 2>/dev/null || echo "gone"; }
alive() {
    kill -0 "$DAEMON_PID" 2>/dev/null || { echo "soak: the daemon died, see $WORK/daemon.log" >&2; KEEP=1; exit 1; }
    kill -0 "$AGENT_PID" 2>/dev/null || { echo "soak: the agent died, see $WORK/agent.log" >&2; KEEP=1; exit 1; }
}

# start: once the daemon is ready (key loaded, pipeline playing, broker connected)
for _ in $(seq 600); do
    grep -qs "ready:" "$WORK/daemon.log" && break
    alive
    sleep 0.5
done
grep -q "ready:" "$WORK/daemon.log" || { echo "soak: the daemon never got ready" >&2; exit 1; }
DAEMON_RSS0="$(rss "$DAEMON_PID")"
AGENT_RSS0="$(rss "$AGENT_PID")"
log "running for $MINUTES min (broker $PORT, work $WORK)"

burst() {
    local i
    for i in $(seq 100); do echo "junk $i $RANDOM"; done |
        mosquitto_pub -h 127.0.0.1 -p "$PORT" -q 1 -t "fhecam/$DEV/$CAM/inference" -l
    # replays of a real envelope: duplicates for the agent (junk until one was captured)
    for i in $(seq 100); do
        if [[ -s "$WORK/valid.env" ]]; then
            mosquitto_pub -h 127.0.0.1 -p "$PORT" -q 1 -t "fhecam/$DEV/$CAM/inference" -f "$WORK/valid.env"
        else
            mosquitto_pub -h 127.0.0.1 -p "$PORT" -q 1 -t "fhecam/$DEV/$CAM/inference" -m "junk $i"
        fi
    done
    BURSTS=$((BURSTS + 200))
}

BURSTS=0
RESTARTS=0
START=$SECONDS
END=$((START + MINUTES * 60))
next_restart=$((START + 120))
next_burst=$((START + 300))
while ((SECONDS < END)); do
    sleep 1
    alive
    if ((SECONDS >= next_restart)); then
        log "broker: SIG$BROKER_SIGNAL and restart"
        stop_broker
        sleep 3
        start_broker
        RESTARTS=$((RESTARTS + 1))
        next_restart=$((next_restart + 120))
    fi
    if ((SECONDS >= next_burst)); then
        log "burst of 200 messages on fhecam/$DEV/$CAM/inference"
        burst || log "burst: a publish failed"
        next_burst=$((next_burst + 300))
    fi
done

DAEMON_RSS1="$(rss "$DAEMON_PID")"
AGENT_RSS1="$(rss "$AGENT_PID")"
log "stopping the daemon (SIGTERM drains the running frame)"
# the drain may take a frame's time; the deadline is logged
stop_within "$DAEMON_PID" 600 daemon
PUBLISHED="$(python3 -c 'import json,sys; l=[x for x in open(sys.argv[1]) if x.strip()]; print(json.loads(l[-1])["published"] if l else 0)' "$WORK/daemon.out")"
# let the agent catch up with everything published (at most 2 minutes), then stop it
deadline=$((SECONDS + 120))
while ((SECONDS < deadline)); do
    got="$(python3 -c 'import json,sys; print(len({json.loads(l)["sequence"] for l in open(sys.argv[1]) if l.strip()}))' "$WORK/cockpit.jsonl")"
    ((got >= PUBLISHED)) && break
    sleep 1
done
stop_within "$AGENT_PID" 30 agent

echo
echo "==== soak: $MINUTES min, $RESTARTS broker restarts (SIG$BROKER_SIGNAL), $BURSTS burst messages ===="
echo "daemon RSS: start $DAEMON_RSS0, end $DAEMON_RSS1"
echo "agent  RSS: start $AGENT_RSS0, end $AGENT_RSS1"
if [[ -n "$HUNG" ]]; then echo "HUNG on SIGTERM:$HUNG"; fi
python3 - "$WORK" <<'EOF' || { KEEP=1; echo "MISMATCH; logs kept in $WORK"; exit 1; }
import json, sys
work = sys.argv[1]
def last(path):
    lines = [l for l in open(path) if l.strip()]
    return json.loads(lines[-1]) if lines else None
d = last(f"{work}/daemon.out")  # final counters, after the drain
a = last(f"{work}/agent.out")
if a is None:
    a = {"received": None, "decrypted": None, "duplicates": None, "dead_lettered": None}
    print("agent: no counters (it did not exit cleanly)")
stats_msgs = [l for l in open(f"{work}/stats.jsonl") if l.strip()]
print(f"daemon stats topic: {len(stats_msgs)} messages, last published={json.loads(stats_msgs[-1])['published'] if stats_msgs else '-'}")
print("daemon:", json.dumps(d))
print("agent: ", json.dumps(a))
dropped = sum(d[k] for k in ("frames_bad", "frames_dropped_preprocess", "frames_skipped_interval",
                             "frames_skipped_static", "frames_dropped_busy", "preprocess_errors",
                             "infer_errors", "outbox_dropped"))
frames_in = d["frames_captured"]
ok1 = frames_in == d["published"] + dropped + d["outbox_pending"]
print(f"frames in {frames_in} == published {d['published']} + dropped {dropped} + pending {d['outbox_pending']}: {'OK' if ok1 else 'MISMATCH'}")
seqs = {json.loads(l)["sequence"] for l in open(f"{work}/cockpit.jsonl") if l.strip()}
ok2 = len(seqs) == d["published"] and a["decrypted"] in (None, d["published"])
print(f"results out {len(seqs)} (agent decrypted {a['decrypted']}) == published {d['published']}: {'OK' if ok2 else 'MISMATCH'}")
sys.exit(0 if ok1 and ok2 else 1)
EOF
if [[ -n "$HUNG" ]]; then KEEP=1; echo "logs kept in $WORK"; exit 1; fi
