#!/usr/bin/env bash
# Where a captured insert's cost goes, counted in CPU instructions by
# callgrind: deterministic, so it is not at the mercy of this shared
# machine's noise the way wall-clock timings are.
#
# It makes a scratch cluster, installs sql/install.sql, then runs each
# case in single-user Postgres under valgrind: a DO loop of single-row
# inserts, one commit each, run twice (1 and 1,001 inserts) so that start-up
# cancels out. The breakdown cases are statement triggers with transition
# tables that repeat relay.capture's single-row steps one at a time; the
# last case is relay.capture itself. A second table compares the column
# modes of relay.enable (every column, deny-list, allow-list, id-only).
#
# Needs valgrind (apt-get install valgrind) and the Postgres server
# binaries; PGRELAY_PG_BIN or /usr/lib/postgresql/*/bin. About three minutes.
# Usage: bench/capture-profile.sh [output.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/capture-profile.md}
bin=${PGRELAY_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

work=$(mktemp -d /tmp/pgrelay-capture-profile.XXXXXX)
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
"${psql[@]}" -f sql/install.sql profile >/dev/null

# Cases: a table each. The step_* tables carry a statement trigger whose
# body is relay.capture's single-row path cut after a given step.
read_row="SELECT array_agg(to_jsonb(n)) INTO v_rows FROM relay_new_rows n;
    v_one := v_rows[1]; v_scope := v_one ->> TG_ARGV[1];"
counter="INSERT INTO relay.scope_counter AS c (scope, last_seq) VALUES (v_scope, 1)
    ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + 1 RETURNING c.last_seq INTO v_seq;"
event="INSERT INTO relay.events AS e (scope, seq, resource, action, row_id, data)
    VALUES (v_scope, v_seq, TG_ARGV[0], TG_OP, v_one ->> TG_ARGV[2], v_one)"
step() { # name body
    cat <<SQL
CREATE TABLE profile.$1 (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
CREATE FUNCTION profile.$1() RETURNS trigger LANGUAGE plpgsql AS \$\$
DECLARE v_rows jsonb[]; v_one jsonb; v_scope text; v_seq bigint; v_notice text; v_void text;
BEGIN
    $2
    RETURN NULL;
END \$\$;
CREATE TRIGGER $1 AFTER INSERT ON profile.$1 REFERENCING NEW TABLE AS relay_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profile.$1('row', 'project_id', 'id');
SQL
}
{
    echo "CREATE SCHEMA profile;"
    echo "CREATE TABLE profile.plain (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);"
    echo "CREATE TABLE profile.notify_only (LIKE profile.plain INCLUDING ALL);"
    echo "CREATE FUNCTION profile.notify_only() RETURNS trigger LANGUAGE plpgsql AS \$\$
          BEGIN PERFORM pg_notify('profile', json_build_object('id', NEW.id, 'project_id', NEW.project_id)::text);
          RETURN NULL; END \$\$;"
    echo "CREATE TRIGGER notify_only AFTER INSERT ON profile.notify_only FOR EACH ROW EXECUTE FUNCTION profile.notify_only();"
    step step_trigger "NULL;"
    step step_read_row "$read_row"
    step step_counter "$read_row $counter"
    step step_event "$read_row $counter $event;"
    step step_render "$read_row $counter $event RETURNING relay.render(e, false) INTO v_notice;"
    step step_notify "$read_row $counter $event RETURNING relay.render(e, false) INTO v_notice;
        v_void := pg_notify(relay.channel(), v_notice)::text;"
    echo "CREATE TABLE profile.captured (LIKE profile.plain INCLUDING ALL);"
    echo "SELECT relay.enable('profile.captured', 'row');"
    # The same trigger body run with the writer's rights, as before capture
    # became SECURITY DEFINER (V3): the price of "any writer, no forging".
    echo "DO \$\$ BEGIN EXECUTE format('CREATE FUNCTION profile.capture_invoker() RETURNS trigger LANGUAGE plpgsql AS %L',
          (SELECT prosrc FROM pg_proc WHERE oid = 'relay.capture()'::regprocedure)); END \$\$;"
    # The column modes of relay.enable (G10), on one table with a column
    # worth leaving out: every column (today), a deny-list, an allow-list
    # of the same columns, and id-only events.
    echo "CREATE TABLE profile.cols_all (LIKE profile.plain INCLUDING ALL, secret text NOT NULL DEFAULT repeat('s', 64));"
    echo "CREATE TABLE profile.cols_except (LIKE profile.cols_all INCLUDING ALL);"
    echo "CREATE TABLE profile.cols_only (LIKE profile.cols_all INCLUDING ALL);"
    echo "CREATE TABLE profile.cols_id_only (LIKE profile.cols_all INCLUDING ALL);"
    echo "SELECT relay.enable('profile.cols_all', 'row');"
    echo "SELECT relay.enable('profile.cols_except', 'row', p_exclude_columns => ARRAY['secret']);"
    echo "SELECT relay.enable('profile.cols_only', 'row', p_columns => ARRAY['body']);"
    echo "SELECT relay.enable('profile.cols_id_only', 'row', p_row_data => false);"
    echo "CREATE TABLE profile.captured_invoker (LIKE profile.plain INCLUDING ALL);"
    echo "CREATE TRIGGER captured_invoker AFTER INSERT ON profile.captured_invoker REFERENCING NEW TABLE AS relay_new_rows
          FOR EACH STATEMENT EXECUTE FUNCTION profile.capture_invoker('row', 'project_id', 'id');"
} | "${psql[@]}" -o /dev/null profile
"${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" stop >/dev/null

# Instructions for n single-row inserts into $1, after a warm-up of 50.
instructions() {
    local input="$work/in-$2.sql"
    {
        printf 'SET synchronous_commit = off;\n\n'
        printf "DO \$\$ BEGIN FOR i IN 1..50 LOOP INSERT INTO %s (project_id, body) VALUES ('p1', repeat('z', 150)); COMMIT; END LOOP; END \$\$;\n\n" "$1"
        printf "DO \$\$ BEGIN FOR i IN 1..%s LOOP INSERT INTO %s (project_id, body) VALUES ('p1', repeat('z', 150)); COMMIT; END LOOP; END \$\$;\n\n" "$2" "$1"
    } >"$input"
    chmod 644 "$input"
    "${as_pg[@]}" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$bin/postgres" --single -j -D "$work/data" profile <"$input" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
per_insert() {
    local one many
    one=$(instructions "$1" 1)
    many=$(instructions "$1" 1001)
    echo $(((many - one) / 1000))
}

plain=$(per_insert profile.plain)
{
    echo "### Instructions per single-row insert (callgrind, single-user Postgres)"
    echo
    echo "| case | instructions | x uncaptured | step adds |"
    echo "| --- | --- | --- | --- |"
    prev=$plain
    printf '| uncaptured insert | %s | 1.0 | |\n' "$plain"
    n=$(per_insert profile.notify_only)
    printf '| row trigger that only notifies (the floor of any NOTIFY design) | %s | %s | |\n' "$n" "$(ratio "$n" "$plain")"
    for s in "step_trigger:statement trigger with a transition table, empty" \
             "step_read_row:+ read the row as jsonb" \
             "step_counter:+ counter upsert" \
             "step_event:+ event insert" \
             "step_render:+ render the notice (relay.render)" \
             "step_notify:+ pg_notify"; do
        n=$(per_insert "profile.${s%%:*}")
        printf '| %s | %s | %s | %s |\n' "${s#*:}" "$n" "$(ratio "$n" "$plain")" "$((n - prev))"
        prev=$n
    done
    n=$(per_insert profile.captured_invoker)
    printf '| relay.capture body as the writer (SECURITY INVOKER, before V3) | %s | %s | |\n' "$n" "$(ratio "$n" "$plain")"
    invoker=$n
    n=$(per_insert profile.captured)
    printf '| relay.capture (the real trigger: SECURITY DEFINER, pinned search_path) | %s | %s | %s |\n' "$n" "$(ratio "$n" "$plain")" "$((n - invoker))"
    echo
    echo "### Instructions per single-row insert by column mode (relay.enable, G10)"
    echo
    echo "A table (id, project_id, body of 150 bytes, secret of 64 bytes), captured four ways."
    echo
    echo "| mode | instructions | vs every column |"
    echo "| --- | --- | --- |"
    all=$(per_insert profile.cols_all)
    printf '| every column (no choice, as before G10) | %s | |\n' "$all"
    for s in "cols_except:deny-list (p_exclude_columns => ARRAY['secret'])" \
             "cols_only:allow-list (p_columns => ARRAY['body'], with id and scope)" \
             "cols_id_only:id-only (p_row_data => false)"; do
        n=$(per_insert "profile.${s%%:*}")
        printf '| %s | %s | %+d |\n' "${s#*:}" "$n" "$((n - all))"
    done
    echo
    echo "Postgres $("$bin/postgres" --version | awk '{print $3}'), $(valgrind --version), command: bench/capture-profile.sh"
} | tee "$out"
