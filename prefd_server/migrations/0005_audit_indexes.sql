-- History listings filtered by scope or by actor walk these in feed order (xid, id), so a page
-- deep in one user's history costs what the first page costs.

DROP INDEX changes_actor;
CREATE INDEX changes_actor_feed ON changes (actor, xid, id);
CREATE INDEX changes_scope_feed ON changes (scope_kind, scope_id, xid, id);
