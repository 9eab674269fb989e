-- relay V6: only what is meant to be seen (DESIGN.md G10), columns chosen
-- in SQL at capture.
--
-- relay.enable(..., p_columns => ARRAY[...]) makes an event's `data` only
-- those columns; p_exclude_columns => ARRAY[...] all but those; and
-- p_row_data => false no data at all (an id-only event, the pure
-- invalidation: the frame is the notice's shape). Columns left out are cut
-- from the row image inside the capture trigger, before anything is
-- written, so they never reach relay.events, the notice or any client.
--
-- The choice lives with the capture triggers, not in a table that every
-- captured statement would have to read: a table with a choice gets a
-- capture function of its own with the choice written in as constants
-- (relay.create_capture), and its triggers carry the choice as arguments
-- too, for relay.tracked_columns and the next relay.enable. The choice
-- changes with the triggers in one transaction (relay.enable re-creates
-- them), so it takes effect for the next statement, with no relay
-- restart. A table without a choice keeps today's three arguments and
-- V1's relay.capture.
--
-- Trigger arguments: resource, scope column, id column, then, when a
-- choice is made: 'all' | 'only' | 'except', 'row_data' | 'id_only', and
-- the column names of the list.
--
-- An UPDATE under a column choice (a list, or p_row_data => false with a
-- list) yields an event for a row only when a chosen column, the id or the
-- scope changed: a change of excluded columns alone is not an event (it
-- would tell every subscriber when a password hash or a private cursor
-- changed). Without a list every UPDATE is an event, as before (an id-only
-- event without a list says "this row changed").
--
-- Idempotent like V1 and V3: safe to run again, by psql or `pgrelay migrate`.

-- Id-only events keep no row data.
ALTER TABLE relay.events ALTER COLUMN data DROP NOT NULL;

-- The renderer, as in V1, but an event without data (id-only) renders
-- without a `data` key: its frame has the notice's shape, whole id included.
CREATE OR REPLACE FUNCTION relay.render(e relay.events, with_data boolean DEFAULT true)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT '{"type":"cache_invalidate","resource":' || to_json(e.resource)::text
        || ',"action":' || to_json(e.action)::text
        -- A key longer than 1 KiB is left out of the notice (not the
        -- frame), so the notice stays far below NOTIFY's 8000-byte limit
        -- whatever the key.
        || ',"id":' || CASE WHEN with_data OR octet_length(e.row_id) <= 1024
                            THEN coalesce(to_json(e.row_id)::text, 'null') ELSE 'null' END
        || ',"project_id":' || to_json(e.scope)::text
        || ',"seq":' || e.seq::text
        || ',"timestamp":"' || relay.wire_time(e.created_at) || '"'
        || CASE WHEN with_data AND e.data IS NOT NULL THEN ',"data":' || e.data::text ELSE '' END
        || '}'
$$;

-- A trigger's arguments (pg_trigger.tgargs: each NUL-terminated, in the
-- database encoding) as text, exactly.
CREATE OR REPLACE FUNCTION relay.trigger_args(p_args bytea) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_args text[] := '{}';
    v_at   int;
BEGIN
    LOOP
        v_at := position('\x00'::bytea IN p_args);
        EXIT WHEN v_at = 0;
        v_args := v_args || convert_from(substring(p_args FROM 1 FOR v_at - 1), getdatabaseencoding());
        p_args := substring(p_args FROM v_at + 1);
    END LOOP;
    RETURN v_args;
END
$$;

