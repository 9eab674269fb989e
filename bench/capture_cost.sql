-- Where capture's write cost goes, timed inside Postgres (no client round
-- trips): DO loops of 5,000 single-row statements, one commit each.
-- Run against a scratch database with pgrelay installed:
--   psql -X -v ON_ERROR_STOP=1 -f bench/capture_cost.sql "$DATABASE_URL"
-- Divide each time by 5,000 for the cost per statement. It creates and
-- drops the schema capture_cost and scopes named capture-cost-*.
\set ON_ERROR_STOP 1
SET synchronous_commit = off;
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS capture_cost CASCADE;
CREATE SCHEMA capture_cost;
CREATE TABLE capture_cost.plain (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
CREATE TABLE capture_cost.captured (LIKE capture_cost.plain INCLUDING ALL);
SELECT relay.enable('capture_cost.captured', 'row');
\timing on
\echo plain insert
DO $$ BEGIN FOR i IN 1..5000 LOOP INSERT INTO capture_cost.plain (project_id, body) VALUES ('capture-cost-1', repeat('z', 150)); COMMIT; END LOOP; END $$;
\echo captured insert
DO $$ BEGIN FOR i IN 1..5000 LOOP INSERT INTO capture_cost.captured (project_id, body) VALUES ('capture-cost-2', repeat('z', 150)); COMMIT; END LOOP; END $$;
\echo counter upsert alone
DO $$ DECLARE v bigint; BEGIN FOR i IN 1..5000 LOOP INSERT INTO relay.scope_counter AS c (scope, last_seq) VALUES ('capture-cost-3', 1) ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + 1 RETURNING c.last_seq INTO v; COMMIT; END LOOP; END $$;
\echo event insert alone
DO $$ BEGIN FOR i IN 1..5000 LOOP INSERT INTO relay.events (scope, seq, resource, action, row_id, data) VALUES ('capture-cost-4', i, 'r', 'INSERT', i::text, '{"a":1}'); COMMIT; END LOOP; END $$;
\echo event insert + NOTIFY with an 8-byte payload
DO $$ BEGIN FOR i IN 1..5000 LOOP INSERT INTO relay.events (scope, seq, resource, action, row_id, data) VALUES ('capture-cost-5', i, 'r', 'INSERT', i::text, '{"a":1}'); PERFORM pg_notify('capture_cost', lpad(i::text, 8, '0')); COMMIT; END LOOP; END $$;
\echo event insert + NOTIFY with the rendered notice
DO $$ DECLARE e relay.events; BEGIN FOR i IN 1..5000 LOOP INSERT INTO relay.events AS ev (scope, seq, resource, action, row_id, data) VALUES ('capture-cost-6', i, 'r', 'INSERT', gen_random_uuid()::text, '{"a":1}') RETURNING ev.* INTO e; PERFORM pg_notify('capture_cost', relay.render(e, false)); COMMIT; END LOOP; END $$;
\timing off
DELETE FROM relay.events WHERE scope LIKE 'capture-cost-%';
DELETE FROM relay.scope_counter WHERE scope LIKE 'capture-cost-%';
DROP SCHEMA capture_cost CASCADE;
