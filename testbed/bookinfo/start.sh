#!/bin/sh
# Entry point (PID 1) of every bookinfo pod. Environment: SERVICE (productpage | details |
# reviews | ratings), VERSION, PORT, the upstreams as ip:port (DETAILS, REVIEWS = a
# space-separated list, RATINGS) and, for a pod that must prove its very first connection
# was captured, STARTUP_CALL (a URL without scheme, fetched once before serving).
echo "$SERVICE-$VERSION ($HOSTNAME) starting on :$PORT"
if [ -n "$STARTUP_CALL" ]; then
  if body=$(timeout 5 wget -qO- "http://$STARTUP_CALL" 2>&1); then
    echo "first connection: GET http://$STARTUP_CALL -> $body"
  else
    echo "first connection: GET http://$STARTUP_CALL failed: $body"
  fi
fi
# -ll: keep listening, one forked handler per connection.
nc -ll -p "$PORT" -e "$(dirname "$0")/serve.sh" &
pid=$!
trap 'kill $pid 2>/dev/null; exit 0' TERM INT
wait $pid
