-- 002_rollback_and_scopes.sql: G1 (rollback yields nothing), G2 (dense
-- per-scope seqs) and the SQL side of G3 (resume reads).
--
-- Checks that two scopes (projects) written in interleaved order each get
-- their own seq 1, 2, 3, ... with no gaps, also when one statement touches
-- both; that work undone by ROLLBACK TO SAVEPOINT, or by a statement that
-- fails, leaves no event and no seq gap (the next committed write gets the
-- next seq, and chat message seqs are given back too), while a released
-- savepoint keeps its events; that relay.scope_state reports the latest seq
-- and (0, 0) for an unknown scope; and that relay.frames_after and
-- relay.frames_after_many return exactly the events after a seq, in order,
-- in batches of at most the limit.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 002_rollback_and_scopes.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

-- Two fresh scopes, A and B, as session settings (for DO blocks) and psql
-- variables (for plain statements).
SELECT set_config('sqltest.a', 'sqltest-' || gen_random_uuid(), false) AS a,
       set_config('sqltest.b', 'sqltest-' || gen_random_uuid(), false) AS b \gset

BEGIN;

-- expect_dense(scope, n): the scope holds exactly the events 1..n and
-- relay.scope_state reports latest_seq n.
CREATE FUNCTION pg_temp.expect_dense(p_scope text, p_n bigint, p_what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_seqs   bigint[];
    v_latest bigint;
BEGIN
    SELECT coalesce(array_agg(seq ORDER BY seq), '{}') INTO v_seqs FROM relay.events WHERE scope = p_scope;
    ASSERT v_seqs = ARRAY(SELECT generate_series(1, p_n)),
        format('%s: expected seqs 1..%s in scope %s, found %s', p_what, p_n, p_scope, v_seqs);
    SELECT latest_seq INTO v_latest FROM relay.scope_state(p_scope);
    ASSERT v_latest = p_n,
        format('%s: expected scope_state latest_seq %s for %s, found %s', p_what, p_n, p_scope, v_latest);
END
$$;

----------------------------------------------------------------------------
-- Interleaved writes to two scopes: each counts 1, 2, 3, ... on its own.
----------------------------------------------------------------------------

INSERT INTO chat.projects (id, name) VALUES (:'a', 'sqltest A');                      -- A1
INSERT INTO chat.projects (id, name) VALUES (:'b', 'sqltest B');                      -- B1
INSERT INTO chat.project_members (project_id, user_id, role) VALUES (:'a', 'alice', 'owner');  -- A2
INSERT INTO chat.project_members (project_id, user_id, role) VALUES (:'b', 'alice', 'owner');  -- B2
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'a-1');          -- A3
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'b', 'alice', 'b-1');          -- B3
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'a-2');          -- A4

DO $$
BEGIN
    PERFORM pg_temp.expect_dense(current_setting('sqltest.a'), 4, 'interleaved writes, scope A');
    PERFORM pg_temp.expect_dense(current_setting('sqltest.b'), 3, 'interleaved writes, scope B');
END
$$;

-- One statement that touches both scopes, rows interleaved A, B, A, B:
-- each scope gets contiguous seqs, in the statement's row order.
INSERT INTO chat.messages (project_id, sender_id, body)
VALUES (:'a', 'alice', 'a-3'), (:'b', 'alice', 'b-2'), (:'a', 'alice', 'a-4'), (:'b', 'alice', 'b-3');

-- And one UPDATE over both scopes.
UPDATE chat.messages SET body = body || '!' WHERE project_id IN (:'a', :'b');

DO $$
DECLARE
    v_a      text := current_setting('sqltest.a');
    v_b      text := current_setting('sqltest.b');
    v_bodies text[];
BEGIN
    -- A: 4 + 2 inserted + 4 updated; B: 3 + 2 inserted + 3 updated.
    PERFORM pg_temp.expect_dense(v_a, 10, 'statement over two scopes, scope A');
    PERFORM pg_temp.expect_dense(v_b, 8, 'statement over two scopes, scope B');

    SELECT array_agg(data ->> 'body' ORDER BY seq) INTO v_bodies
    FROM relay.events WHERE scope = v_a AND seq IN (5, 6);
    ASSERT v_bodies = ARRAY['a-3', 'a-4'], format('scope A seqs 5, 6: expected a-3, a-4, found %s', v_bodies);
    SELECT array_agg(data ->> 'body' ORDER BY seq) INTO v_bodies
    FROM relay.events WHERE scope = v_b AND seq IN (4, 5);
    ASSERT v_bodies = ARRAY['b-2', 'b-3'], format('scope B seqs 4, 5: expected b-2, b-3, found %s', v_bodies);

    -- The UPDATE's events carry the new bodies, one per row.
    SELECT array_agg(data ->> 'body' ORDER BY data ->> 'body') INTO v_bodies
    FROM relay.events WHERE scope = v_a AND seq BETWEEN 7 AND 10 AND action = 'UPDATE';
    ASSERT v_bodies = ARRAY['a-1!', 'a-2!', 'a-3!', 'a-4!'],
        format('scope A seqs 7..10: expected UPDATEs to a-1! .. a-4!, found %s', v_bodies);
