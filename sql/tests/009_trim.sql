-- 009_trim.sql: retention (relay.trim) and the trim horizon behind G3's
-- `reset` frame.
--
-- Checks that relay.trim(keep_min, min_age, batch), called until it returns
-- 0, deletes exactly the events that are both older than min_age and not
-- among the newest keep_min of their scope, oldest first, so that what is
-- left of each scope is a dense suffix; that relay.scope_state then reports
-- trimmed_through = the highest deleted seq (0 for an untouched scope) and an
-- unchanged latest_seq, and the next write still gets the next seq; that a
-- batch of 3 deletes at most 3 events per call, across scopes, and keeps
-- every scope a suffix after every call; that events younger than min_age
-- are kept even beyond keep_min; that keep_min 0 may empty a scope; and that
-- bad parameters raise 22023.
--
-- relay.trim works on every scope of the database. So that this test only
-- ever trims its own events, even on a database full of real data, it
-- backdates its own events by 1000 years (inside the rolled-back
-- transaction; inside one transaction now() is constant while created_at
-- comes from clock_timestamp(), so fresh events would not be "old" anyway)
-- and trims with min_age = 900 years, which no real event is old enough for.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 009_trim.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

-- Six fresh scopes: A and B are chat projects; C, D, E and F get events
-- through relay.append, the engine's API for events that are not row changes.
SELECT set_config('sqltest.a', 'sqltest-' || gen_random_uuid(), false) AS a,
       set_config('sqltest.b', 'sqltest-' || gen_random_uuid(), false) AS b,
       set_config('sqltest.c', 'sqltest-' || gen_random_uuid(), false) AS c,
       set_config('sqltest.d', 'sqltest-' || gen_random_uuid(), false) AS d,
       set_config('sqltest.e', 'sqltest-' || gen_random_uuid(), false) AS e,
       set_config('sqltest.f', 'sqltest-' || gen_random_uuid(), false) AS f \gset

BEGIN;

-- seqs(scope): the seqs held in the log for the scope, in order.
CREATE FUNCTION pg_temp.seqs(p_scope text) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(seq ORDER BY seq), '{}') FROM relay.events WHERE scope = p_scope
$$;

-- state(scope): relay.scope_state as an array (latest_seq, trimmed_through).
CREATE FUNCTION pg_temp.state(p_scope text) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT ARRAY[latest_seq, trimmed_through] FROM relay.scope_state(p_scope)
$$;

-- backdate(scope, from_seq, to_seq): make those events 1000 years old.
CREATE FUNCTION pg_temp.backdate(p_scope text, p_from bigint, p_to bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE relay.events SET created_at = created_at - interval '1000 years'
    WHERE scope = p_scope AND seq BETWEEN p_from AND p_to
$$;

-- append(scope, n): n events in the scope, through relay.append.
CREATE FUNCTION pg_temp.append(p_scope text, p_n int) RETURNS void
LANGUAGE sql AS $$
    SELECT relay.append('sqltest_thing', 'INSERT', 'scope', 'id',
                        ARRAY(SELECT jsonb_build_object('scope', p_scope, 'id', g, 'n', g)
                              FROM generate_series(1, p_n) g))
$$;

-- trim_all(keep_min, batch): relay.trim(keep_min, '900 years', batch) until
-- it returns 0; returns the total deleted. Each call must delete at most
-- batch events.
CREATE FUNCTION pg_temp.trim_all(p_keep_min int, p_batch int) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_n     bigint;
    v_total bigint := 0;
BEGIN
    FOR i IN 1..1000 LOOP
        v_n := relay.trim(p_keep_min, '900 years', p_batch);
        ASSERT v_n <= p_batch, format('relay.trim batch %s: expected at most %s deleted, found %s',
                                      p_batch, p_batch, v_n);
        IF v_n = 0 THEN
            RETURN v_total;
        END IF;
        v_total := v_total + v_n;
    END LOOP;
    RAISE EXCEPTION 'relay.trim: expected it to return 0 within 1000 calls';
END
$$;

----------------------------------------------------------------------------
-- keep_min 0 may empty a scope (F, 5 events); the seq goes on. This runs
-- first, while no other event of this test is old.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_f     text := current_setting('sqltest.f');
    v_total bigint;
BEGIN
    PERFORM pg_temp.append(v_f, 5);
    PERFORM pg_temp.backdate(v_f, 1, 5);
    v_total := pg_temp.trim_all(0, 1000);
    ASSERT v_total = 5, format('keep 0: expected 5 events trimmed (F 1..5), found %s', v_total);
    ASSERT pg_temp.seqs(v_f) = '{}' AND pg_temp.state(v_f) = ARRAY[5, 5]::bigint[],
        format('keep 0: expected F empty with scope_state (5, 5), found %s, %s',
               pg_temp.seqs(v_f), pg_temp.state(v_f));
    ASSERT NOT EXISTS (SELECT 1 FROM relay.frames_after(v_f, 0, 500)), 'keep 0: expected no frames for F';
    PERFORM pg_temp.append(v_f, 1);
    ASSERT pg_temp.seqs(v_f) = ARRAY[6]::bigint[],
        format('keep 0: expected the next event of F at seq 6, found %s', pg_temp.seqs(v_f));
END
$$;

----------------------------------------------------------------------------
-- A: 30 events, B: 5 events; keep 10, batch 1000.
----------------------------------------------------------------------------

INSERT INTO chat.projects (id, name) VALUES (:'a', 'sqltest trim A'), (:'b', 'sqltest trim B');  -- A1, B1
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'a', 'alice', 'owner'), (:'b', 'alice', 'owner');                                        -- A2, B2
INSERT INTO chat.messages (project_id, sender_id, body)
SELECT :'a', 'alice', 'a ' || g FROM generate_series(1, 28) g;                                    -- A3..A30
INSERT INTO chat.messages (project_id, sender_id, body)
SELECT :'b', 'alice', 'b ' || g FROM generate_series(1, 3) g;                                     -- B3..B5

