-- 006_pages.sql: keyset pages of messages, newest first (the history side
-- of incident 1: history loaded while live messages arrive).
--
-- Checks that chat.messages_page, followed page by page with before_seq =
-- the last seq of the previous page, returns each of 25 messages exactly
-- once, in descending seq order, in pages of 10, 10 and 5, then an empty
-- page; that messages sent while paging do not shift or repeat later pages;
-- that deleted messages appear as tombstones; that another project's
-- messages never appear; that the default limit is 50 and 200 is allowed;
-- and that a limit of 0, 201, -1 or NULL raises 22023 and a non-member
-- gets 42501.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 006_pages.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p,
       set_config('sqltest.other', 'sqltest-' || gen_random_uuid(), false) AS other \gset

BEGIN;

-- Fixture: alice and bob in the project; 25 messages, alternating senders,
-- bodies "msg 01" .. "msg 25" (message seq n has body "msg n"). Another
-- project, where alice also is, gets 5 messages of its own.
INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest pages'), (:'other', 'sqltest pages, other');
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'p', 'alice', 'owner'), (:'p', 'bob', 'member'), (:'other', 'alice', 'owner');

DO $$
DECLARE
    v_p     text := current_setting('sqltest.p');
    v_other text := current_setting('sqltest.other');
BEGIN
    FOR i IN 1..25 LOOP
        PERFORM chat.send_message(v_p, CASE WHEN i % 2 = 0 THEN 'bob' ELSE 'alice' END,
                                  format('msg %s', lpad(i::text, 2, '0')), format('cid-%s', i));
    END LOOP;
    FOR i IN 1..5 LOOP
        PERFORM chat.send_message(v_other, 'alice', format('other %s', i), format('cid-%s', i));
    END LOOP;
END
$$;

----------------------------------------------------------------------------
-- Follow the pages: 25..16, 15..6, 5..1, then nothing.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p       text := current_setting('sqltest.p');
    v_before  bigint := NULL;  -- NULL: the newest page
    v_pseqs   bigint[];        -- the current page's seqs, ids and bodies
    v_pids    text[];
    v_pbodies text[];
    v_sizes   int[] := '{}';   -- every page's size, and all pages joined
    v_seqs    bigint[] := '{}';
    v_ids     text[] := '{}';
    v_bodies  text[] := '{}';
    v_calls   int := 0;
BEGIN
    LOOP
        -- One page, in the order the function returns it.
        SELECT coalesce(array_agg(m.seq ORDER BY m.ordinality), '{}'),
               coalesce(array_agg(m.id ORDER BY m.ordinality), '{}'),
               coalesce(array_agg(m.body ORDER BY m.ordinality), '{}')
        INTO v_pseqs, v_pids, v_pbodies
        FROM chat.messages_page(v_p, 'bob', v_before, 10) WITH ORDINALITY AS m;
        v_calls := v_calls + 1;
        ASSERT v_calls <= 10, 'pages: expected the pages to end';
        v_sizes := v_sizes || cardinality(v_pseqs);
        EXIT WHEN cardinality(v_pseqs) = 0;
        v_seqs := v_seqs || v_pseqs;
        v_ids := v_ids || v_pids;
        v_bodies := v_bodies || v_pbodies;
        -- The next page: before the last seq of this one.
        v_before := v_pseqs[cardinality(v_pseqs)];
    END LOOP;

    ASSERT v_sizes = ARRAY[10, 10, 5, 0],
        format('pages of 10: expected sizes 10, 10, 5 then an empty page, found %s', v_sizes);
    ASSERT v_seqs = ARRAY(SELECT generate_series(25::bigint, 1, -1)),
        format('pages: expected seqs 25 down to 1, each once, found %s', v_seqs);
    ASSERT (SELECT count(DISTINCT x) FROM unnest(v_ids) x) = 25
           AND (SELECT array_agg(id ORDER BY id) FROM chat.messages WHERE project_id = v_p)
             = (SELECT array_agg(x ORDER BY x) FROM unnest(v_ids) x),
        'pages: expected every message of the project exactly once';
    ASSERT v_bodies = ARRAY(SELECT format('msg %s', lpad(i::text, 2, '0')) FROM generate_series(25, 1, -1) i),
        format('pages: expected bodies msg 25 .. msg 01, found %s', v_bodies);
END
$$;

----------------------------------------------------------------------------
-- Keyset, not offset: messages arriving between pages change nothing in
-- the next page. Tombstones are listed. Other projects never leak in.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p    text := current_setting('sqltest.p');
    v_seqs bigint[];
    v_m    chat.messages;