END
$$;

----------------------------------------------------------------------------
-- ROLLBACK TO SAVEPOINT: no event, no gap, the seq is given back.
----------------------------------------------------------------------------

SAVEPOINT undone;

INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'rolled back');
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'b', 'alice', 'rolled back');
DELETE FROM chat.project_members WHERE project_id = :'a' AND user_id = 'alice';

DO $$
BEGIN
    -- Inside the savepoint the events are there, at the next seqs.
    PERFORM pg_temp.expect_dense(current_setting('sqltest.a'), 12, 'inside the savepoint, scope A');
    PERFORM pg_temp.expect_dense(current_setting('sqltest.b'), 9, 'inside the savepoint, scope B');
END
$$;

ROLLBACK TO SAVEPOINT undone;

DO $$
DECLARE
    v_a text := current_setting('sqltest.a');
BEGIN
    PERFORM pg_temp.expect_dense(v_a, 10, 'after ROLLBACK TO SAVEPOINT, scope A');
    PERFORM pg_temp.expect_dense(current_setting('sqltest.b'), 8, 'after ROLLBACK TO SAVEPOINT, scope B');
    ASSERT NOT EXISTS (SELECT 1 FROM relay.events
                       WHERE scope IN (v_a, current_setting('sqltest.b')) AND data ->> 'body' = 'rolled back'),
        'after ROLLBACK TO SAVEPOINT: expected no event of the rolled-back messages, found one';
    ASSERT chat.latest_seq(v_a, 'alice') = 4,
        format('after ROLLBACK TO SAVEPOINT: expected chat.latest_seq 4, found %s', chat.latest_seq(v_a, 'alice'));
END
$$;

-- The next committed write gets the next seq: 11 in A, and message seq 5.
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'kept');

DO $$
DECLARE
    v_a text := current_setting('sqltest.a');
    e   relay.events;
BEGIN
    PERFORM pg_temp.expect_dense(v_a, 11, 'write after the rolled-back savepoint, scope A');
    SELECT * INTO STRICT e FROM relay.events ev WHERE ev.scope = v_a AND ev.seq = 11;
    ASSERT e.action = 'INSERT' AND e.data ->> 'body' = 'kept' AND e.data ->> 'seq' = '5',
        format('seq 11: expected the INSERT of "kept" with message seq 5, found %s %s', e.action, e.data);
END
$$;

-- A released savepoint is part of the transaction: its events stay.
SAVEPOINT released;
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'released');
RELEASE SAVEPOINT released;

DO $$
BEGIN
    PERFORM pg_temp.expect_dense(current_setting('sqltest.a'), 12, 'after RELEASE SAVEPOINT, scope A');
END
$$;

----------------------------------------------------------------------------
-- A failing statement leaves nothing: a 3-row INSERT whose last row breaks
-- a CHECK, and an INSERT into a project that does not exist (FK).
----------------------------------------------------------------------------

DO $$
DECLARE
    v_a     text := current_setting('sqltest.a');
    v_ghost text := 'sqltest-' || gen_random_uuid();
BEGIN
    BEGIN
        INSERT INTO chat.messages (project_id, sender_id, body, status)
        VALUES (v_a, 'alice', 'ok 1', 'sent'), (v_a, 'alice', 'ok 2', 'sent'), (v_a, 'alice', 'bad', 'bogus');
        RAISE EXCEPTION 'expected 23514 (check_violation) for status bogus, but the INSERT succeeded';
    EXCEPTION WHEN check_violation THEN
        NULL;  -- expected
    END;
    PERFORM pg_temp.expect_dense(v_a, 12, 'after a failed 3-row INSERT, scope A');

    BEGIN
        INSERT INTO chat.messages (project_id, sender_id, body) VALUES (v_ghost, 'alice', 'nowhere');
        RAISE EXCEPTION 'expected 23503 (foreign_key_violation) for an unknown project, but the INSERT succeeded';
    EXCEPTION WHEN foreign_key_violation THEN
        NULL;  -- expected
    END;
    PERFORM pg_temp.expect_dense(v_ghost, 0, 'after a failed INSERT into an unknown project');
    ASSERT (SELECT trimmed_through FROM relay.scope_state(v_ghost)) = 0,
        'scope_state of an unknown scope: expected trimmed_through 0';