DO $$
DECLARE
    v_a     text := current_setting('sqltest.a');
    v_b     text := current_setting('sqltest.b');
    v_total bigint;
BEGIN
    ASSERT pg_temp.seqs(v_a) = ARRAY(SELECT generate_series(1::bigint, 30)), 'fixture: expected A to hold 1..30';
    ASSERT pg_temp.seqs(v_b) = ARRAY(SELECT generate_series(1::bigint, 5)), 'fixture: expected B to hold 1..5';

    -- Fresh events are younger than min_age: nothing to do.
    v_total := pg_temp.trim_all(10, 1000);
    ASSERT v_total = 0, format('before backdating: expected nothing trimmed, found %s', v_total);

    PERFORM pg_temp.backdate(v_a, 1, 30);
    PERFORM pg_temp.backdate(v_b, 1, 5);

    v_total := pg_temp.trim_all(10, 1000);
    ASSERT v_total = 20, format('keep 10: expected 20 events trimmed (A 1..20), found %s', v_total);

    ASSERT pg_temp.seqs(v_a) = ARRAY(SELECT generate_series(21::bigint, 30)),
        format('keep 10: expected A to keep exactly 21..30, found %s', pg_temp.seqs(v_a));
    ASSERT pg_temp.state(v_a) = ARRAY[30, 20]::bigint[],
        format('keep 10: expected scope_state(A) = (30, 20), found %s', pg_temp.state(v_a));
    ASSERT pg_temp.seqs(v_b) = ARRAY(SELECT generate_series(1::bigint, 5)),
        format('keep 10: expected B to keep 1..5, found %s', pg_temp.seqs(v_b));
    ASSERT pg_temp.state(v_b) = ARRAY[5, 0]::bigint[],
        format('keep 10: expected scope_state(B) = (5, 0), found %s', pg_temp.state(v_b));

    -- A resuming client reads from 21 on; one that has seen only up to 5 can
    -- tell from trimmed_through (20 >= 6) that it missed history (reset).
    ASSERT (SELECT min(f.seq) FROM relay.frames_after(v_a, 5, 500) f) = 21,
        'after trim: expected frames_after(A, 5) to start at 21';
    ASSERT (SELECT count(*) FROM relay.frames_after(v_a, 0, 500)) = 10,
        'after trim: expected frames_after(A, 0) to return the 10 kept frames';
END
$$;

-- Writing after a trim continues the seq: 31, not 11 or 1.
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'after trim');

DO $$
DECLARE
    v_a     text := current_setting('sqltest.a');
    v_total bigint;
BEGIN
    ASSERT pg_temp.seqs(v_a) = ARRAY(SELECT generate_series(21::bigint, 31)),
        format('write after trim: expected A to hold 21..31, found %s', pg_temp.seqs(v_a));
    PERFORM pg_temp.backdate(v_a, 31, 31);
    v_total := pg_temp.trim_all(10, 1000);
    ASSERT v_total = 1, format('second trim: expected 1 event trimmed (A 21), found %s', v_total);
    ASSERT pg_temp.seqs(v_a) = ARRAY(SELECT generate_series(22::bigint, 31)),
        format('second trim: expected A to keep 22..31, found %s', pg_temp.seqs(v_a));
    ASSERT pg_temp.state(v_a) = ARRAY[31, 21]::bigint[],
        format('second trim: expected scope_state(A) = (31, 21), found %s', pg_temp.state(v_a));
END
$$;

----------------------------------------------------------------------------
-- Batch 3 over two scopes, C (30 events) and D (15): at most 3 per call,
-- progress on every call, each scope a dense suffix after every call.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_c     text := current_setting('sqltest.c');
    v_d     text := current_setting('sqltest.d');
    v_n     bigint;
    v_total bigint := 0;
    v_calls int := 0;
    v_scope text;
    v_seqs  bigint[];
    v_state bigint[];
