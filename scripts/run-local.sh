#!/usr/bin/env bash
# `make run`: the handler on $LISTEN with embedded defaults, plus one local no-op scanner.
# Ctrl-C stops both.
set -euo pipefail
: "${LISTEN:=127.0.0.1:50051}" "${DATA_DIR:=.data}" "${BIN:=.venv/bin}"
mkdir -p "$DATA_DIR"

"$BIN/image-handler" serve --listen "$LISTEN" --data-dir "$DATA_DIR" --log-format console &
handler=$!
scanner=""
stop() {
  trap - EXIT INT TERM
  [ -n "$scanner" ] && kill -TERM "$scanner" 2>/dev/null || true
  kill -TERM "$handler" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

# Wait (up to 30 s) until the handler's health check answers SERVING.
for _ in $(seq 1 300); do
  if "$BIN/grpcurl" -plaintext -max-time 1 "$LISTEN" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
    break
  fi
  kill -0 "$handler" 2>/dev/null || { echo "image-handler did not start" >&2; exit 1; }
  sleep 0.1
done

# The no-op engine scans nothing: it reports an empty result after a delay, so a watch can
# see each status go by. Its logs go to a file to keep this terminal for the handler's events.
"$BIN/image-scanner" --handler "$LISTEN" --engine noop --slots 2 --delay 3 \
  --scanner-id local-noop-1 --log-format json 2>"$DATA_DIR/scanner.log" &
scanner=$!

# Every printed command names $LISTEN, so each works as pasted whatever address was chosen.
cat <<EOM

  image handler on $LISTEN, with one local no-op scanner (logs: $DATA_DIR/scanner.log)

  In another terminal (or export IHCTL_HANDLER=$LISTEN and leave out --handler):
    $BIN/ihctl --handler $LISTEN submit image --repository library/alpine --tag 3.20
    $BIN/ihctl --handler $LISTEN watch JOB_ID   # PENDING -> IN_PROGRESS -> PROCESSING_RESULTS -> FINISHED
    $BIN/ihctl --handler $LISTEN list
    $BIN/ihctl --handler $LISTEN scanners

  With grpcurl:
    $BIN/grpcurl -plaintext $LISTEN list
    $BIN/grpcurl -plaintext -d '{"object":{"image":{"repository":"library/alpine","tag":"3.20"}}}' \\
      $LISTEN imagehandler.v1.JobService/SubmitJob

  Another scanner:
    $BIN/image-scanner --handler $LISTEN --engine noop --slots 4 --scanner-id local-noop-2

  Ctrl-C stops the handler and the scanner.

EOM
wait "$handler"
