-- chat: what each tracked table's events carry (DESIGN.md G10).
--
-- chat.projects and chat.messages send every column: everything in them is
-- what a project's members see in the app. chat.project_members leaves out
-- the member's own cursors (last_delivered_seq, last_read_seq): where a
-- member has read up to is theirs, not every other member's, and with the
-- cursors left out a mark (chat.mark_delivered, chat.mark_read) is no
-- project_member event at all, so it no longer makes the relay re-check
-- every subscriber of the project. A member's unread count is still
-- `GET /v1/projects/{id}/unread` (chat.unread_count).
--
-- Idempotent, like V1.
SELECT relay.enable('chat.project_members', 'project_member', 'project_id', 'user_id',
                    p_grants_membership => true,
                    p_exclude_columns => ARRAY['last_delivered_seq', 'last_read_seq']);