BEGIN
    PERFORM pg_temp.append(v_c, 30);
    PERFORM pg_temp.append(v_d, 15);
    ASSERT pg_temp.seqs(v_c) = ARRAY(SELECT generate_series(1::bigint, 30))
           AND pg_temp.seqs(v_d) = ARRAY(SELECT generate_series(1::bigint, 15)),
        'fixture: expected C to hold 1..30 and D 1..15';
    PERFORM pg_temp.backdate(v_c, 1, 30);
    PERFORM pg_temp.backdate(v_d, 1, 15);

    LOOP
        v_n := relay.trim(10, '900 years', 3);
        v_calls := v_calls + 1;
        ASSERT v_calls <= 100, 'batch 3: expected relay.trim to reach 0';
        ASSERT v_n <= 3, format('batch 3, call %s: expected at most 3 deleted, found %s', v_calls, v_n);
        ASSERT v_n > 0 OR v_total = 25,
            format('batch 3, call %s: returned 0 after only %s of 25 trimmable events', v_calls, v_total);
        EXIT WHEN v_n = 0;
        v_total := v_total + v_n;

        -- After every call, each scope holds a dense suffix and its horizon
        -- is just below it.
        FOREACH v_scope IN ARRAY ARRAY[v_c, v_d] LOOP
            v_seqs := pg_temp.seqs(v_scope);
            v_state := pg_temp.state(v_scope);
            ASSERT v_seqs = ARRAY(SELECT generate_series(v_state[2] + 1, v_state[1])),
                format('batch 3, call %s: expected scope %s to hold %s..%s, found %s',
                       v_calls, v_scope, v_state[2] + 1, v_state[1], v_seqs);
        END LOOP;
    END LOOP;

    ASSERT v_total = 25, format('batch 3: expected 25 events trimmed (20 of C, 5 of D), found %s', v_total);
    ASSERT v_calls >= 10, format('batch 3: expected at least 9 deleting calls and a final 0, found %s calls', v_calls);
    ASSERT pg_temp.seqs(v_c) = ARRAY(SELECT generate_series(21::bigint, 30))
           AND pg_temp.state(v_c) = ARRAY[30, 20]::bigint[],
        format('batch 3: expected C to keep 21..30 with horizon 20, found %s, %s',
               pg_temp.seqs(v_c), pg_temp.state(v_c));
    ASSERT pg_temp.seqs(v_d) = ARRAY(SELECT generate_series(6::bigint, 15))
           AND pg_temp.state(v_d) = ARRAY[15, 5]::bigint[],
        format('batch 3: expected D to keep 6..15 with horizon 5, found %s, %s',
               pg_temp.seqs(v_d), pg_temp.state(v_d));
END
$$;

----------------------------------------------------------------------------
-- min_age protects young events even beyond keep_min; bad parameters are
-- refused.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_e     text := current_setting('sqltest.e');
    v_total bigint;
BEGIN
    -- E: 30 events, only 1..15 old. Keep 10 would allow 1..20, but 16..20
    -- are too young.
    PERFORM pg_temp.append(v_e, 30);
    PERFORM pg_temp.backdate(v_e, 1, 15);
    v_total := pg_temp.trim_all(10, 1000);
    ASSERT v_total = 15, format('min_age: expected 15 events trimmed (E 1..15), found %s', v_total);
    ASSERT pg_temp.seqs(v_e) = ARRAY(SELECT generate_series(16::bigint, 30))
           AND pg_temp.state(v_e) = ARRAY[30, 15]::bigint[],
        format('min_age: expected E to keep 16..30 with horizon 15, found %s, %s',
               pg_temp.seqs(v_e), pg_temp.state(v_e));

    -- The other scopes were left alone by these calls.
    ASSERT pg_temp.seqs(current_setting('sqltest.b')) = ARRAY(SELECT generate_series(1::bigint, 5)),
        'later trims: expected B to still hold 1..5';
END
$$;

-- keep_min < 0: 22023.
DO $$
BEGIN
    PERFORM relay.trim(-1, '900 years', 1000);
    RAISE EXCEPTION 'expected 22023 for relay.trim with keep_min -1, but it ran';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- batch < 1: 22023.
DO $$
BEGIN
    PERFORM relay.trim(10, '900 years', 0);
    RAISE EXCEPTION 'expected 22023 for relay.trim with batch 0, but it ran';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- min_age NULL: 22023.
DO $$
BEGIN
    PERFORM relay.trim(10, NULL, 1000);
    RAISE EXCEPTION 'expected 22023 for relay.trim with min_age NULL, but it ran';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- keep_min NULL: 22023.
DO $$
BEGIN
    PERFORM relay.trim(NULL, '900 years', 1000);
    RAISE EXCEPTION 'expected 22023 for relay.trim with keep_min NULL, but it ran';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

ROLLBACK;

-- After the rollback nothing of these scopes is left, not even a horizon.
DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.a'), current_setting('sqltest.b'),
                             current_setting('sqltest.c'), current_setting('sqltest.d'),
                             current_setting('sqltest.e'), current_setting('sqltest.f')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.trim_horizon WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %, found rows', v_scopes;
    END IF;
END
$$;
