#!/bin/sh
# (Debian's static busybox wget crashes with -T, hence `timeout 5 wget`.)
# One HTTP/1.1 exchange on stdin/stdout (started by `nc -ll -e` per connection).
# Paths as in Istio's bookinfo: /productpage, /details/0, /reviews/0, /ratings/0, /health.
cr=$(printf '\r')
read -r method path _ || exit 0
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
done

get() {  # upstream call; an unreachable upstream is reported in the body, not fatal
  timeout 5 wget -qO- "http://$1" 2>/dev/null || printf '{"error":"%s unavailable"}' "$1"
}

status="200 OK"
case "$SERVICE:$path" in
  *:/health)
    body="ok" ;;
  productpage:/productpage*)
    reviews=$(printf '%s\n' $REVIEWS | shuf -n 1)
    body="productpage-$VERSION: The Comedy of Errors
details: $(get "$DETAILS/details/0")
reviews: $(get "$reviews/reviews/0")" ;;
  details:/details/*)
    body='{"id":0,"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,"publisher":"PublisherA","language":"English","ISBN-10":"1234567890"}' ;;
  reviews:/reviews/*)
    rating=""
    [ -n "$RATINGS" ] && rating=",\"ratings\":$(get "$RATINGS/ratings/0")"
    body="{\"id\":\"0\",\"podname\":\"$HOSTNAME\",\"version\":\"$VERSION\"$rating,\"reviews\":[{\"reviewer\":\"Reviewer1\",\"text\":\"An extremely entertaining play by Shakespeare.\"},{\"reviewer\":\"Reviewer2\",\"text\":\"Absolutely fun and entertaining.\"}]}" ;;
  ratings:/ratings/*)
    body='{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}' ;;
  *)
    status="404 Not Found"
    body="no route for $path on $SERVICE-$VERSION" ;;
esac
printf 'HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s\n' \
  "$status" "$((${#body} + 1))" "$body"