-- relay.append's work, with a choice of keeping the row images as data
-- (p_row_data) or only reading their scope and id from them (an id-only
-- event). relay.append is this with data; the capture triggers call it directly.
CREATE OR REPLACE FUNCTION relay.append_rows(
    p_resource  text,
    p_action    text,
    p_scope_col text,
    p_id_col    text,
    p_rows      jsonb[],
    p_row_data  boolean
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_bad   jsonb;
    v_count bigint;
BEGIN
    IF p_action IS DISTINCT FROM 'INSERT' AND p_action IS DISTINCT FROM 'UPDATE'
       AND p_action IS DISTINCT FROM 'DELETE' THEN
        RAISE EXCEPTION 'relay: unknown action % for resource "%"', coalesce(p_action, 'NULL'), p_resource
            USING ERRCODE = 'check_violation',
                  HINT = 'An event''s action is INSERT, UPDATE or DELETE.';
    END IF;
    SELECT d INTO v_bad
    FROM unnest(p_rows) AS u(d)
    WHERE d ->> p_scope_col IS NULL OR length(d ->> p_scope_col) > 256
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'relay: cannot capture % of resource "%": scope column "%" is %',
            p_action, p_resource, p_scope_col,
            CASE WHEN v_bad ->> p_scope_col IS NULL THEN 'NULL or missing'
                 ELSE 'longer than 256 characters' END
            USING ERRCODE = 'not_null_violation',
                  HINT = 'Every captured row needs a scope (project) of at most 256 characters.';
    END IF;

    WITH img AS (
        SELECT d, d ->> p_scope_col AS scope, d ->> p_id_col AS row_id,
               row_number() OVER (PARTITION BY d ->> p_scope_col ORDER BY ord) AS rn
        FROM unnest(p_rows) WITH ORDINALITY AS u(d, ord)
    ), counts AS (
        SELECT scope, count(*) AS n FROM img GROUP BY scope
    ), bumped AS (
        -- ORDER BY scope: statements touching several scopes lock their
        -- counters in one global order, so they cannot deadlock each other.
        INSERT INTO relay.scope_counter AS c (scope, last_seq)
        SELECT scope, n FROM counts ORDER BY scope
        ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + excluded.last_seq
        RETURNING c.scope, c.last_seq
    ), appended AS (
        INSERT INTO relay.events AS e (scope, seq, resource, action, row_id, data)
        SELECT img.scope, b.last_seq - counts.n + img.rn, p_resource, p_action, img.row_id,
               CASE WHEN p_row_data THEN img.d END
        FROM img JOIN counts USING (scope) JOIN bumped b USING (scope)
        RETURNING e
    )
    SELECT count(pg_notify(relay.channel(), relay.render(x.e, false)))
    INTO v_count
    FROM (SELECT a.e FROM appended a ORDER BY (a.e).scope, (a.e).seq) x;
    RETURN v_count;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.append_rows(text, text, text, text, jsonb[], boolean) FROM PUBLIC;

-- Publishing an event that is not a row change: unchanged for its callers
-- (granted by relay.grant_publisher); the data is the image as given.
CREATE OR REPLACE FUNCTION relay.append(
    p_resource  text,
    p_action    text,
    p_scope_col text,
    p_id_col    text,
    p_rows      jsonb[]
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN relay.append_rows(p_resource, p_action, p_scope_col, p_id_col, p_rows, true);
END
$$;

-- A table with a column choice gets a capture trigger function of its own,
-- relay.capture_<table oid>, written by relay.enable with the choice in
-- its text as constants. A table without a choice keeps V1's
-- relay.capture, untouched, so its cost does not move.
--
-- Why generated: in a PL/pgSQL trigger each reference to the trigger's
-- arguments in a query, and each statement, costs a few thousand
-- instructions per transaction, more than cutting the image itself; with
-- the choice as constants an insert runs V1's statements and no others
-- (bench/capture-profile.sh: a deny-list costs its key deletion, an
-- id-only event less than capturing every column). The function is
-- recreated by every relay.enable call and dropped by relay.disable.
--
-- Each image is cut as it is read, from to_jsonb of the row (so a column
-- added to the table later is in it, or not, by the same rule):
--   except:  all but the listed columns (one jsonb key deletion);
--   only:    the listed columns, the id and the scope, picked by name (a
--            listed column dropped since shows as null until the next
--            relay.enable);
--   all + id-only: only the id and scope, read from the row directly.
-- Id-only events write no data. Under a list, an UPDATE whose rows kept
-- every chosen column is no event (relay.changed_images).
CREATE OR REPLACE FUNCTION relay.create_capture(
    p_table        regclass,
    p_mode         text,
    p_row_data     boolean,
    p_columns      text[],
    p_scope_column name,
    p_id_column    name
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_name  text := format('relay.%I', 'capture_' || p_table::oid);
    v_owner name;
    v_image text;
    v_from  text;
BEGIN
    -- The image of a row of the transition table aliased r, as an
    -- expression, and what it is selected from.
    IF p_mode = 'except' THEN
        v_image := format('to_jsonb(r) - %L::text[]', p_columns);
        v_from := '%s r';
    ELSIF p_mode = 'only' THEN
        SELECT 'jsonb_build_object(' || string_agg(format('%L, d -> %L', c, c), ', ' ORDER BY i) || ')'
        INTO v_image
        FROM unnest(p_columns || ARRAY[p_id_column::text, p_scope_column::text]) WITH ORDINALITY AS u(c, i);
        v_from := '%s r, LATERAL to_jsonb(r) AS d';
    ELSIF NOT p_row_data THEN
        v_image := format('jsonb_build_object(%L, r.%I, %L, r.%I)',
                          p_id_column, p_id_column, p_scope_column, p_scope_column);
        v_from := '%s r';
    ELSE
        RAISE EXCEPTION 'relay.create_capture: no choice to make a function for (%)', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
-- Written by relay.enable for %2$s (column choice %3$s, %4$s): do not
-- edit, call relay.enable again. TG_ARGV: resource, scope column, id column.
DECLARE
    v_rows   jsonb[];
    v_new    jsonb[];
    v_old    jsonb[];
    v_moved  jsonb[];
    v_one    jsonb;
    v_scope  text;
    v_seq    bigint;
    v_notice text;
    v_void   text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(%5$s) INTO v_rows FROM %6$s;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(%5$s) INTO v_rows FROM %7$s;
    ELSE
        SELECT array_agg(%5$s) INTO v_new FROM %6$s;
        SELECT array_agg(%5$s) INTO v_old FROM %7$s;
        v_rows := %8$s;
        v_moved := relay.moved_images(v_new, v_old, TG_ARGV[1], TG_ARGV[2]);
    END IF;
    IF cardinality(v_rows) = 1 THEN
        v_one := v_rows[1];
        v_scope := v_one ->> TG_ARGV[1];
        IF v_scope IS NULL OR length(v_scope) > 256 THEN
            PERFORM relay.append_rows(TG_ARGV[0], TG_OP, TG_ARGV[1], TG_ARGV[2], v_rows, true);
        END IF;
        INSERT INTO relay.scope_counter AS c (scope, last_seq) VALUES (v_scope, 1)
        ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + 1
        RETURNING c.last_seq INTO v_seq;
        INSERT INTO relay.events AS e (scope, seq, resource, action, row_id, data)
        VALUES (v_scope, v_seq, TG_ARGV[0], TG_OP, v_one ->> TG_ARGV[2], %9$s)
        RETURNING relay.render(e, false) INTO v_notice;
        v_void := pg_notify(relay.channel(), v_notice)::text;
    ELSIF v_rows IS NOT NULL THEN
        PERFORM relay.append_rows(TG_ARGV[0], TG_OP, TG_ARGV[1], TG_ARGV[2], v_rows, %10$s);
    END IF;
    IF v_moved IS NOT NULL THEN
        PERFORM relay.append_rows(TG_ARGV[0], 'DELETE', TG_ARGV[1], TG_ARGV[2], v_moved, %10$s);
    END IF;
    RETURN NULL;
END
$body$
$f$,
        v_name, p_table, p_mode, CASE WHEN p_row_data THEN 'row data' ELSE 'id-only' END,
        v_image, format(v_from, 'relay_new_rows'), format(v_from, 'relay_old_rows'),
        CASE WHEN p_mode = 'all' THEN 'v_new' ELSE 'relay.changed_images(v_new, v_old)' END,
        CASE WHEN p_row_data THEN 'v_one' ELSE 'NULL' END,
        CASE WHEN p_row_data THEN 'true' ELSE 'false' END);
    -- It runs with the rights of relay.capture's owner, like every other
    -- capture, not with those of whoever called relay.enable (often a
    -- superuser running migrations).
    SELECT pg_get_userbyid(p.proowner) INTO v_owner FROM pg_proc p
    WHERE p.oid = 'relay.capture()'::regprocedure;
    IF v_owner IS DISTINCT FROM current_user THEN
        EXECUTE format('ALTER FUNCTION %s() OWNER TO %I', v_name, v_owner);
    END IF;
    RETURN v_name;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.create_capture(regclass, text, boolean, text[], name, name) FROM PUBLIC;

-- Of an UPDATE's new images (cut to a column list), those that differ from
-- every old image: a row whose chosen columns (id and scope included) are
-- all as they were is no event, the change was to left-out columns only.
-- Compared as text, so any visible change, even 1.0 to 1.00, is an event;
-- the old images as a set of digests, so memory stays small whatever the
-- rows' size. NULL when none changed.
CREATE OR REPLACE FUNCTION relay.changed_images(p_new jsonb[], p_old jsonb[]) RETURNS jsonb[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH old AS (
        SELECT jsonb_object_agg(encode(sha256(textsend(o.d::text)), 'base64'), true) AS digests
        FROM unnest(p_old) AS o(d)
    )
    SELECT array_agg(n.d ORDER BY n.ord)
    FROM unnest(p_new) WITH ORDINALITY AS n(d, ord), old
    WHERE old.digests IS NULL OR NOT old.digests ? encode(sha256(textsend(n.d::text)), 'base64')
$$;

-- Of an UPDATE's old images, those of rows that moved to another scope or
-- were given another id: they have left their old place, which gets a
-- DELETE with the row as it was, so its subscribers drop it (and a moved
-- membership is re-checked there: G4). Keys of the new images as a jsonb
-- set: lookups stay O(log n) whatever plan the planner would pick for a
-- join (a nested loop would make a 10,000-row UPDATE quadratic). NULL when
-- none moved.
CREATE OR REPLACE FUNCTION relay.moved_images(p_new jsonb[], p_old jsonb[], p_scope_col text, p_id_col text)
RETURNS jsonb[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH new AS (
        SELECT jsonb_object_agg(coalesce(n.d ->> p_id_col, '') || chr(31) || coalesce(n.d ->> p_scope_col, ''), true)
               AS keys
        FROM unnest(p_new) AS n(d)
    )
    SELECT array_agg(o.d ORDER BY o.ord)
    FROM unnest(p_old) WITH ORDINALITY AS o(d, ord), new
    WHERE new.keys IS NULL
       OR NOT new.keys ? (coalesce(o.d ->> p_id_col, '') || chr(31) || coalesce(o.d ->> p_scope_col, ''))
$$;

-- relay.disable (see V1) also drops the table's own capture function, and
-- any left by tables dropped since (their triggers went with them).
CREATE OR REPLACE FUNCTION relay.disable(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger  name;
    v_function regprocedure;
BEGIN
    FOR v_trigger IN
        SELECT t.tgname FROM pg_trigger t
        WHERE t.tgrelid = p_table
          AND t.tgname IN ('relay_capture_insert', 'relay_capture_update',
                           'relay_capture_delete', 'relay_refuse_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_table);
    END LOOP;
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'relay'::regnamespace AND p.proname ~ '^capture_[0-9]+$'
          AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END
$$;

-- relay.enable gains the column choice. A NULL (the default) keeps the
-- table's current choice, as p_grants_membership does, so re-running an
-- app's older `relay.enable(t, r)` never widens what its events carry:
--   p_columns         only these columns (with the id and scope, always);
--   p_exclude_columns all but these; '{}' goes back to every column;
--   p_row_data        false: no data at all (id-only events); true: data.
-- Giving both lists is refused. The id and scope columns cannot be
-- excluded: every event names them in its own fields anyway. A name that
-- is not a column of the table is refused. The five-argument form is
-- dropped first: two overloads with defaults would make calls ambiguous.
DROP FUNCTION IF EXISTS relay.enable(regclass, text, name, name, boolean);
CREATE OR REPLACE FUNCTION relay.enable(
    p_table             regclass,
    p_resource          text,
    p_scope_column      name    DEFAULT 'project_id',
    p_id_column         name    DEFAULT 'id',
    p_grants_membership boolean DEFAULT NULL,
    p_columns           name[]  DEFAULT NULL,
    p_exclude_columns   name[]  DEFAULT NULL,
    p_row_data          boolean DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_col     name;
    v_current text[];
    v_mode    text;
    v_cols    text[];
    v_data    boolean;
    v_bad     text;
    v_args    text;
    v_function text;
BEGIN
    IF p_resource IS NULL OR p_resource !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,63}$' THEN
        RAISE EXCEPTION 'relay.enable: resource name % is not valid', quote_nullable(p_resource)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 64 letters, digits, "_", "." or "-", starting with a letter or "_".';
    END IF;
    FOREACH v_col IN ARRAY ARRAY[p_scope_column, p_id_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = p_table AND attname = v_col
                         AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'relay.enable: table % has no column %', p_table, quote_ident(v_col)
                USING ERRCODE = 'undefined_column',
                      HINT = 'Name the scope column and the id column: '
                          || 'relay.enable(table, resource, scope_column, id_column).';
        END IF;
    END LOOP;
    IF p_columns IS NOT NULL AND p_exclude_columns IS NOT NULL THEN
        RAISE EXCEPTION 'relay.enable: give p_columns (only these) or p_exclude_columns (all but these), not both'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'p_columns => ARRAY[...] keeps only the columns named (safe when columns are '
                      || 'added later); p_exclude_columns => ARRAY[...] keeps all but those.';
    END IF;
    IF array_position(p_columns, NULL) IS NOT NULL OR array_position(p_exclude_columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'relay.enable: a column list holds a NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- The table's current choice, when it is tracked.
    SELECT relay.trigger_args(t.tgargs) INTO v_current
    FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = 'relay_capture_insert';
    IF p_columns IS NOT NULL THEN
        v_mode := 'only';
        v_cols := p_columns::text[];
    ELSIF p_exclude_columns IS NOT NULL THEN
        v_mode := CASE WHEN cardinality(p_exclude_columns) = 0 THEN 'all' ELSE 'except' END;
        v_cols := p_exclude_columns::text[];
    ELSIF coalesce(cardinality(v_current), 0) > 3 AND v_current[4] IN ('only', 'except') THEN
        -- Kept: columns dropped from the table since are let go.
        v_mode := v_current[4];
        SELECT coalesce(array_agg(c), '{}') INTO v_cols
        FROM unnest(v_current[6:]) AS c
        WHERE EXISTS (SELECT 1 FROM pg_attribute
                      WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped);
    ELSE
        v_mode := 'all';
    END IF;
    v_data := coalesce(p_row_data,
                       NOT (coalesce(cardinality(v_current), 0) > 4 AND v_current[5] = 'id_only'));

    IF v_mode = 'all' THEN
        v_cols := '{}';
    ELSE
        SELECT string_agg(quote_ident(c), ', ' ORDER BY c) INTO v_bad
        FROM unnest(v_cols) AS c
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped);
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'relay.enable: table % has no column %', p_table, v_bad
                USING ERRCODE = 'undefined_column',
                      HINT = format('Name columns of %s in %s.', p_table,
                                    CASE v_mode WHEN 'only' THEN 'p_columns' ELSE 'p_exclude_columns' END);
        END IF;
        IF v_mode = 'except' AND (p_scope_column = ANY (v_cols) OR p_id_column = ANY (v_cols)) THEN
            RAISE EXCEPTION 'relay.enable: the scope column % and the id column % of % cannot be excluded',
                quote_ident(p_scope_column), quote_ident(p_id_column), p_table
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Every event carries its id and scope in its own fields ("id", "project_id"); '
                          || 'they stay in data too. Use p_row_data => false for events without data.';
        END IF;
        -- One entry per column, in a stable order; the id and scope are
        -- implied by an allow-list.
        SELECT coalesce(array_agg(DISTINCT c ORDER BY c), '{}') INTO v_cols
        FROM unnest(v_cols) AS c
        WHERE v_mode = 'except' OR (c <> p_scope_column AND c <> p_id_column);
    END IF;

    IF v_mode = 'all' AND v_data THEN
        -- No choice: V1's arguments and code path.
        v_args := format('%L, %L, %L', p_resource, p_scope_column, p_id_column);
    ELSE
        SELECT string_agg(quote_literal(a), ', ' ORDER BY i) INTO v_args
        FROM unnest(ARRAY[p_resource, p_scope_column, p_id_column, v_mode,
                          CASE WHEN v_data THEN 'row_data' ELSE 'id_only' END] || v_cols)
             WITH ORDINALITY AS u(a, i);
    END IF;

    PERFORM relay.disable(p_table);
    -- No choice: V1's relay.capture; a choice: the table's own function.
    v_function := CASE WHEN v_mode = 'all' AND v_data THEN 'relay.capture'
                       ELSE relay.create_capture(p_table, v_mode, v_data, v_cols, p_scope_column, p_id_column) END;
    EXECUTE format('CREATE TRIGGER relay_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS relay_new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION %s(%s)', p_table, v_function, v_args);
    EXECUTE format('CREATE TRIGGER relay_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows NEW TABLE AS relay_new_rows '
                   'FOR EACH STATEMENT '
                   'EXECUTE FUNCTION %s(%s)', p_table, v_function, v_args);
    EXECUTE format('CREATE TRIGGER relay_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION %s(%s)', p_table, v_function, v_args);
    EXECUTE format('CREATE TRIGGER relay_refuse_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION relay.refuse_truncate()', p_table);
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER relay_capture_insert, '
                   'ENABLE ALWAYS TRIGGER relay_capture_update, '
                   'ENABLE ALWAYS TRIGGER relay_capture_delete, '
                   'ENABLE ALWAYS TRIGGER relay_refuse_truncate', p_table);
    IF p_grants_membership IS NOT NULL THEN
        PERFORM relay.declare_membership(p_resource, p_grants_membership);
    END IF;
END
$$;

-- What each tracked table's events carry: column_choice 'all' (every
-- column), 'only' (chosen_columns, with the id and scope) or 'except'
-- (all but chosen_columns); row_data false for id-only events.
CREATE OR REPLACE VIEW relay.tracked_columns AS
SELECT t.tgrelid::regclass AS table_name,
       x.a[1] AS resource,
       coalesce(x.a[4], 'all') AS column_choice,
       CASE WHEN coalesce(x.a[4], 'all') = 'all' THEN NULL ELSE x.a[6:] END AS chosen_columns,
       x.a[5] IS DISTINCT FROM 'id_only' AS row_data
FROM pg_trigger t
CROSS JOIN LATERAL (SELECT relay.trigger_args(t.tgargs) AS a) x
WHERE t.tgname = 'relay_capture_insert';
