-- 008_large_row.sql: G5, rows of any size arrive whole while NOTIFY payloads
-- stay small.
--
-- Checks that a message with a 1 MiB body (and one with 1 MiB of multi-byte
-- text) can be inserted and updated by a plain statement; that the NOTIFY
-- payload of each event, relay.render(e, false), stays far below the
-- 8000-byte NOTIFY limit (< 400 bytes) and carries no data; and that the
-- frame read back through relay.frames_after holds the whole row, byte for
-- byte, including the whole body; and that with a byte budget smaller than
-- one frame, relay.frames_after still returns exactly one frame per call
-- (however large), so a reader following it gets every large row in order.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 008_large_row.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;
SET client_encoding = 'UTF8';  -- this file contains UTF-8 literals

SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p \gset

BEGIN;

-- Fixture: the project (event 1) and alice (event 2).
INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest large rows');
INSERT INTO chat.project_members (project_id, user_id, role) VALUES (:'p', 'alice', 'owner');

-- Event 3: a 1 MiB ASCII body. Event 4: 1 Mi characters of 2-byte text.
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'p', 'alice', repeat('x', 1048576));
INSERT INTO chat.messages (project_id, sender_id, body) VALUES (:'p', 'alice', repeat('é', 1048576));

-- Event 5: the first one updated, still 1 MiB, different last byte.
UPDATE chat.messages SET body = repeat('x', 1048575) || 'y'
WHERE project_id = :'p' AND body = repeat('x', 1048576);

DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    e        relay.events;
    v_notice text;
    v_frame  text;
    v_body   text;
    v_want   text;
    v_n      int := 0;
BEGIN
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = 5,
        format('expected 5 events, found latest seq %s', (SELECT latest_seq FROM relay.scope_state(v_p)));

    FOR e IN SELECT * FROM relay.events ev WHERE ev.scope = v_p AND ev.seq BETWEEN 3 AND 5 ORDER BY ev.seq LOOP
        v_n := v_n + 1;
        v_want := CASE e.seq WHEN 3 THEN repeat('x', 1048576)
                             WHEN 4 THEN repeat('é', 1048576)
                             ELSE repeat('x', 1048575) || 'y' END;

        -- The notice: small, no data.
        v_notice := relay.render(e, false);
        ASSERT octet_length(v_notice) < 400,
            format('seq %s: expected a notice < 400 bytes (NOTIFY limit 8000), found %s bytes',
                   e.seq, octet_length(v_notice));
        ASSERT NOT (v_notice::jsonb ? 'data'), format('seq %s: expected no data in the notice', e.seq);

        -- The frame, as the relay reads it: the whole row.
        SELECT f.frame INTO STRICT v_frame FROM relay.frames_after(v_p, e.seq - 1, 1) f;
        v_body := v_frame::jsonb -> 'data' ->> 'body';
        ASSERT length(v_body) = 1048576,
            format('seq %s: expected a 1048576-character body in the frame, found %s', e.seq, length(v_body));
        ASSERT v_body = v_want, format('seq %s: expected the frame''s body to equal the row''s body', e.seq);
        ASSERT octet_length(v_frame) > octet_length(v_want),
            format('seq %s: expected the frame (%s bytes) to be larger than the body (%s bytes)',
                   e.seq, octet_length(v_frame), octet_length(v_want));
        ASSERT (v_frame::jsonb -> 'data') = e.data,
            format('seq %s: expected the frame''s data to be the event''s data', e.seq);
        -- Seqs 4 and 5 hold the rows as they are now.
        ASSERT e.seq = 3 OR e.data = (SELECT to_jsonb(m) FROM chat.messages m
                                      WHERE m.project_id = v_p AND m.id = e.row_id),
            format('seq %s: expected the event''s data to be the stored row', e.seq);
    END LOOP;
    ASSERT v_n = 3, format('expected 3 large-row events (seqs 3..5), found %s', v_n);

    -- A 1000-byte budget (p_max_bytes): one whole frame per call, never
    -- none, so following the batches still yields 3, 4, 5 in order.
    DECLARE
        v_after bigint := 2;
        v_got   bigint[] := '{}';
        v_batch bigint[];
    BEGIN
        FOR i IN 1..10 LOOP
            SELECT coalesce(array_agg(f.seq ORDER BY f.seq), '{}') INTO v_batch
            FROM relay.frames_after(v_p, v_after, 500, 1000) f
            WHERE octet_length(f.frame) > 1048576;  -- whole frames only
            EXIT WHEN cardinality(v_batch) = 0;
            ASSERT cardinality(v_batch) = 1
                   AND (SELECT count(*) FROM relay.frames_after(v_p, v_after, 500, 1000)) = 1,
                format('byte budget 1000 after seq %s: expected exactly one whole frame, found %s',
                       v_after, v_batch);
            v_got := v_got || v_batch;
            v_after := v_batch[1];
        END LOOP;
        ASSERT v_got = ARRAY[3, 4, 5]::bigint[],
            format('byte budget 1000: expected to stream seqs 3, 4, 5 one per call, found %s', v_got);
    END;

    -- Byte counts: 1 MiB, 2 MiB, 1 MiB of body.
    ASSERT (SELECT array_agg(octet_length(data ->> 'body') ORDER BY seq) FROM relay.events
            WHERE scope = v_p AND seq BETWEEN 3 AND 5) = ARRAY[1048576, 2097152, 1048576],
        'expected event bodies of 1 MiB, 2 MiB and 1 MiB';
END
$$;

ROLLBACK;

-- After the rollback nothing of this scope is left.
DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = v_p)
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = v_p)
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = v_p) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scope %, found rows', v_p;
    END IF;
END
$$;
