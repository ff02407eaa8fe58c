#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1:$PREFECT_PORT and serve every deployment in the
# background; return once the deployments are registered. `make prefect-down` stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PREFECT_PORT:-4200}
STATE=${PREFECT_STATE:-.prefect-local}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
export PREFECT_HOME="$STATE/home" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_UI_API_URL="$PREFECT_API_URL"  # the UI's own calls (it would assume port 4200)
export NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled

if [ -f "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
  echo "a Prefect server is already running (pid $(cat "$STATE/server.pid"))"
else
  setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/server.pid"
fi
for _ in $(seq 1 120); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null && break
  kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null || { echo "the Prefect server exited:"; tail -20 "$STATE/server.log"; exit 1; }
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "the Prefect server did not answer in 120 s"; exit 1; }

if ! { [ -f "$STATE/serve.pid" ] && kill -0 "$(cat "$STATE/serve.pid")" 2>/dev/null; }; then
  setsid "$PY" -m flows.deployments >"$STATE/serve.log" 2>&1 &
  echo $! >"$STATE/serve.pid"
fi
for _ in $(seq 1 120); do
  if "$PY" -m flows.deployments --check 2>/dev/null; then
    echo "Prefect server and deployments are up. In your shell:"
    echo "  export PREFECT_API_URL=$PREFECT_API_URL"
    echo "  prefect deployment run build-corpus/default --watch"
    echo "UI: http://127.0.0.1:$PORT   stop with: make prefect-down"
    exit 0
  fi
  kill -0 "$(cat "$STATE/serve.pid")" 2>/dev/null || { echo "the serve process exited:"; tail -20 "$STATE/serve.log"; exit 1; }
  sleep 1
done
echo "deployments were not registered in 120 s; see $STATE/serve.log"; exit 1
