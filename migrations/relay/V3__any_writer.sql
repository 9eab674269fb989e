-- relay V3: capture by any writer, rights to forge by none, membership
-- declared in SQL (DESIGN.md G1 and G4).
--
-- Idempotent like V1: safe to run again, by psql or by `pgrelay migrate`.
--
-- 1. Capture runs with the rights of the relay schema's owner (SECURITY
--    DEFINER, with a pinned search_path so that a writer's own schemas
--    cannot shadow a function or operator the trigger uses). A writer needs
--    no grant on relay.*, and gets none: it cannot insert into the event
--    log or the counters, nor call relay.append, unless granted.
-- 2. What the relay's own role needs is granted by one call,
--    relay.grant_relay(role); what a role needs to publish events that are
--    not row changes, by relay.grant_publisher(role). See docs/deploying.md.
-- 3. A tracked table can declare that its rows grant membership of the
--    scope (relay.enable(..., p_grants_membership => true)). Every frame the
--    relay reads says whether its resource is declared so, so the relay
--    re-checks subscribers after those events with no setting of its own.

-- Resources whose events change who may read a scope (G4).
CREATE TABLE IF NOT EXISTS relay.membership_resources (
    resource    text        PRIMARY KEY,
    declared_at timestamptz NOT NULL DEFAULT now()
);

-- Databases that got the chat app from an earlier version relied on the
-- relay's default setting for project_member events; the database now says
-- so itself, whether or not the chat migration runs again.
DO $declare_legacy_chat$
BEGIN
    IF to_regclass('chat.project_members') IS NOT NULL THEN
        INSERT INTO relay.membership_resources (resource) VALUES ('project_member')
        ON CONFLICT (resource) DO NOTHING;
    END IF;
END
$declare_legacy_chat$;

-- The event log, the counters and the horizon belong to the owner alone.
REVOKE ALL ON relay.events, relay.scope_counter, relay.trim_horizon,
              relay.membership_resources FROM PUBLIC;

ALTER FUNCTION relay.capture()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.append(text, text, text, text, jsonb[])
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION relay.append(text, text, text, text, jsonb[]) FROM PUBLIC;
ALTER FUNCTION relay.trim(int, interval, int)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION relay.trim(int, interval, int) FROM PUBLIC;