BEGIN
    SELECT array_agg(m.seq ORDER BY m.ordinality) INTO v_seqs
    FROM chat.messages_page(v_p, 'alice', NULL, 10) WITH ORDINALITY AS m;
    ASSERT v_seqs = ARRAY(SELECT generate_series(25::bigint, 16, -1)),
        format('first page: expected 25..16, found %s', v_seqs);

    -- Two messages arrive, and one on page 2 is deleted.
    PERFORM chat.send_message(v_p, 'bob', 'late 1', 'late-1');
    PERFORM chat.send_message(v_p, 'alice', 'late 2', 'late-2');
    PERFORM chat.delete_message((SELECT id FROM chat.messages WHERE project_id = v_p AND seq = 13), 'alice');

    SELECT array_agg(m.seq ORDER BY m.ordinality) INTO v_seqs
    FROM chat.messages_page(v_p, 'alice', 16, 10) WITH ORDINALITY AS m;
    ASSERT v_seqs = ARRAY(SELECT generate_series(15::bigint, 6, -1)),
        format('second page after new messages: expected still 15..6, found %s', v_seqs);

    SELECT * INTO STRICT v_m FROM chat.messages_page(v_p, 'alice', 16, 10) m WHERE m.seq = 13;
    ASSERT v_m.deleted_at IS NOT NULL AND v_m.body = '',
        format('page: expected message 13 as a tombstone (deleted_at set, empty body), found %s', to_jsonb(v_m));

    -- The newest page now starts with the new messages.
    SELECT array_agg(m.seq ORDER BY m.ordinality) INTO v_seqs
    FROM chat.messages_page(v_p, 'alice', NULL, 3) WITH ORDINALITY AS m;
    ASSERT v_seqs = ARRAY[27, 26, 25]::bigint[], format('newest page of 3: expected 27, 26, 25, found %s', v_seqs);

    -- Nothing before seq 1; a before_seq past the end is the newest page.
    ASSERT NOT EXISTS (SELECT 1 FROM chat.messages_page(v_p, 'alice', 1, 10)),
        'page before seq 1: expected no messages';
    SELECT array_agg(m.seq ORDER BY m.ordinality) INTO v_seqs
    FROM chat.messages_page(v_p, 'alice', 1000000, 2) WITH ORDINALITY AS m;
    ASSERT v_seqs = ARRAY[27, 26]::bigint[], format('page before seq 1000000: expected 27, 26, found %s', v_seqs);

    -- Only this project's messages, with the default limit of 50, and 200.
    ASSERT (SELECT count(*) FROM chat.messages_page(v_p, 'alice')) = 27,
        'default page: expected all 27 messages (limit 50)';
    ASSERT (SELECT count(*) FROM chat.messages_page(v_p, 'alice', NULL, 200) m WHERE m.project_id = v_p) = 27
           AND (SELECT count(*) FROM chat.messages_page(v_p, 'alice', NULL, 200)) = 27,
        'page of 200: expected exactly the project''s 27 messages';
    ASSERT (SELECT count(*) FROM chat.messages_page(current_setting('sqltest.other'), 'alice', NULL, 200)) = 5,
        'the other project: expected its own 5 messages';
END
$$;

----------------------------------------------------------------------------
-- Refusals.
----------------------------------------------------------------------------

-- limit 0: 22023.
DO $$
BEGIN
    PERFORM chat.messages_page(current_setting('sqltest.p'), 'alice', NULL, 0);
    RAISE EXCEPTION 'expected 22023 for limit 0, but the page was returned';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- limit 201: 22023.
DO $$
BEGIN
    PERFORM chat.messages_page(current_setting('sqltest.p'), 'alice', NULL, 201);
    RAISE EXCEPTION 'expected 22023 for limit 201, but the page was returned';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- limit -1: 22023.
DO $$
BEGIN
    PERFORM chat.messages_page(current_setting('sqltest.p'), 'alice', NULL, -1);
    RAISE EXCEPTION 'expected 22023 for limit -1, but the page was returned';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- limit NULL: 22023.
DO $$
BEGIN
    PERFORM chat.messages_page(current_setting('sqltest.p'), 'alice', NULL, NULL);
    RAISE EXCEPTION 'expected 22023 for limit NULL, but the page was returned';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- A non-member: 42501 (bob is not in the other project).
DO $$
BEGIN
    PERFORM chat.messages_page(current_setting('sqltest.other'), 'bob', NULL, 10);
    RAISE EXCEPTION 'expected 42501 for a page requested by a non-member, but the page was returned';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

ROLLBACK;

-- After the rollback nothing of either project is left.
DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.p'), current_setting('sqltest.other')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %, found rows', v_scopes;
    END IF;
END
$$;