END
$$;

-- The next write still gets the next seq.
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'a', 'alice', 'after failure');

DO $$
DECLARE
    v_a text := current_setting('sqltest.a');
BEGIN
    PERFORM pg_temp.expect_dense(v_a, 13, 'write after failed statements, scope A');
    ASSERT (SELECT data ->> 'seq' FROM relay.events WHERE scope = v_a AND seq = 13) = '7',
        'seq 13: expected the message to have message seq 7 (no message seq burnt by failures)';
    ASSERT (SELECT last_seq FROM relay.scope_counter WHERE scope = v_a) = 13,
        'scope_counter of A: expected last_seq 13';
END
$$;

----------------------------------------------------------------------------
-- Resume reads: frames_after and frames_after_many.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_a     text := current_setting('sqltest.a');
    v_b     text := current_setting('sqltest.b');
    v_after bigint := 0;
    v_batch bigint[];
    v_all   bigint[] := '{}';
    v_calls int := 0;
    v_seqs  bigint[];
    v_many  text[];
    v_want  text[];
BEGIN
    -- Batches of at most 5, each asking from the last seq received, give
    -- 1..13 exactly once, in order: 5 + 5 + 3, then an empty batch.
    LOOP
        SELECT coalesce(array_agg(f.seq ORDER BY f.ordinality), '{}') INTO v_batch
        FROM relay.frames_after(v_a, v_after, 5) WITH ORDINALITY AS f;
        v_calls := v_calls + 1;
        ASSERT cardinality(v_batch) <= 5,
            format('frames_after limit 5: expected at most 5 frames, found %s', cardinality(v_batch));
        EXIT WHEN cardinality(v_batch) = 0;
        v_all := v_all || v_batch;
        v_after := v_batch[cardinality(v_batch)];
        ASSERT v_calls < 10, 'frames_after: expected the batches to end';
    END LOOP;
    ASSERT v_all = ARRAY(SELECT generate_series(1::bigint, 13)),
        format('frames_after batches: expected seqs 1..13 once each in order, found %s', v_all);
    ASSERT v_calls = 4, format('frames_after batches: expected 3 batches and an empty one, found %s calls', v_calls);

    -- Resuming from k gives exactly k+1 .. latest.
    SELECT array_agg(f.seq ORDER BY f.ordinality) INTO v_seqs
    FROM relay.frames_after(v_a, 9, 500) WITH ORDINALITY AS f;
    ASSERT v_seqs = ARRAY[10, 11, 12, 13]::bigint[],
        format('frames_after(A, 9): expected seqs 10..13, found %s', v_seqs);
    ASSERT NOT EXISTS (SELECT 1 FROM relay.frames_after(v_a, 13, 500)),
        'frames_after(A, latest): expected no frames';

    -- Each frame is the one renderer's output for its event.
    ASSERT NOT EXISTS (SELECT 1 FROM relay.frames_after(v_a, 0, 500) f
                       JOIN relay.events e ON e.scope = v_a AND e.seq = f.seq
                       WHERE f.frame <> relay.render(e, true)),
        'frames_after: expected every frame to equal relay.render(event, true)';

    -- frames_after_many: several scopes, each from its own seq, in
    -- (scope, seq) order, the same frames as frames_after.
    SELECT array_agg(m.scope || '/' || m.seq || '/' || md5(m.frame) ORDER BY m.ordinality) INTO v_many
    FROM relay.frames_after_many(ARRAY[v_a, v_b], ARRAY[10, 6]::bigint[], 2) WITH ORDINALITY AS m;
    SELECT array_agg(x ORDER BY s, q) INTO v_want FROM (
        SELECT v_a AS s, f.seq AS q, v_a || '/' || f.seq || '/' || md5(f.frame) AS x
        FROM relay.frames_after(v_a, 10, 2) f
        UNION ALL
        SELECT v_b, f.seq, v_b || '/' || f.seq || '/' || md5(f.frame)
        FROM relay.frames_after(v_b, 6, 2) f) w;
    ASSERT cardinality(v_many) = 4 AND v_many = v_want,
        format('frames_after_many: expected A 11, 12 and B 7, 8 as from frames_after, found %s', v_many);
END
$$;

ROLLBACK;

-- After the rollback nothing of either scope is left (and a rolled-back
-- transaction left no events behind: G1).
DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.a'), current_setting('sqltest.b')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %, found rows', v_scopes;
    END IF;
END
$$;