-- Declares (p_grants true) or withdraws (false) that events of p_resource
-- change membership. The owner's decision: a role that could withdraw a
-- declaration could make revocations leak, so PUBLIC cannot call it.
CREATE OR REPLACE FUNCTION relay.declare_membership(p_resource text, p_grants boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_resource IS NULL OR p_grants IS NULL THEN
        RAISE EXCEPTION 'relay.declare_membership: resource and grants must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_grants THEN
        INSERT INTO relay.membership_resources (resource) VALUES (p_resource)
        ON CONFLICT (resource) DO NOTHING;
    ELSE
        DELETE FROM relay.membership_resources WHERE resource = p_resource;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.declare_membership(text, boolean) FROM PUBLIC;

-- relay.enable gains p_grants_membership: true declares the table's rows as
-- granting membership, false withdraws that, NULL (the default) leaves the
-- declaration as it is, so re-running an app's `relay.enable(t, r)` never
-- silently withdraws it. The four-argument form is dropped first: two
-- overloads with defaults would make every call ambiguous.
DROP FUNCTION IF EXISTS relay.enable(regclass, text, name, name);
CREATE OR REPLACE FUNCTION relay.enable(
    p_table             regclass,
    p_resource          text,
    p_scope_column      name    DEFAULT 'project_id',
    p_id_column         name    DEFAULT 'id',
    p_grants_membership boolean DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_col name;
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

    PERFORM relay.disable(p_table);
    EXECUTE format('CREATE TRIGGER relay_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS relay_new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
    EXECUTE format('CREATE TRIGGER relay_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows NEW TABLE AS relay_new_rows '
                   'FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
    EXECUTE format('CREATE TRIGGER relay_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
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

-- The read path, with a flag per frame saying whether its resource is
-- declared as granting membership. The declared set is read once per query
-- (an uncorrelated subquery is an InitPlan), so a declaration takes effect
-- on the next read, with no restart and no relay setting. These wrap
-- relay.frames_after*, which stay as they were: a relay of an earlier
-- version keeps reading during a rolling upgrade, and re-running V1 never
-- meets a changed return type. Both are inlined by the planner.
CREATE OR REPLACE FUNCTION relay.read_frames(
    p_scope     text,
    p_after     bigint,
    p_limit     int    DEFAULT 500,
    p_max_bytes bigint DEFAULT 4194304
) RETURNS TABLE (seq bigint, created_at timestamptz, resource text, frame text, membership boolean)
LANGUAGE sql STABLE AS $$
    SELECT f.seq, f.created_at, f.resource, f.frame,
           f.resource = ANY (ARRAY(SELECT m.resource FROM relay.membership_resources m))
    FROM relay.frames_after(p_scope, p_after, p_limit, p_max_bytes) f
    ORDER BY f.seq
$$;

CREATE OR REPLACE FUNCTION relay.read_frames_many(
    p_scopes    text[],
    p_after     bigint[],
    p_limit     int    DEFAULT 500,
    p_max_bytes bigint DEFAULT 4194304
) RETURNS TABLE (scope text, seq bigint, created_at timestamptz, resource text, frame text, membership boolean)
LANGUAGE sql STABLE AS $$
    SELECT f.scope, f.seq, f.created_at, f.resource, f.frame,
           f.resource = ANY (ARRAY(SELECT m.resource FROM relay.membership_resources m))
    FROM relay.frames_after_many(p_scopes, p_after, p_limit, p_max_bytes) f
    ORDER BY f.scope, f.seq
$$;

-- The app's rule for each of one user's scopes, in one round trip. A rule
-- that raises fails for that scope alone (`failure` holds its SQLSTATE and
-- message) and never for the others, so one broken row or one bad scope
-- ends one subscription, not every check in the batch. A cancelled
-- statement (the relay's timeout) still ends the whole call.
CREATE OR REPLACE FUNCTION relay.authorize_each(p_user text, p_scopes text[])
RETURNS TABLE (scope text, allowed boolean, failure text)
LANGUAGE plpgsql AS $$
DECLARE
    v_scope text;
BEGIN
    FOREACH v_scope IN ARRAY coalesce(p_scopes, '{}') LOOP
        scope := v_scope;
        BEGIN
            allowed := coalesce(relay.authorize(p_user, v_scope), false);
            failure := NULL;
        EXCEPTION
            WHEN query_canceled THEN RAISE;
            WHEN OTHERS THEN
                allowed := false;
                failure := SQLSTATE || ': ' || SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Grants what `pgrelay serve` needs, and nothing more: read the log, run
-- the retention job. LISTEN and the probe's NOTIFY need no grant. The
-- relay's role does not own, install or migrate anything.
CREATE OR REPLACE FUNCTION relay.grant_relay(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA relay TO %s', p_role);
    EXECUTE format('GRANT SELECT ON relay.events, relay.scope_counter, relay.trim_horizon, '
                   'relay.membership_resources TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.trim(int, interval, int) TO %s', p_role);
    -- `serve` reads the migration history to check the schema is current.
    IF to_regclass('refinery_schema_history') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT ON refinery_schema_history TO %s', p_role);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.grant_relay(regrole) FROM PUBLIC;

-- Grants the right to publish events that are not row changes.
CREATE OR REPLACE FUNCTION relay.grant_publisher(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA relay TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.append(text, text, text, text, jsonb[]) TO %s', p_role);
END
$$;
REVOKE EXECUTE ON FUNCTION relay.grant_publisher(regrole) FROM PUBLIC;
