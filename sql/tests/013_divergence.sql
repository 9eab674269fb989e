-- 013_divergence.sql: G8, cursors that name events (V4__divergence.sql).
--
-- Checks that relay.scope_head reports the latest event's capture time;
-- that relay.read_frames_checked(scope, seq, time) returns exactly what
-- relay.read_frames(scope, seq) returns when the log holds the event
-- (seq, time), and otherwise one row (seq and NULLs) and nothing
-- else: a time off by one microsecond, a seq beyond the latest, and a
-- history whose tail was replaced (a failover that lost commits, simulated
-- by deleting the tail and winding the counter back) are all disowned;
-- that a cursor without a time, at seq 0, or in trimmed history is taken on
-- trust; and that relay.read_frames_checked_many answers per scope in one call.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 013_divergence.sql postgresql://...
-- Everything is done in one transaction that is rolled back.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.a', 'sqltest-' || gen_random_uuid(), false) AS a,
       set_config('sqltest.b', 'sqltest-' || gen_random_uuid(), false) AS b \gset

BEGIN;

-- append(scope, n): n events in the scope, through relay.append.
CREATE FUNCTION pg_temp.append(p_scope text, p_n int) RETURNS void
LANGUAGE sql AS $$
    SELECT relay.append('sqltest_thing', 'INSERT', 'scope', 'id',
                        ARRAY(SELECT jsonb_build_object('scope', p_scope, 'id', g)
                              FROM generate_series(1, p_n) g))
$$;

-- at(scope, seq): the capture time of an event.
CREATE FUNCTION pg_temp.at(p_scope text, p_seq bigint) RETURNS timestamptz
LANGUAGE sql AS $$
    SELECT created_at FROM relay.events WHERE scope = p_scope AND seq = p_seq
$$;

-- after(scope, seq, time): the seqs read_frames_checked returns, with -seq
-- for the row that disowns the cursor.
CREATE FUNCTION pg_temp.after(p_scope text, p_seq bigint, p_time timestamptz) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(CASE WHEN frame IS NULL THEN -seq ELSE seq END ORDER BY seq), '{}')
    FROM relay.read_frames_checked(p_scope, p_seq, p_time)
$$;

DO $$
DECLARE
    a text := current_setting('sqltest.a');
    b text := current_setting('sqltest.b');
    t3 timestamptz;
    t5 timestamptz;
    got bigint[];
    per_scope text[];
    head record;
    same boolean;
BEGIN
    PERFORM pg_temp.append(a, 5);
    t3 := pg_temp.at(a, 3);
    t5 := pg_temp.at(a, 5);

    SELECT * INTO head FROM relay.scope_head(a);
    ASSERT head.latest_seq = 5 AND head.trimmed_through = 0 AND head.latest_time = t5,
        format('scope_head: %s', head);
    SELECT * INTO head FROM relay.scope_head('sqltest-nothing-' || gen_random_uuid());
    ASSERT head.latest_seq = 0 AND head.latest_time IS NULL, format('empty scope_head: %s', head);

    -- The log holds (3, t3): the same frames as read_frames, bytes and all.
    SELECT NOT EXISTS (
        (SELECT * FROM relay.read_frames_checked(a, 3, t3)
         EXCEPT ALL SELECT * FROM relay.read_frames(a, 3))
        UNION ALL
        (SELECT * FROM relay.read_frames(a, 3)
         EXCEPT ALL SELECT * FROM relay.read_frames_checked(a, 3, t3)))
    INTO same;
    ASSERT same, 'read_frames_checked differs from read_frames on a held cursor';
    got := pg_temp.after(a, 3, t3);
    ASSERT got = '{4,5}', format('held cursor: %s', got);
    got := pg_temp.after(a, 5, t5);
    ASSERT got = '{}', format('cursor at the latest event: %s', got);

    -- Disowned: another time, a seq beyond the latest.
    got := pg_temp.after(a, 3, t3 + interval '1 microsecond');
    ASSERT got = '{-3}', format('a time off by 1 us: %s', got);
    got := pg_temp.after(a, 7, t5);
    ASSERT got = '{-7}', format('a seq beyond the latest: %s', got);

    -- Taken on trust: no time, seq 0.
    got := pg_temp.after(a, 3, NULL);
    ASSERT got = '{4,5}', format('no time: %s', got);
    got := pg_temp.after(a, 0, t5);
    ASSERT got = '{1,2,3,4,5}', format('seq 0: %s', got);

    -- Several scopes at once: b's cursor is disowned, a's is held.
    PERFORM pg_temp.append(b, 2);
    SELECT array_agg(scope || ':' || CASE WHEN frame IS NULL THEN -seq ELSE seq END
                     ORDER BY scope, seq)
    INTO per_scope
    FROM relay.read_frames_checked_many(ARRAY[a, b], ARRAY[4, 1]::bigint[],
                                    ARRAY[pg_temp.at(a, 4), t5]);
    ASSERT cardinality(per_scope) = 2 AND per_scope @> ARRAY[a || ':5', b || ':-1'],
        format('read_frames_checked_many: %s', per_scope);

    -- A lost tail: 4 and 5 vanish, the counter goes back to 3 (what a
    -- standby that lacked the last commits holds), and new events take 4
    -- and 5 again.
    DELETE FROM relay.events WHERE scope = a AND seq > 3;
    UPDATE relay.scope_counter SET last_seq = 3 WHERE scope = a;
    PERFORM pg_sleep(0.001);
    PERFORM pg_temp.append(a, 2);
    got := pg_temp.after(a, 5, t5);
    ASSERT got = '{-5}', format('a cursor at a lost event: %s', got);
    got := pg_temp.after(a, 3, t3);
    ASSERT got = '{4,5}', format('a cursor before the loss: %s', got);
    ASSERT pg_temp.at(a, 5) <> t5, 'the new 5 is another event';

    -- Trimmed history is taken on trust: the reader sees the hole.
    DELETE FROM relay.events WHERE scope = a AND seq <= 3;
    INSERT INTO relay.trim_horizon (scope, trimmed_through) VALUES (a, 3);
    got := pg_temp.after(a, 2, t3);
    ASSERT got = '{4,5}', format('a cursor in trimmed history: %s', got);
END
$$;

ROLLBACK;
