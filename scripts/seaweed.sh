#!/usr/bin/env bash
# Start/stop a single-node SeaweedFS (master + volume + filer + S3 gateway) on loopback only.
#
#   scripts/seaweed.sh start DIR PORT    # S3 endpoint: http://127.0.0.1:PORT
#   scripts/seaweed.sh stop  DIR [PORT]
#   scripts/seaweed.sh status DIR [PORT]
#
# S3 auth: one static identity, access key "test" / secret key "test" (admin), written to
# DIR/s3.json. Use region us-east-1 and path-style addressing.
#
# Ports (all bound to 127.0.0.1; PORT must be <= 65528):
#   PORT   S3 http      PORT+1 S3 grpc
#   PORT+2 master http  PORT+3 master grpc
#   PORT+4 volume http  PORT+5 volume grpc
#   PORT+6 filer http   PORT+7 filer grpc
# The Iceberg/Lance side ports of the S3 gateway are disabled and telemetry is off.
# Data, logs (DIR/weed.log) and the pid file (DIR/weed.pid) live under DIR. weed also creates
# /tmp/seaweedfs-*-grpc-<port>.sock for its gRPC ports; `stop` removes them.
#
# The weed binary comes from $WEED, else ${EMBER_CACHE:-$HOME/.cache/ember}/peers/seaweedfs/bin/weed
# (installed by scripts/install-peers.sh), else `weed` on PATH.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR [PORT]  (PORT required for start)" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
CMD=$1
DIR=$2
PORT=${3:-}
PIDFILE="$DIR/weed.pid"
LOG="$DIR/weed.log"

find_weed() {
  if [[ -n "${WEED:-}" ]]; then echo "$WEED"; return; fi
  local cached="${EMBER_CACHE:-$HOME/.cache/ember}/peers/seaweedfs/bin/weed"
  if [[ -x "$cached" ]]; then echo "$cached"; return; fi
  command -v weed || { echo "weed not found; run scripts/install-peers.sh" >&2; exit 1; }
}

alive() { # a zombie (exited, not yet reaped by its new parent) counts as dead
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z ]]
}

running_pid() { # prints the pid if the pid file names a live weed process
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid=$(<"$PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" &&
    grep -qa weed "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

s3_answers() { # any HTTP status from the S3 port counts as "up"
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$PORT/" || true)
  [[ -n "$code" && "$code" != 000 ]]
}

volume_ready() { # the master knows a volume server with free slots
  curl -s --max-time 2 "http://127.0.0.1:$((PORT + 2))/dir/status" 2>/dev/null |
    grep -q '"Url"'
}

start() {
  [[ -n "$PORT" && "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1024 && "$PORT" -le 65528 ]] ||
    { echo "PORT must be a number in 1024..65528" >&2; exit 2; }
  mkdir -p "$DIR/data"
  DIR=$(cd "$DIR" && pwd)
  PIDFILE="$DIR/weed.pid"
  LOG="$DIR/weed.log"
  local pid weed
  if pid=$(running_pid); then
    echo "seaweedfs already running (pid $pid), S3 at http://127.0.0.1:$PORT"
    return 0
  fi
  weed=$(find_weed)
  cat >"$DIR/s3.json" <<'EOF'
{
  "identities": [
    {
      "name": "test",
      "credentials": [{ "accessKey": "test", "secretKey": "test" }],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
  # setsid: own process group, survives the calling shell; stop kills the whole group.
  setsid "$weed" server \
    -dir="$DIR/data" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port=$((PORT + 2)) -master.port.grpc=$((PORT + 3)) \
    -master.volumeSizeLimitMB=1024 -master.telemetry=false -master.electionTimeout=1s \
    -volume.port=$((PORT + 4)) -volume.port.grpc=$((PORT + 5)) -volume.max=0 -volume.preStopSeconds=0 \
    -filer -filer.port=$((PORT + 6)) -filer.port.grpc=$((PORT + 7)) \
    -filer.localSocket="$DIR/filer.sock" \
    -s3 -s3.port="$PORT" -s3.port.grpc=$((PORT + 1)) -s3.ip.bind=127.0.0.1 \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.localSocket="$DIR/s3.sock" \
    -s3.config="$DIR/s3.json" \
    </dev/null >"$LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE"
  echo "$PORT" >"$DIR/weed.port"
  for _ in $(seq 1 120); do
    if ! alive "$pid"; then
      echo "weed exited during startup; last log lines:" >&2
      tail -n 20 "$LOG" >&2
      rm -f "$PIDFILE"
      exit 1
    fi
    if s3_answers && volume_ready; then
      echo "seaweedfs started (pid $pid), S3 at http://127.0.0.1:$PORT (keys test/test), log $LOG"
      return 0
    fi
    sleep 0.5
  done
  echo "S3 endpoint did not come up within 60 s; see $LOG" >&2
  stop
  exit 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$PIDFILE"
    echo "seaweedfs not running"
    return 0
  fi
  # weed's graceful shutdown can hang ~10 s in its gRPC stop; give it 3 s, then SIGKILL
  # (writes acknowledged over S3 survive a restart either way).
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 12); do
    alive "$pid" || break
    sleep 0.25
  done
  if alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  # weed leaves unix sockets named after its gRPC ports in /tmp; remove ours.
  local port=${PORT:-$(cat "$DIR/weed.port" 2>/dev/null || true)}
  if [[ "$port" =~ ^[0-9]+$ ]]; then
    for p in $((port + 1)) $((port + 3)) $((port + 5)) $((port + 7)); do
      rm -f /tmp/seaweedfs-*-grpc-"$p".sock
    done
  fi
  echo "seaweedfs stopped (pid $pid)"
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status)
    if pid=$(running_pid); then echo "running (pid $pid)"; else echo "not running"; exit 1; fi ;;
  *) usage ;;
esac
