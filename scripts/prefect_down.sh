#!/usr/bin/env bash
# Stop what `make prefect-up` started: the serve process first, then the server.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE=${PREFECT_STATE:-.prefect-local}
stop() {  # stop NAME: SIGTERM the process group, wait up to 30 s, then SIGKILL
  local file="$STATE/$1.pid" pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$file"
}
stop serve
stop server
