#!/usr/bin/env bash
# What checking a cursor (G8) costs a log read, counted in CPU instructions
# by callgrind (deterministic, unlike wall-clock timings on this shared
# machine): relay.read_frames_many (the read before V4) against
# relay.read_frames_checked_many (the read with the cursor's event checked),
# for a live read (one new event after the cursor) and a catch-up read (a
# batch of 500). Each read runs in a plpgsql loop with a generic plan, as
# the relay's pooled sessions run it, in single-user Postgres; each case
# runs twice (1 and 1,001 live reads, or 1 and 51 catch-up reads) so that
# start-up cancels out.
#
# Needs valgrind and the Postgres server binaries (PGRELAY_PG_BIN or
# /usr/lib/postgresql/*/bin). About two minutes.
# Usage: bench/read-profile.sh [output.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/read-profile.md}
bin=${PGRELAY_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

work=$(mktemp -d /tmp/pgrelay-read-profile.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$work"
    as_pg=(runuser -u postgres --)
fi
cleanup() {
    "${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"${as_pg[@]}" "$bin/initdb" -D "$work/data" -U postgres -A trust --locale=C.UTF-8 >/dev/null
"${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w \
    -o "-c listen_addresses= -k $work" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$work" -U postgres)
"${psql[@]}" -c "CREATE DATABASE profile" postgres
"${psql[@]}" -f sql/install.sql profile >/dev/null 2>&1
# 10,000 events of ~300-byte frames in one scope.
"${psql[@]}" -o /dev/null profile -c "SELECT relay.append('row', 'INSERT', 'scope', 'id',
    ARRAY(SELECT jsonb_build_object('scope', 's', 'id', g, 'body', repeat('y', 150))
          FROM generate_series(1, 10000) g))"
"${psql[@]}" profile -c "VACUUM ANALYZE relay.events"
"${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" stop >/dev/null

# Instructions for n reads of one case ($1: checked or not, $2: events per read).
instructions() {
    local checked=$1 batch=$2 n=$3 input="$work/in-$1-$2-$3.sql" read
    if [ "$checked" = yes ]; then
        read="SELECT sum(length(frame)) INTO v FROM relay.read_frames_checked_many(ARRAY['s'], ARRAY[k], ARRAY[t[k]], 500, 4194304)"
    else
        read="SELECT sum(length(frame)) INTO v FROM relay.read_frames_many(ARRAY['s'], ARRAY[k], 500, 4194304)"
    fi
    {
        printf 'SET plan_cache_mode = force_generic_plan;\nSET jit = off;\n\n'
        printf "DO \$\$ DECLARE v bigint; k bigint; t timestamptz[] := ARRAY(SELECT created_at FROM relay.events WHERE scope = 's' ORDER BY seq);
BEGIN FOR i IN 1..%s LOOP k := %s - (i %% 3); %s; END LOOP; END \$\$;\n\n" 50 $((10000 - batch)) "$read"
        printf "DO \$\$ DECLARE v bigint; k bigint; t timestamptz[] := ARRAY(SELECT created_at FROM relay.events WHERE scope = 's' ORDER BY seq);
BEGIN FOR i IN 1..%s LOOP k := %s - (i %% 3); %s; END LOOP; END \$\$;\n\n" "$n" $((10000 - batch)) "$read"
    } >"$input"
    chmod 644 "$input"
    "${as_pg[@]}" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$bin/postgres" --single -j -D "$work/data" profile <"$input" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per_read() { # checked batch reads
    local one many
    one=$(instructions "$1" "$2" 1)
    many=$(instructions "$1" "$2" $(($3 + 1)))
    echo $(((many - one) / $3))
}
{
    echo "### Instructions per log read (callgrind, single-user Postgres, generic plans)"
    echo
    echo "| read | relay.read_frames_many | relay.read_frames_checked_many | added by the check |"
    echo "| --- | --- | --- | --- |"
    for case in 1:1000 500:50; do
        batch=${case%%:*} reads=${case#*:}
        plain=$(per_read no "$batch" "$reads")
        checked=$(per_read yes "$batch" "$reads")
        awk -v b="$batch" -v p="$plain" -v c="$checked" 'BEGIN {
            printf "| %s event%s after the cursor | %d | %d | %d (%.1f%%) |\n", b, (b == 1 ? "" : "s"), p, c, c - p, (c - p) * 100 / p }'
    done
    echo
    echo "Postgres $("$bin/postgres" --version | awk '{print $3}'), $(valgrind --version), command: bench/read-profile.sh"
} | tee "$out"
