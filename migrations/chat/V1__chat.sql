-- chat: the reference messaging app that pgrelay grew from.
--
-- Apps that write straight to Postgres call the functions below; the HTTP
-- API is a thin layer over them. Every rule lives here: each function does
-- its permission check and its write in one transaction, holding a lock on
-- the caller's membership row, so a concurrent removal either waits for the
-- write or makes it fail (no TOCTOU).
--
-- Errors have stable SQLSTATEs that callers map by code, never by text:
--   42501 insufficient_privilege  not a member / not the sender       (403)
--   P0002 no_data_found            no such message                    (404)
--   PR409                          version conflict on edit or delete (409)
--   22023 invalid_parameter_value  bad argument (limit, empty body...) (400)
--
-- Idempotent like the relay migrations, and applied after them (it uses
-- relay.enable). On an existing database it is opt-in: `pgrelay migrate
-- --chat`, `pgrelay sql --chat`. It has its own migration history
-- (refinery_schema_history_chat), so installing or skipping it never
-- touches the engine's.

CREATE SCHEMA IF NOT EXISTS chat;

CREATE TABLE IF NOT EXISTS chat.projects (
    id         text        PRIMARY KEY DEFAULT gen_random_uuid()::text
                           CHECK (length(id) BETWEEN 1 AND 128),
    name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- last_delivered_seq / last_read_seq are the member's cursors over
-- chat.messages.seq; unread counts are computed from them.
CREATE TABLE IF NOT EXISTS chat.project_members (
    project_id         text        NOT NULL REFERENCES chat.projects (id) ON DELETE CASCADE,
    user_id            text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    role               text        NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')),
    last_delivered_seq bigint      NOT NULL DEFAULT 0,
    last_read_seq      bigint      NOT NULL DEFAULT 0,
    joined_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX IF NOT EXISTS project_members_user_idx ON chat.project_members (user_id);

-- Message seq: per project, handed out by a trigger so that raw INSERTs get
-- one too. Kept apart from chat.projects so that sending a message does not
-- also update (and broadcast) the project row.
CREATE TABLE IF NOT EXISTS chat.message_counters (
    project_id text   PRIMARY KEY REFERENCES chat.projects (id) ON DELETE CASCADE,
    last_seq   bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS chat.messages (
    id                  text        PRIMARY KEY DEFAULT gen_random_uuid()::text,
    project_id          text        NOT NULL REFERENCES chat.projects (id) ON DELETE CASCADE,
    seq                 bigint      NOT NULL,
    sender_id           text        NOT NULL,
    body                text        NOT NULL,
    client_generated_id text        NOT NULL DEFAULT gen_random_uuid()::text
                                    CHECK (length(client_generated_id) BETWEEN 1 AND 128),
    status              text        NOT NULL DEFAULT 'sent'
                                    CHECK (status IN ('sent', 'delivered', 'read')),
    version             integer     NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    edited_at           timestamptz,
    deleted_at          timestamptz,
    UNIQUE (project_id, seq),
    -- A retried send carries the same client_generated_id: one row, ever.
    UNIQUE (project_id, sender_id, client_generated_id)
);

-- Gives each new message the next seq of its project. The counter row lock
-- is held to commit, so message seqs are also in commit order per project.
CREATE OR REPLACE FUNCTION chat.assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chat.message_counters AS c (project_id, last_seq)
    VALUES (NEW.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET last_seq = c.last_seq + 1
    RETURNING c.last_seq INTO NEW.seq;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER messages_assign_seq
    BEFORE INSERT ON chat.messages
    FOR EACH ROW EXECUTE FUNCTION chat.assign_message_seq();
-- Like the capture triggers: bulk loaders running with
-- session_replication_role = replica must not skip it.
ALTER TABLE chat.messages ENABLE ALWAYS TRIGGER messages_assign_seq;

-- Capture: every change to these tables, by any writer, is an event.
SELECT relay.enable('chat.projects', 'project', 'id', 'id');
-- Its rows grant membership: after each of their events the relay
-- re-checks the scope's subscribers (G4).
SELECT relay.enable('chat.project_members', 'project_member', 'project_id', 'user_id',
                    p_grants_membership => true);
SELECT relay.enable('chat.messages', 'message', 'project_id', 'id');

-- The chat app's membership rule: members of the project. SECURITY
-- DEFINER, so the relay's role needs no grant on chat tables to ask it.
CREATE OR REPLACE FUNCTION chat.authorize(user_id text, scope text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM chat.project_members m
                   WHERE m.project_id = authorize.scope AND m.user_id = authorize.user_id)
$$;

-- relay.authorize is the app's (G4): the chat rule takes its place only
-- where it is still the engine's deny-all default (or the chat rule of an
-- earlier version). An app with a rule of its own keeps it, and may call
-- chat.authorize from it.
DO $install_chat_rule$
DECLARE
    v_body text;
BEGIN
    SELECT regexp_replace(btrim(p.prosrc), '\s+', ' ', 'g') INTO v_body
    FROM pg_proc p WHERE p.oid = to_regprocedure('relay.authorize(text,text)');
    IF v_body IS NULL
       OR v_body LIKE '%pgrelay default rule%'
       OR v_body = 'SELECT false'
       OR v_body = 'SELECT EXISTS (SELECT 1 FROM chat.project_members m WHERE m.project_id = authorize.scope AND m.user_id = authorize.user_id)'
    THEN
        CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
        LANGUAGE sql STABLE AS $rule$ SELECT chat.authorize(user_id, scope) /* pgrelay chat rule */ $rule$;
    END IF;
END
$install_chat_rule$;

-- Grants what the relay's `/v1` API needs to call the chat functions.
CREATE OR REPLACE FUNCTION chat.grant_api(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA chat TO %s', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA chat TO %s', p_role);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA chat TO %s', p_role);
    IF to_regclass('refinery_schema_history_chat') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT ON refinery_schema_history_chat TO %s', p_role);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION chat.grant_api(regrole) FROM PUBLIC;

-- Checks that p_user is a member of p_project and locks the membership row
-- (FOR KEY SHARE) until the caller's transaction ends, so a concurrent
-- removal cannot slip between the check and the write. Returns the role.
CREATE OR REPLACE FUNCTION chat.require_member(p_project text, p_user text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_role text;
BEGIN
    SELECT m.role INTO v_role FROM chat.project_members m
    WHERE m.project_id = p_project AND m.user_id = p_user
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % is not a member of project %', quote_literal(p_user), quote_literal(p_project)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN v_role;
END
$$;

-- Projects the user belongs to, with the caller's role and the latest
-- message seq.
CREATE OR REPLACE FUNCTION chat.list_projects(p_user text)
RETURNS TABLE (id text, name text, role text, latest_seq bigint, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT p.id, p.name, m.role, coalesce(c.last_seq, 0), p.created_at
    FROM chat.project_members m
    JOIN chat.projects p ON p.id = m.project_id
    LEFT JOIN chat.message_counters c ON c.project_id = p.id
    WHERE m.user_id = p_user
    ORDER BY p.created_at, p.id
$$;

-- Sends a message, idempotently: the same (project, sender,
-- client_generated_id) returns the row of the first call, with created =
-- false, and writes nothing (so no second event). Concurrent retries are
-- serialised on an advisory lock of that key, so they cannot burn a seq.
CREATE OR REPLACE FUNCTION chat.send_message(
    p_project   text,
    p_sender    text,
    p_body      text,
    p_client_id text
) RETURNS TABLE (message chat.messages, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_msg chat.messages;
BEGIN
    IF p_body IS NULL OR length(p_body) = 0 THEN
        RAISE EXCEPTION 'body must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_client_id IS NULL OR length(p_client_id) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'client_generated_id must be 1 to 128 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM chat.require_member(p_project, p_sender);
    PERFORM pg_advisory_xact_lock(hashtextextended(p_project || '/' || p_sender || '/' || p_client_id, 0));

    SELECT * INTO v_msg FROM chat.messages m
    WHERE m.project_id = p_project AND m.sender_id = p_sender AND m.client_generated_id = p_client_id;
    IF FOUND THEN
        RETURN QUERY SELECT v_msg, false;
        RETURN;
    END IF;

    INSERT INTO chat.messages (project_id, sender_id, body, client_generated_id)
    VALUES (p_project, p_sender, p_body, p_client_id)
    RETURNING * INTO v_msg;
    RETURN QUERY SELECT v_msg, true;
END
$$;

-- Loads a message for a write by p_user, locked, and checks the rules
-- shared by edit and delete: it exists, is not deleted, the user may write
-- it, and its version is the one the caller read (compare-and-swap).
CREATE OR REPLACE FUNCTION chat.lock_message_for_write(
    p_message_id       text,
    p_user             text,
    p_expected_version integer,
    p_owner_may        boolean
) RETURNS chat.messages
LANGUAGE plpgsql AS $$
DECLARE
    v_msg  chat.messages;
    v_role text;
BEGIN
    SELECT * INTO v_msg FROM chat.messages m WHERE m.id = p_message_id FOR UPDATE;
    IF NOT FOUND OR v_msg.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'message % not found', quote_literal(p_message_id) USING ERRCODE = 'no_data_found';
    END IF;
    v_role := chat.require_member(v_msg.project_id, p_user);
    IF v_msg.sender_id <> p_user AND NOT (p_owner_may AND v_role = 'owner') THEN
        RAISE EXCEPTION 'user % may not change message %', quote_literal(p_user), quote_literal(p_message_id)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_expected_version IS NOT NULL AND v_msg.version <> p_expected_version THEN
        RAISE EXCEPTION 'message % is at version %, not %', quote_literal(p_message_id),
            v_msg.version, p_expected_version
            USING ERRCODE = 'PR409', HINT = 'Reload the message and retry with its current version.';
    END IF;
    RETURN v_msg;
END
$$;

-- Edits a message's body: sender only, compare-and-swap on version.
CREATE OR REPLACE FUNCTION chat.edit_message(
    p_message_id       text,
    p_user             text,
    p_body             text,
    p_expected_version integer
) RETURNS chat.messages
LANGUAGE plpgsql AS $$
DECLARE
    v_msg chat.messages;
BEGIN
    IF p_body IS NULL OR length(p_body) = 0 THEN
        RAISE EXCEPTION 'body must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_expected_version IS NULL THEN
        RAISE EXCEPTION 'expected version is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM chat.lock_message_for_write(p_message_id, p_user, p_expected_version, false);
    UPDATE chat.messages m
    SET body = p_body, version = m.version + 1, edited_at = now()
    WHERE m.id = p_message_id
    RETURNING * INTO v_msg;
    RETURN v_msg;
END
$$;

-- Soft-deletes a message: the sender or a project owner; compare-and-swap
-- on version when p_expected_version is given. The body is cleared and the
-- row stays as a tombstone, so pages and clients see that it went.
CREATE OR REPLACE FUNCTION chat.delete_message(
    p_message_id       text,
    p_user             text,
    p_expected_version integer DEFAULT NULL
) RETURNS chat.messages
LANGUAGE plpgsql AS $$
DECLARE
    v_msg chat.messages;
BEGIN
    PERFORM chat.lock_message_for_write(p_message_id, p_user, p_expected_version, true);
    UPDATE chat.messages m
    SET body = '', deleted_at = now(), version = m.version + 1
    WHERE m.id = p_message_id
    RETURNING * INTO v_msg;
    RETURN v_msg;
END
$$;

-- A keyset page of a project's messages, newest first: those with
-- seq < p_before_seq (all, when NULL), at most p_limit (1 to 200).
-- Deleted messages appear as tombstones (deleted_at set, empty body).
CREATE OR REPLACE FUNCTION chat.messages_page(
    p_project    text,
    p_user       text,
    p_before_seq bigint  DEFAULT NULL,
    p_limit      integer DEFAULT 50
) RETURNS SETOF chat.messages
LANGUAGE plpgsql AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'limit must be between 1 and 200, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM chat.require_member(p_project, p_user);
    RETURN QUERY
        SELECT * FROM chat.messages m
        WHERE m.project_id = p_project AND (p_before_seq IS NULL OR m.seq < p_before_seq)
        ORDER BY m.seq DESC
        LIMIT p_limit;
END
$$;

-- The latest message seq of a project: the ceiling of read cursors, so a
-- seq from the future cannot mark messages not yet sent as read.
CREATE OR REPLACE FUNCTION chat.latest_message_seq(p_project text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.last_seq FROM chat.message_counters c WHERE c.project_id = p_project), 0)
$$;

-- Marks others' messages up to p_up_to_seq as delivered to p_user and
-- advances the member's delivered cursor (capped at the latest message).
-- Returns the messages changed. Never moves a status backwards.
CREATE OR REPLACE FUNCTION chat.mark_delivered(p_project text, p_user text, p_up_to_seq bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_changed integer;
BEGIN
    PERFORM chat.require_member(p_project, p_user);
    p_up_to_seq := least(p_up_to_seq, chat.latest_message_seq(p_project));
    UPDATE chat.project_members m SET last_delivered_seq = p_up_to_seq
    WHERE m.project_id = p_project AND m.user_id = p_user AND m.last_delivered_seq < p_up_to_seq;
    UPDATE chat.messages m SET status = 'delivered'
    WHERE m.project_id = p_project AND m.seq <= p_up_to_seq
      AND m.sender_id <> p_user AND m.status = 'sent';
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    RETURN v_changed;
END
$$;

-- Marks others' messages up to p_up_to_seq as read by p_user and advances
-- the member's read (and delivered) cursors, capped at the latest message.
-- Returns the messages changed.
CREATE OR REPLACE FUNCTION chat.mark_read(p_project text, p_user text, p_up_to_seq bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_changed integer;
BEGIN
    PERFORM chat.require_member(p_project, p_user);
    p_up_to_seq := least(p_up_to_seq, chat.latest_message_seq(p_project));
    UPDATE chat.project_members m
    SET last_read_seq = p_up_to_seq,
        last_delivered_seq = greatest(m.last_delivered_seq, p_up_to_seq)
    WHERE m.project_id = p_project AND m.user_id = p_user AND m.last_read_seq < p_up_to_seq;
    UPDATE chat.messages m SET status = 'read'
    WHERE m.project_id = p_project AND m.seq <= p_up_to_seq
      AND m.sender_id <> p_user AND m.status <> 'read';
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    RETURN v_changed;
END
$$;

-- Messages from others after the user's read cursor, not deleted.
CREATE OR REPLACE FUNCTION chat.unread_count(p_project text, p_user text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_cursor bigint;
BEGIN
    PERFORM chat.require_member(p_project, p_user);
    SELECT m.last_read_seq INTO v_cursor FROM chat.project_members m
    WHERE m.project_id = p_project AND m.user_id = p_user;
    RETURN (SELECT count(*) FROM chat.messages m
            WHERE m.project_id = p_project AND m.seq > v_cursor
              AND m.sender_id <> p_user AND m.deleted_at IS NULL);
END
$$;

-- The project's latest message seq (0 before the first message).
CREATE OR REPLACE FUNCTION chat.latest_seq(p_project text, p_user text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM chat.require_member(p_project, p_user);
    RETURN chat.latest_message_seq(p_project);
END
$$;
